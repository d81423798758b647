"""The run folder both trainers write, and the update step they share.

    OUT/checkpoint/        the newest weights: a clean Hugging Face model directory (config, safetensors, tokenizer)
    OUT/trainer_state.pt   what --resume needs besides the weights: step, optimizer, RNG, probe, length penalty,
                           the run's options, and fp32 master weights when checkpoint/ holds a narrower dtype
    OUT/log.jsonl          one JSON row per step
    OUT/run.lock           the PID of the run holding the folder (an flock: the kernel drops it when that process dies)

A save writes checkpoint.tmp/ and fsyncs it, then trainer_state.tmp (complete and fsynced: it marks
checkpoint.tmp/ as complete), then renames checkpoint/ -> checkpoint.old/, checkpoint.tmp/ -> checkpoint/,
trainer_state.tmp -> trainer_state.pt. `find` reads the newest complete pair whatever moment a kill
struck; `recover` finishes the renames of a save cut short.

Under torchrun rank 0 alone holds the lock and writes; every rank calls these functions (a save gathers
the optimizer state and FSDP's weights from all ranks first), and rank 0's file steps go through
parallel.on_main, so an error there (a busy folder, a full disk) stops every rank with its one line.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import warnings

import torch

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



class RunError(RuntimeError):
    """A run that cannot go on; the message is one line naming the folder or file."""


def oneline(e: BaseException) -> str:
    """One line for an error: OSErrors as 'path: reason', others by their first line."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return (str(e).splitlines() or [type(e).__name__])[0]


# ----------------------------------------------------------------------------------- arguments
def at_least(lo, kind=int):
    """argparse type: a number >= lo (kind int) or > lo (kind float), so `--group 1` is one line naming the option."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a{'n integer' if kind is int else ' number'}") from None
        if (v < lo) if kind is int else not v > lo:
            raise argparse.ArgumentTypeError(f"must be {'at least' if kind is int else 'above'} {lo}, got {s}")
        return v
    return parse


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


# ---------------------------------------------------------------------------------------- lock
@contextlib.contextmanager
def locked(out: str):
    """Hold OUT for this run (under torchrun: rank 0 holds it, every rank learns whether it could)."""
    with contextlib.ExitStack() as stack:
        P.on_main(stack.enter_context, _lock(out))
        yield


@contextlib.contextmanager
def _lock(out: str):
    """Hold OUT for this process; another live run on it is refused, naming the folder and its PID.
    A folder this call created is removed again when the run fails before writing anything to it."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} exists and is not a folder")
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunError(f"{out} is in use by another run (pid {pid}): let it finish, or choose another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    except BaseException:
        if created and os.listdir(out) == [LOCK]:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- checkpoints
def _fsync_file(path: str):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def find(out: str) -> tuple[str, str] | None:
    """(weights directory, trainer state file) of the newest complete save in OUT, or None. Reads only.
    Older layouts kept trainer_state.pt inside checkpoint/ (or .tmp/.old after a kill): read too."""
    ck, st = os.path.join(out, CKPT), os.path.join(out, STATE)
    if os.path.isfile(st + ".tmp"):  # a save was complete on disk, its renames cut short
        return (ck + ".tmp" if os.path.isdir(ck + ".tmp") else ck), st + ".tmp"
    if os.path.isfile(st) and os.path.isdir(ck):
        return ck, st
    for d in (ck + ".tmp", ck, ck + ".old"):  # the older layout, newest first
        if os.path.isfile(os.path.join(d, STATE)):
            return d, os.path.join(d, STATE)
    return None


def saved_step(out: str) -> int:
    """The step of OUT's newest complete save (0 without one)."""
    found = find(out)
    return torch.load(found[1], weights_only=False, map_location="cpu")["step"] if found else 0


def recover(out: str):
    """Finish the renames of a save a kill cut short (the lock must be held), drop incomplete leftovers."""
    ck, st = os.path.join(out, CKPT), os.path.join(out, STATE)
    if os.path.isfile(st + ".tmp"):
        if os.path.isdir(ck + ".tmp"):
            M.replace_dir(ck + ".tmp", ck)
        os.replace(st + ".tmp", st)
        M.fsync_dir(out)
    if os.path.isfile(st):  # anything else is a save that never completed
        for junk in (ck + ".tmp", ck + ".old"):
            shutil.rmtree(junk, ignore_errors=True)


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
    ck, st = os.path.join(out, CKPT), os.path.join(out, STATE)
    shutil.rmtree(ck + ".tmp", ignore_errors=True)
    M.write_model(model, tok, ck + ".tmp", dtype, weights)
    state = {**state, "rng": torch.get_rng_state()}
    if dtype is not None and dtype != model.dtype:  # exact resume needs the master weights checkpoint/ rounds
        full = weights or dict(model.named_parameters())
        state["master"] = {n: full[n].detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(state, st + ".partial")
    _fsync_file(st + ".partial")
    os.replace(st + ".partial", st + ".tmp")  # from here on the new pair counts as complete
    M.fsync_dir(out)
    recover(out)


def resume_point(out: str) -> tuple[str, str] | None:
    """Finish OUT's interrupted save if any (the lock must be held: rank 0 does it); then `find`, on every rank."""
    return P.on_main(_recover_and_find, out)


def _recover_and_find(out: str):
    recover(out)
    return find(out)


def load_state(found: tuple[str, str], model) -> dict:
    """The trainer state of a `find` result; puts back the master weights (into the whole model: before
    FSDP shards it) and the RNG. Every rank reads it."""
    state = torch.load(found[1], weights_only=False, map_location="cpu")
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
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    M.fsync_dir(out)
    return path


def log(path: str, row: dict):
    """Append a row (rank 0 writes; every rank calls it)."""
    P.on_main(_append, path, row)


def _append(path: str, row: dict):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


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
