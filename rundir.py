"""The run folder both trainers write, and the update step they share.

    OUT/checkpoint/        the newest weights: a clean Hugging Face model directory (config, safetensors, tokenizer)
    OUT/trainer_state.pt   what --resume needs besides the weights: step, optimizer, RNG, probe, length penalty,
                           the run's options, fp32 master weights when checkpoint/ holds a narrower dtype, and
                           `files`, the sha256 of each file the checkpoint was saved with
    OUT/log.jsonl          one JSON row per step
    OUT/run.lock           the PID of the run holding the folder (an flock: the kernel drops it when that process dies)

A save writes checkpoint.tmp/ and fsyncs it, then trainer_state.pt.partial, renamed to trainer_state.pt.tmp
once complete, fsynced and read back: it marks checkpoint.tmp/ as complete, and its `files` prove which
folder it belongs to. Then checkpoint.tmp/ -> checkpoint/ and trainer_state.pt.tmp -> trainer_state.pt.
`find` takes a mark that loads and whose `files` match a folder beside it, else trainer_state.pt with
checkpoint/, whatever moment a kill struck; `recover` finishes the renames of a save cut short and drops
the rest (a damaged or stale mark is said in one line; a damaged trainer_state.pt refuses --resume). A run
without --resume refuses a folder that holds a save or a save's leftovers (--overwrite removes them).
Every file is written through `writing`: a full disk is one line naming the file, the temporary removed.

Under torchrun rank 0 alone holds the lock and writes; every rank calls these functions (a save gathers
the optimizer state and FSDP's weights from all ranks first), and rank 0's file steps go through
parallel.on_main, so an error there (a busy folder, a full disk) stops every rank with its one line.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import warnings

import torch

import data
import model as M
import parallel as P

CKPT, STATE, LOG, LOCK = "checkpoint", "trainer_state.pt", "log.jsonl", "run.lock"
MAX_SKIPS = 10  # a run stops after this many skipped steps in a row (or when all its steps were skipped)

RUNS = "runs"
SHIPPED = "checkpoints"  # small-vl's committed models: bases of seeds 0-2, seed 0's SFT (README: "Shipped starting points")
BASE_STEPS = 3000  # stage 0's default length, the one the shipped bases were trained with


def shipped_base(seed: int, base_steps: int = BASE_STEPS) -> str | None:
    """The committed base model of this seed (checkpoints/small-vl-base for seed 0, small-vl-base-sN for the
    study's seeds 1 and 2), when there is one and the asked-for recipe is the one it was trained with."""
    path = os.path.join(SHIPPED, "small-vl-base" + (f"-s{seed}" if seed else ""))
    return path if base_steps == BASE_STEPS and os.path.isfile(os.path.join(path, "config.json")) else None


def shipped_sft(task: str, kind: str = "") -> str:
    """Where seed 0's shipped stage-1 model of `task` is: kind "" (LVR SFT), "-text" (text-only) or "-strict"
    (checkpoints/small-vl-sft... for easy, small-vl-hard-sft... for hard); it may be absent."""
    return os.path.join(SHIPPED, f"small-vl-{'' if task == 'easy' else task + '-'}sft{kind}")


def task_suffix(task: str | None) -> str:
    """Default run folders of another task than data.DEFAULT_TASK end in -TASK (runs/small-vl-sft-easy)."""
    return f"-{task}" if task and task != data.DEFAULT_TASK else ""


def model_name(model: str) -> str:
    """A model's name in default file and folder names: its folder's, or its run's for a run's checkpoint/
    (runs/x/checkpoint -> x; Qwen/Qwen2.5-VL-3B-Instruct -> Qwen2.5-VL-3B-Instruct)."""
    path = os.path.normpath(model)
    run, name = os.path.split(path)
    return os.path.basename(run) if name == CKPT and run else name


class RunError(RuntimeError):
    """A run that cannot go on; the message is one line naming the folder or file."""


def oneline(e: BaseException) -> str:
    """One line for an error: OSErrors as 'path: reason', others by their first line."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return (str(e).splitlines() or [type(e).__name__])[0]


# ----------------------------------------------------------------------------------- arguments
def _number(kind, ok, says: str):
    """argparse type: a number of `kind` for which ok(v) holds, else one line naming the option."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not ok(v):  # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"must be {says}, got {s}")
        return v
    return parse


def at_least(lo, kind=int):
    """argparse type: a number >= lo (`--group 1`, `--warmup -5`, `--beta -1` are one line naming the option)."""
    return _number(kind, lambda v: v >= lo, f"at least {lo}")


def positive(kind=float):
    """argparse type: a number > 0 (`--lr -1`, `--clip-grad 0`)."""
    return _number(kind, lambda v: v > 0, "above 0")


def within(lo, hi, ends="[]"):
    """argparse type: a float from lo to hi, each end in or out by `ends` (`--clip-low 1`, `--top-p 1.5`)."""
    def ok(v):
        return (lo <= v if ends[0] == "[" else lo < v) and (v <= hi if ends[1] == "]" else v < hi)
    return _number(float, ok, f"in {ends[0]}{lo}, {hi}{ends[1]}")


def existing_file(s: str) -> str:
    """argparse type: a path to a file that exists (`--data rl.jsonl` missing is one line, before any work)."""
    if not os.path.isfile(s):
        raise argparse.ArgumentTypeError(f"file not found: {s}" if not os.path.exists(s) else f"{s} is not a file")
    return s


def layer_list(s: str) -> list[int]:
    """argparse type of --att-layers: comma-separated decoder layer indices."""
    try:
        layers = [int(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of layer numbers") from None
    if min(layers) < 0:
        raise argparse.ArgumentTypeError(f"layer numbers start at 0, got {s}")
    return layers


def check_layers(model, layers):
    """--att-layers against the loaded model's decoder depth."""
    n = model.config.text_config.num_hidden_layers
    if max(layers) >= n:
        raise ValueError(f"--att-layers {max(layers)}: the model has {n} decoder layers (0-{n - 1})")


def check_resume(saved: dict, now: dict, order_keys: tuple):
    """Say which options differ from the saved run's; refuse those that change the data order."""
    diff = {k: (saved.get(k), v) for k, v in now.items() if k not in ("resume", "device", "out") and saved.get(k, v) != v}
    bad = [k for k in diff if k in order_keys]
    if bad:
        k = bad[0]
        raise RunError(f"--resume with --{k.replace('_', '-')} {diff[k][1]} but the run used {diff[k][0]}: "
                       "that changes the data order; use the same value or another --out")
    if diff and P.is_main():
        print("resuming with changed options: " + ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in diff.items()))


def add_run_args(p):
    """--resume / --overwrite, the same in both trainers."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from OUT's newest complete checkpoint, same data order")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that holds a run: its checkpoints, trainer state, log, table and "
                        "leftovers are removed first (without --resume or --overwrite such a folder is refused)")


# ---------------------------------------------------------------------------------------- lock
@contextlib.contextmanager
def _on_main(cm):
    """Enter context manager `cm` on rank 0 alone; every rank learns whether it could (parallel.on_main)."""
    with contextlib.ExitStack() as stack:
        P.on_main(stack.enter_context, cm)
        yield


def locked(out: str, args=None):
    """Hold OUT for this run (under torchrun: rank 0 holds it, every rank learns whether it could). With a
    trainer's `args`, OUT is claimed for it (`claim`)."""
    return _on_main(_lock(out, args))


def locked_file(path: str):
    """Hold PATH.lock while this process writes PATH (eval's results): a second writer is refused in one
    line naming PATH and the holder's PID; the lock file goes at the end."""
    return _on_main(_file_lock(path))


def _flock(path: str, busy: str) -> int:
    """A descriptor of `path` (created if missing) holding its flock, this PID written in it; when a live
    process holds it: RunError '`busy` (pid N)'."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunError(f"{busy} (pid {pid}): let it finish, or choose another --out") from None
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, e.strerror, path) from None
    return fd


@contextlib.contextmanager
def _lock(out: str, args=None):
    """Hold OUT for this process; another live run on it is refused, naming the folder and its PID.
    A folder this call created is removed again when the run fails before writing anything to it."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} exists and is not a folder")
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    fd = _flock(os.path.join(out, LOCK), f"{out} is in use by another run")
    try:
        if args is not None:
            claim(out, args)
        yield
    except BaseException:
        if created and os.listdir(out) == [LOCK]:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _file_lock(path: str):
    """Hold PATH.lock for this process (see locked_file)."""
    lock = path + ".lock"
    while True:
        fd = _flock(lock, f"{path} is being written by another process")
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break  # else the holder removed it between our open and our flock: take the new one
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
        os.close(fd)


def leftovers(out: str) -> list[str]:
    """What a run leaves in OUT: checkpoint*/, trainer_state.pt*, log.jsonl*, eval_val.json*, *.tmp, *.partial."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return sorted(n for n in names if n.endswith((".tmp", ".partial"))
                  or any(n == f or n.startswith(f + ".") for f in (CKPT, STATE, LOG, "eval_val.json")))


def claim(out: str, args, remove: bool = True):
    """A run without --resume starts in a folder without a run's files: OUT's leftovers refuse it in one
    line, unless --overwrite, which removes them (`remove`: the lock is held)."""
    left = [] if args.resume else leftovers(out)
    if left and not args.overwrite:
        raise RunError(f"{out} holds a run ({', '.join(left)}): --resume to continue it, --overwrite to start over")
    for name in left if remove else ():
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


# ---------------------------------------------------------------------------------------- files
class _Sink(io.RawIOBase):
    """A binary file's writes, keeping the OSError (a full disk) that torch.save turns into its own RuntimeError."""

    def __init__(self, f):
        super().__init__()
        self.f, self.error = f, None

    def writable(self):
        return True

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise


@contextlib.contextmanager
def writing(path: str, part: str | None = None, mode: str = "w"):
    """A file written whole or not at all: into `part` (default PATH.tmp), fsynced, then renamed to PATH.
    A failure (a full disk) removes `part` and comes out as one OSError naming PATH."""
    part, sink = part or path + ".tmp", None
    try:
        with open(part, mode) as f:
            sink = _Sink(f) if "b" in mode else f
            yield sink
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(part)
        if not isinstance(e, (OSError, RuntimeError)) or isinstance(e, RunError):
            raise
        e = getattr(sink, "error", None) or e
        raise OSError(getattr(e, "errno", None) or errno.EIO, getattr(e, "strerror", None) or oneline(e), path) from None


# ---------------------------------------------------------------------------------- checkpoints
def sha256(path: str) -> str | None:
    """The sha256 of a file, None when it is missing."""
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def digest(folder: str) -> dict:
    """{file name: sha256} of a checkpoint folder as saved: what ties a trainer state to its weights
    (files added later, as eval's results beside the model, do not count)."""
    return {name: sha256(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def read_state(path: str, mmap: bool = False) -> dict:
    """A trainer state file (mmap: its tensors mapped, not read); one that does not load -> RunError naming it."""
    try:
        state = torch.load(path, weights_only=False, map_location="cpu", mmap=mmap)
    except Exception as e:  # noqa: BLE001 - a truncated file is a zip, pickle or EOF error
        raise RunError(f"{path} is damaged ({oneline(e)})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise RunError(f"{path} is damaged (not a trainer state)")
    return state


def find(out: str, ignored: list | None = None) -> tuple[str, str] | None:
    """(weights folder, trainer state file) of the newest complete save in OUT, or None. Reads only.
    A mark (trainer_state.pt.tmp: a save whose renames a kill cut short) counts when it loads and its
    `files` are those of a folder beside it: checkpoint.tmp/, checkpoint/ or checkpoint.old/ (older
    versions' marks, without `files`: checkpoint.tmp/ when there is one). trainer_state.pt, renamed into
    place only after its folder, pairs with checkpoint/ when it loads. Each state that does not count is
    said in `ignored`, one line. Older layouts kept trainer_state.pt inside checkpoint/."""
    ck, st = os.path.join(out, CKPT), os.path.join(out, STATE)
    ignored = [] if ignored is None else ignored
    for path in (st + ".tmp", st):
        if not os.path.isfile(path):
            continue
        try:
            files = read_state(path, mmap=True).get("files")
        except RunError as e:
            ignored.append(str(e))
            continue
        if path != st and files:  # a mark: the folder whose files it recorded
            for d in (ck + ".tmp", ck, ck + ".old"):
                if os.path.isdir(d) and all(sha256(os.path.join(d, n)) == h for n, h in files.items()):
                    return d, path
        else:  # trainer_state.pt (renamed into place after its folder), or an older version's mark
            d = ck + ".tmp" if path != st and os.path.isdir(ck + ".tmp") else ck
            if os.path.isdir(d):
                return d, path
        ignored.append(f"{path} belongs to no checkpoint folder beside it (another save's, or a half-written one)")
    for d in (ck + ".tmp", ck, ck + ".old"):  # the older layout, newest first
        if os.path.isfile(os.path.join(d, STATE)):
            return d, os.path.join(d, STATE)
    return None


def saved_step(out: str) -> int:
    """The step of OUT's newest complete save (0 without one)."""
    found = find(out)
    return read_state(found[1], mmap=True)["step"] if found else 0


def recover(out: str):
    """Finish the renames of a save a kill cut short and drop the files of saves that never completed,
    each trainer state dropped said in one line (the lock must be held). A trainer state but no complete
    save (the state damaged, or beside other weights) refuses in one line: nothing is removed."""
    ignored = []
    found = find(out, ignored)
    if found is None and ignored:
        raise RunError(f"{ignored[0]}: no complete save to resume from; --overwrite to start over")
    for line in ignored:
        print(f"{line}: ignored, resuming from {found[1]}")
    if found and found[1] in (os.path.join(out, STATE), os.path.join(out, STATE + ".tmp")):
        _commit(out, *found)


def _commit(out: str, ck_from: str, st_from: str):
    """Make a complete pair OUT's checkpoint/ and trainer_state.pt, then remove every other save's files.
    At each moment `find` still finds that pair (the state's `files` say which folder is its own)."""
    ck, st = os.path.join(out, CKPT), os.path.join(out, STATE)
    if ck_from != ck:
        shutil.rmtree(ck, ignore_errors=True)
        os.replace(ck_from, ck)
    if st_from != st:
        os.replace(st_from, st)
    M.fsync_dir(out)
    for junk in (ck + ".tmp", ck + ".old"):
        shutil.rmtree(junk, ignore_errors=True)
    for junk in (st + ".tmp", st + ".partial"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(junk)


def save(out: str, model, tok, state: dict, dtype=None, opt=None):
    """Write checkpoint/ (weights in `dtype`, default the model's) and trainer_state.pt (with `opt`'s state
    in plain AdamW layout, which any number of processes resumes) as one atomic pair. Refuses non-finite
    weights: a diverged run keeps its last good checkpoint. Under torchrun every rank calls it: the check,
    the optimizer state (--zero, --fsdp) and the weights (--fsdp) are collectives; then rank 0 writes."""
    bad = next((b for b in P.gather_objects(M.nonfinite_tensor(model)) if b), None)
    if bad:
        raise RunError(f"not writing a checkpoint to {out}: tensor {bad} holds NaN/inf (the run diverged; lower --lr)")
    if opt is not None:
        state = {**state, "optimizer": P.optimizer_state(model, opt)}
    P.on_main(_write, out, model, tok, state, dtype, P.model_state(model))


def _write(out: str, model, tok, state: dict, dtype, weights: dict | None):
    """checkpoint.tmp/, then its mark trainer_state.pt.tmp (via .partial, read back); a failure (a full
    disk) removes both and leaves the previous save as it was."""
    ck, st = os.path.join(out, CKPT + ".tmp"), os.path.join(out, STATE + ".tmp")
    try:
        shutil.rmtree(ck, ignore_errors=True)
        M.write_model(model, tok, ck, dtype, weights)
        state = {**state, "rng": torch.get_rng_state(), "files": digest(ck)}
        if dtype is not None and dtype != model.dtype:  # exact resume needs the master weights checkpoint/ rounds
            full = weights or dict(model.named_parameters())
            state["master"] = {n: full[n].detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        with writing(st, os.path.join(out, STATE + ".partial"), "wb") as f:
            torch.save(state, f)
        read_state(st, mmap=True)  # it loads: from here on the new pair counts as complete
    except BaseException as e:
        shutil.rmtree(ck, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(st)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"{e.strerror}; not saved, the previous save is kept", e.filename) from None
        raise
    M.fsync_dir(out)
    _commit(out, ck, st)


def resume_point(out: str) -> tuple[str, str] | None:
    """Finish OUT's interrupted save if any (the lock must be held: rank 0 does it); then `find`, on every rank."""
    return P.on_main(_recover_and_find, out)


def _recover_and_find(out: str):
    recover(out)
    return find(out)


def load_state(found: tuple[str, str], model) -> dict:
    """The trainer state of a `find` result; puts back the master weights (into the whole model: before
    FSDP shards it) and the RNG. Every rank reads it."""
    state = read_state(found[1])
    if "master" in state:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, v in state["master"].items():
                params[n].copy_(v)
    if "rng" in state:
        torch.set_rng_state(state["rng"])
    return state


# ------------------------------------------------------------------------------------------ log
def start_log(out: str, upto: int) -> str:
    """OUT/log.jsonl with only the rows up to step `upto` (a resumed run writes the later ones again),
    rewritten atomically (by rank 0). A torn last line (power loss, disk full) is dropped with one message."""
    return P.on_main(_start_log, out, upto)


def _start_log(out: str, upto: int) -> str:
    path = os.path.join(out, LOG)
    keep = []
    if upto and os.path.exists(path):
        lines = open(path, "rb").read().decode("utf-8", errors="replace").splitlines()
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except ValueError:
                if i < len(lines) - 1:
                    raise RunError(f"{path}: line {i + 1} is not JSON; fix or remove it to resume") from None
                print(f"{path}: dropping its torn last line {i + 1}")
                continue
            if row.get("step", 0) <= upto:
                keep.append(json.dumps(row) + "\n")
    with writing(path) as f:
        f.writelines(keep)
    M.fsync_dir(out)
    return path


def log(path: str, row: dict):
    """Append a row (rank 0 writes; every rank calls it)."""
    P.on_main(_append, path, row)


def _append(path: str, row: dict):
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:  # a full disk: the torn row is dropped by the next --resume
        raise OSError(e.errno, e.strerror, path) from None


# --------------------------------------------------------------------------------------- update
def clip_and_step(opt, clip: float) -> bool:
    """Clip the gradient norm and step; a non-finite gradient skips the update (gradients cleared).
    Returns whether the optimizer stepped. Under torchrun the gradients must be averaged over the ranks
    first (parallel.average_grads; FSDP's are): a non-finite gradient on any rank skips the step on all."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: the norm over every shard
    if not P.all_true(bool(torch.isfinite(norm))):
        opt.zero_grad(set_to_none=True)
        warnings.warn("non-finite gradients: update skipped")
        return False
    opt.step()
    return True


def skip_streak(streak: int, skipped: bool, step: int, total: int) -> int:
    """Skipped steps in a row so far; stops the run when they reach MAX_SKIPS or every step of the run."""
    streak = streak + 1 if skipped else 0
    if streak >= min(MAX_SKIPS, total):
        raise RunError(f"steps {step - streak + 1}-{step} were all skipped (non-finite loss or gradients): "
                       "the model diverged or is broken; lower --lr or check the starting model")
    return streak
