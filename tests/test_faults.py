"""Faults and bad input (issue 13; issue 11 part 7; issue 25: test_13-17): kills at named moments (a real
kill -9 of a subprocess), NaN, two runs on one folder, reruns, damaged trainer state, full disks, I/O errors,
bad arguments: each ends in a resumable run or one clear line."""
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import eval as ev
import model as M
import rundir
import train_rl
import train_sft
from test_benchmarks import write_tsv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL = ["--prompts", "2", "--group", "4", "--max-new-tokens", "12", "--latent-steps", "3", "--lr", "1e-3", "--temperature", "1.0",
      "--eval-every", "0"]
SFT = ["--batch-size", "4", "--n-val", "4", "--eval-every", "0"]


@pytest.fixture(scope="module")
def init(tmp_path_factory, tiny):
    path = str(tmp_path_factory.mktemp("init") / "checkpoint")
    M.save_checkpoint(*tiny, path)
    return path


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def weights(out):
    return load_file(os.path.join(out, "checkpoint", "model.safetensors"))


SAME_THREADS = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # bitwise-equal runs need equal thread counts


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def kill_at(tmp_path, script, argv, target, match=(), n=1, after=False):
    """Run `script`.main(argv) in a subprocess; at the n-th call of `target` ('module.attr') whose arguments
    contain every string in `match` it signals and waits (before the call, or `after` it); the test then
    kills it with kill -9."""
    marker = tmp_path / f"at-{time.time_ns()}"
    code = f"""
import importlib, sys, time
sys.path.insert(0, {ROOT!r})
mod, attr = {target!r}.rsplit('.', 1)
m = importlib.import_module(mod)
real, calls = getattr(m, attr), []
def stop(*a, **k):
    hit = all(s in repr(a) for s in {list(match)!r}) and not calls.append(1) and len(calls) == {n}
    r = real(*a, **k) if {after!r} or not hit else None
    if hit:
        open({str(marker)!r}, 'w').close()
        time.sleep(600)
    return r if {after!r} or not hit else real(*a, **k)
setattr(m, attr, stop)
import {script}
{script}.main({argv!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=SAME_THREADS,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"never reached {target}: " + proc.stderr.read().decode()[-2000:])
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def refused_beside_a_paused_run(module: str, fn: str, argv: list, call, marker) -> tuple[str, int]:
    """Runs `module.main(argv)` in another process with `module.fn` replaced by a pause (which first touches
    `marker`), then `call()` here while that run holds its files, then kills it: (call's SystemExit message,
    the other process's pid)."""
    code = f"""
import sys, time
sys.path.insert(0, {ROOT!r})
import {module} as mod
def paused(*a, **k):
    open({str(marker)!r}, 'w').close()
    time.sleep(600)
mod.{fn} = paused
mod.main({argv!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=SAME_THREADS,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    try:
        with pytest.raises(SystemExit) as e:
            call()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return str(e.value), proc.pid


# ------------------------------------------------------------------------------- losing work
def test_1_kill_between_the_renames_resumes_from_the_newest_save(init, tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = ["--model", init, "--steps", "6", "--save-every", "3"] + RL
    train_rl.main(args + ["--out", full])
    # the second save's rename of checkpoint.tmp/ -> checkpoint/, after checkpoint/ -> checkpoint.old/
    kill_at(tmp_path, "train_rl", args + ["--out", part], "os.replace", ["checkpoint.tmp"], n=2)
    assert not os.path.exists(os.path.join(part, "checkpoint"))
    before = rows(part)
    assert [r["step"] for r in before] == [1, 2, 3, 4, 5, 6]
    train_rl.main(args + ["--out", part, "--resume"])
    assert "at step 6" in capsys.readouterr().out
    assert rows(part) == before  # nothing trained again, no row lost
    assert same_weights(full, part)
    assert sorted(os.listdir(part)) == ["checkpoint", "log.jsonl", "run.lock", "trainer_state.pt"]


def test_2_kill_inside_the_log_rewrite_loses_no_row(init, tmp_path):
    out = str(tmp_path / "r")
    args = ["--model", init, "--out", out, "--save-every", "2"] + RL
    train_rl.main(args + ["--steps", "2"])
    before = rows(out)
    kill_at(tmp_path, "train_rl", args + ["--steps", "3", "--resume"], "builtins.open", ["log.jsonl", "'w'"], after=True)
    assert rows(out) == before
    train_rl.main(args + ["--steps", "3", "--resume"])
    assert rows(out)[:2] == before and [r["step"] for r in rows(out)] == [1, 2, 3]


def test_2_torn_last_log_line_is_dropped_with_one_line(init, tmp_path, capsys):
    out = str(tmp_path / "r")
    args = ["--model", init, "--out", out, "--save-every", "1"] + RL
    train_rl.main(args + ["--steps", "1"])
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"step": 2, "rew')  # power loss mid-row
    train_rl.main(args + ["--steps", "2", "--resume"])
    said = [line for line in capsys.readouterr().out.splitlines() if "torn last line" in line]
    assert len(said) == 1 and "log.jsonl" in said[0]
    assert [r["step"] for r in rows(out)] == [1, 2]


def test_3_second_run_on_a_busy_folder_is_refused_and_a_killed_one_does_not_block(init, tmp_path):
    out = str(tmp_path / "r")
    args = ["--model", init, "--out", out, "--steps", "2", "--save-every", "1"] + RL
    marker_args = args + ["--seed", "1"]
    # first run: paused inside its first step, holding the folder
    msg, pid = refused_beside_a_paused_run("train_rl", "grpo_step", marker_args, lambda: train_rl.main(args), tmp_path / "busy")
    assert out in msg and str(pid) in msg and len(msg.splitlines()) == 1
    train_rl.main(args + ["--resume"])  # the dead run's lock does not block
    assert [r["step"] for r in rows(out)] == [1, 2]


def test_4_base_killed_after_its_last_save_gets_its_table(tmp_path):
    base, out = str(tmp_path / "base"), str(tmp_path / "sft")
    args = ["--base-steps", "1", "--steps", "1", "--base", base, "--out", out] + SFT
    kill_at(tmp_path, "train_sft", args, "train_sft.final_eval")
    assert rundir.saved_step(base) == 1 and not os.path.exists(os.path.join(base, "eval_val.json"))
    train_sft.main(args + ["--resume"])
    assert os.path.isfile(os.path.join(base, "eval_val.json")) and os.path.isfile(os.path.join(out, "eval_val.json"))


def test_5_resume_with_other_options_says_what_differs_and_refuses_a_new_data_order(init, tmp_path, capsys):
    out = str(tmp_path / "r")
    args = ["--model", init, "--out", out, "--save-every", "1"] + RL
    train_rl.main(args + ["--steps", "1"])
    with pytest.raises(SystemExit) as e:
        train_rl.main(args + ["--steps", "2", "--resume", "--prompts", "3"])
    assert "--prompts 3" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert [r["step"] for r in rows(out)] == [1]
    capsys.readouterr()
    train_rl.main(args + ["--steps", "2", "--resume", "--lr", "2e-3", "--group", "3"])
    said = [line for line in capsys.readouterr().out.splitlines() if "changed options" in line]
    assert len(said) == 1 and "--lr 0.001 -> 0.002" in said[0] and "--group 4 -> 3" in said[0]


# ------------------------------------------------------------------------------------------ NaN
class NanGrad(torch.autograd.Function):
    """Identity forward (a finite loss), NaN backward."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_6_nan_gradients_skip_the_step_and_never_reach_a_checkpoint(init, tmp_path, monkeypatch):
    real, calls = train_rl.policy_loss, []

    def nan_first(*a, **k):
        loss, stats = real(*a, **k)
        calls.append(1)
        return (NanGrad.apply(loss) if len(calls) == 1 else loss), stats

    monkeypatch.setattr(train_rl, "policy_loss", nan_first)
    out = str(tmp_path / "r")
    with pytest.warns(UserWarning, match="non-finite gradients"):
        train_rl.main(["--model", init, "--out", out, "--steps", "2"] + RL)
    log = rows(out)
    assert [r["skipped"] for r in log] == [True, False] and log[1]["skips"] == 1
    assert all(torch.isfinite(v).all() for v in weights(out).values())
    # every step skipped: SFT stops with one line and writes no checkpoint
    real_sft = train_sft.sft_step
    monkeypatch.setattr(train_sft, "sft_step", lambda *a, **k: {**(r := real_sft(*a, **k)), "loss": NanGrad.apply(r["loss"])})
    base = str(tmp_path / "base")
    with pytest.warns(UserWarning), pytest.raises(SystemExit) as e:
        train_sft.main(["--base", base, "--base-steps", "3", "--steps", "1", "--out", str(tmp_path / "sft")] + SFT)
    assert "skipped" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert [r["skipped"] for r in rows(base)] == [True] * 3 and not os.path.exists(os.path.join(base, "checkpoint"))
    m, tok = M.load_model(init)
    with torch.no_grad():
        next(m.parameters())[0, 0] = float("nan")
    with pytest.raises(rundir.RunError, match="NaN"):
        rundir.save(str(tmp_path / "nan"), m, tok, {"step": 1})


def test_7_nan_weights_are_refused_at_load_with_one_line(init, tmp_path):
    bad = tmp_path / "bad"
    M.save_checkpoint(*M.load_model(init), str(bad))
    w = load_file(str(bad / "model.safetensors"))
    name = sorted(w)[3]
    w[name].view(-1)[0] = float("inf")
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(M.ModelLoadError) as e:
        M.load_model(str(bad))
    assert str(bad) in str(e.value) and name in str(e.value)
    with pytest.raises(SystemExit) as e:
        train_rl.main(["--model", str(bad), "--out", str(tmp_path / "r"), "--steps", "1"] + RL)
    assert name in str(e.value) and len(str(e.value).splitlines()) == 1


# ------------------------------------------------------------------------------------ one line
def test_8_io_errors_are_one_line_and_eval_writes_as_it_goes(init, tmp_path, monkeypatch, samples):
    import transformers.modeling_utils as mu

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", a[1] if len(a) > 1 else "?")

    with monkeypatch.context() as mp:
        mp.setattr(mu, "safe_save_file", full)
        with pytest.raises(SystemExit) as e:
            train_rl.main(["--model", init, "--out", str(tmp_path / "full"), "--steps", "1"] + RL)
    assert "No space left on device" in str(e.value) and len(str(e.value).splitlines()) == 1
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit) as e:
        train_rl.main(["--model", init, "--out", str(afile), "--steps", "1"] + RL)
    assert str(afile) in str(e.value) and len(str(e.value).splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", init, "--n", "2", "--out", str(tmp_path / "missing" / "r.json")])
    assert "missing" in str(e.value) and len(str(e.value).splitlines()) == 1
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: real(*a, **k) if k["mode"] == "normal" else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ev.main(["--model", init, "--n", "2", "--max-new-tokens", "4", "--compare", "--force-latents",  # spans: every arm decodes
                 "--out", str(tmp_path / "e.json")])
    assert list(json.load(open(tmp_path / "e.json"))["summaries"]) == ["normal"]  # the first mode was kept


NO_GPU = [] if torch.cuda.is_available() else [["--device", "cuda"]]
BAD_ANY = [["--device", "foo"], ["--device", "cuda:99"]] + NO_GPU  # issue 25
BAD_RL = [["--group", "1"], ["--sigma", "0"], ["--temperature", "0"], ["--save-every", "0"], ["--ppo-epochs", "0"],
          ["--max-new-tokens", "0"], ["--att-layers", "a"], ["--top-p", "0"], ["--prompts", "0"], ["--steps", "0"],
          ["--lr", "-1"], ["--clip-grad", "-1"], ["--warmup", "-5"], ["--beta", "-1"], ["--eval-every", "-1"],
          ["--n-eval", "0"], ["--eval-every", "5", "--data", "requirements.txt"], ["--top-p", "1.5"], ["--clip-low", "1"],
          ["--clip-high", "-0.1"], ["--dual-clip", "0.5"], ["--att-weight", "-1"], ["--len-weight", "nan"],
          ["--max-group-acc", "1.1"], ["--evidence-eta", "2"], ["--evidence-margin", "-1"], ["--data", "missing.jsonl"],
          ["--data", "tests"]] + BAD_ANY
BAD_SFT = [["--latent-steps", "0"], ["--save-every", "0"], ["--batch-size", "0"], ["--steps", "0"],
           ["--lr", "-1"], ["--warmup", "-5"], ["--n-val", "0"], ["--n-val", "-5"], ["--max-pixels", "-1"],
           ["--min-lr", "-0.5"], ["--lam", "-1"], ["--point-weight", "-1"], ["--latent-fraction", "1.5"],
           ["--val-fraction", "1"], ["--data", "missing.jsonl"]] + BAD_ANY
BAD_EVAL = [["--n", "0"], ["--temperature", "-1"], ["--max-pixels", "-1"], ["--top-p", "2"]] + BAD_ANY


@pytest.mark.parametrize("main,bad", [(train_rl.main, b) for b in BAD_RL] + [(train_sft.main, b) for b in BAD_SFT]
                         + [(ev.main, b) for b in BAD_EVAL])
def test_11_bad_arguments_are_one_line_naming_the_option(main, bad, tmp_path, capsys):
    out = str(tmp_path / "never-written")
    with pytest.raises(SystemExit) as e:  # a missing --model: a check that is not made fails fast anyway
        main(bad + ["--out", out, "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "error: argument " + bad[0] in err[-1]
    assert not os.path.exists(out)


def test_11_checks_that_need_the_model_or_the_data(init, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_rl.main(["--model", init, "--out", str(tmp_path / "r"), "--att-layers", "9"] + RL)
    assert "--att-layers 9" in str(e.value) and len(str(e.value).splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", init, "--n", "2", "--route", "bogus", "--out", str(tmp_path / "e.json")])
    assert "--route" in str(e.value) and "bogus" in str(e.value)
    out = tmp_path / "tsv.json"
    ev.main(["--model", init, "--bench", "tsv", "--bench-root", write_tsv(tmp_path / "b.tsv"), "--n=1",
             "--max-new-tokens", "4", "--out", str(out)])
    assert json.load(open(out))["summaries"]["normal"]["overall"]["n"] == 1


def test_12_failed_model_load_leaves_no_out_folder(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        train_rl.main(["--model", str(tmp_path / "nothing"), "--out", str(out), "--steps", "1"] + RL)
    assert "nothing" in str(e.value) and not out.exists()


# ------------------------------------------------------------------------------ issue 11 part 7
def test_checkpoint_is_a_clean_release_in_the_loaded_dtype_and_resume_stays_exact(tiny, tmp_path):
    init = str(tmp_path / "bf16")
    M.save_checkpoint(*tiny, init, dtype=torch.bfloat16)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = ["--model", init, "--save-every", "1"] + RL
    train_rl.main(args + ["--out", full, "--steps", "2"])
    train_rl.main(args + ["--out", part, "--steps", "1"])
    train_rl.main(args + ["--out", part, "--steps", "2", "--resume"])
    ck = os.path.join(full, "checkpoint")
    assert not any(n.startswith("trainer_state") or n.endswith(".pt") for n in os.listdir(ck))
    assert json.load(open(os.path.join(ck, "config.json")))["dtype"] == "bfloat16"
    assert {v.dtype for v in weights(full).values()} == {torch.bfloat16}
    a, b = (torch.load(os.path.join(d, "trainer_state.pt"), weights_only=False) for d in (full, part))
    assert a["master"].keys() == b["master"].keys() and all(torch.equal(a["master"][k], b["master"][k]) for k in a["master"])
    assert a["master"][next(iter(a["master"]))].dtype == torch.float32
    assert same_weights(full, part) and rows(full)[1]["loss"] == rows(part)[1]["loss"]


# ----------------------------------------------------------------------------------- issue 25
def listing(out):
    """Every file under OUT with its bytes."""
    return {os.path.relpath(os.path.join(d, n), out): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(out) for n in names if n != "run.lock"}


def killed_after_a_mark(tmp_path, args, out):
    """Run `args` into OUT, killed -9 once its second save's trainer_state.pt.tmp is complete, before any
    rename: checkpoint/ + trainer_state.pt of step 3, checkpoint.tmp/ + trainer_state.pt.tmp of step 6."""
    kill_at(tmp_path, "train_rl", args + ["--out", out], "os.replace", ["trainer_state.pt.partial"], n=2, after=True)
    assert {"checkpoint", "checkpoint.tmp", "trainer_state.pt", "trainer_state.pt.tmp"} <= set(os.listdir(out))


def test_13_rerun_without_resume_is_refused_and_a_stale_mark_never_takes_a_folder(init, tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = ["--model", init, "--steps", "6", "--save-every", "3"] + RL
    train_rl.main(args + ["--out", full])
    killed_after_a_mark(tmp_path, args, part)
    before = listing(part)
    # the same command again, without --resume: one line naming the folder, nothing touched
    with pytest.raises(SystemExit) as e:
        train_rl.main(args + ["--out", part])
    msg = str(e.value)
    assert part in msg and "--resume" in msg and "--overwrite" in msg and len(msg.splitlines()) == 1
    assert listing(part) == before
    # what that rerun did before the fix, killed inside its first save: a half-written checkpoint.tmp/ of
    # other weights beside the stale trainer_state.pt.tmp, which --resume then renamed over checkpoint/
    tmp = os.path.join(part, "checkpoint.tmp")
    for name in os.listdir(tmp):
        if name != "config.json":
            os.remove(os.path.join(tmp, name))
    save_file(weights(part), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    train_rl.main(args + ["--out", part, "--resume"])
    said = capsys.readouterr().out
    assert said.count("trainer_state.pt.tmp belongs to no checkpoint folder") == 1 and "at step 3" in said
    assert [r["step"] for r in rows(part)] == [1, 2, 3, 4, 5, 6] and same_weights(full, part)
    assert sorted(os.listdir(part)) == ["checkpoint", "log.jsonl", "run.lock", "trainer_state.pt"]
    # --overwrite starts over: the old files go, the new run is the uninterrupted one
    with open(os.path.join(part, "log.jsonl"), "a") as f:
        f.write('{"step": 99}\n')
    train_rl.main(args + ["--out", part, "--overwrite"])
    assert [r["step"] for r in rows(part)] == [1, 2, 3, 4, 5, 6] and same_weights(full, part)
    # train_sft refuses such a folder before it trains anything (here: the base model first)
    base, out = tmp_path / "base", tmp_path / "sft"
    out.mkdir()
    (out / "log.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:
        train_sft.main(["--base-steps", "1", "--steps", "1", "--base", str(base), "--out", str(out)] + SFT)
    assert str(out) in str(e.value) and "--overwrite" in str(e.value) and not base.exists()


def test_14_damaged_trainer_state_is_one_line_and_the_previous_pair_is_used(init, tmp_path, capsys):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = ["--model", init, "--steps", "6", "--save-every", "3"] + RL
    train_rl.main(args + ["--out", full])
    killed_after_a_mark(tmp_path, args, part)
    mark = os.path.join(part, "trainer_state.pt.tmp")
    os.truncate(mark, os.path.getsize(mark) // 2)  # a damaged mark must not be renamed over the good pair
    capsys.readouterr()
    train_rl.main(args + ["--out", part, "--resume"])
    said = [line for line in capsys.readouterr().out.splitlines() if " is damaged" in line]
    assert len(said) == 1 and mark in said[0] and "resuming from" in said[0]
    assert [r["step"] for r in rows(part)] == [1, 2, 3, 4, 5, 6] and same_weights(full, part)
    # the only trainer state damaged: one line naming it, and the folder is left as it was
    state = os.path.join(part, "trainer_state.pt")
    os.truncate(state, os.path.getsize(state) // 2)
    before = listing(part)
    with pytest.raises(SystemExit) as e:
        train_rl.main(args + ["--out", part, "--steps", "9", "--resume"])
    assert state in str(e.value) and " is damaged" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert listing(part) == before


def limited(script, argv, limit):
    """script.main(argv) in a subprocess whose files cannot grow past `limit` bytes (RLIMIT_FSIZE: a write
    beyond it fails as on a full disk, through the same code paths; no mount, no root needed)."""
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import {script}; {script}.main({argv!r})"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=SAME_THREADS, capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))


@pytest.mark.parametrize("full_at", ["trainer_state.pt", "checkpoint", "log.jsonl", "eval"])
def test_15_full_disk_is_one_line_naming_the_file_and_keeps_the_previous_save(init, tmp_path, full_at):
    out = str(tmp_path / "r")
    args = ["--model", init, "--out", out, "--save-every", "1"] + RL
    train_rl.main(args + ["--steps", "1"])
    size = {n: os.path.getsize(os.path.join(out, n)) for n in ("trainer_state.pt", "log.jsonl")}
    size["checkpoint"] = os.path.getsize(os.path.join(out, "checkpoint", "model.safetensors"))
    if full_at == "eval":
        res_file = tmp_path / "e.json"
        res_file.write_text('{"earlier": "results"}')
        res = limited("eval", ["--model", init, "--n", "2", "--max-new-tokens", "4", "--out", str(res_file)], 100)
        named, before, folder = str(res_file), {"e.json": res_file.read_bytes()}, str(tmp_path)
    else:
        before = listing(out)
        limit = {"trainer_state.pt": (size["checkpoint"] + size["trainer_state.pt"]) // 2,  # the weights fit, the state not
                 "checkpoint": size["checkpoint"] // 2, "log.jsonl": size["log.jsonl"] // 2}[full_at]
        res = limited("train_rl", args + ["--steps", "2", "--resume"], limit)
        named, folder = os.path.join(out, full_at), out
    err = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert err[-1].startswith("error: " + named), err[-1]
    left = [n for _, dirs, names in os.walk(folder) for n in dirs + names if n.endswith((".tmp", ".partial", ".json.lock"))]
    assert left == []
    if full_at == "eval":
        assert res_file.read_bytes() == before["e.json"]
        return
    after = listing(out)
    assert {k: v for k, v in after.items() if k != "log.jsonl"} == {k: v for k, v in before.items() if k != "log.jsonl"}
    train_rl.main(args + ["--steps", "2", "--resume"])  # room again: it goes on from the kept save
    assert [r["step"] for r in rows(out)] == [1, 2]


def test_16_a_data_file_of_numbers_is_one_line_naming_it(init, tmp_path):
    numbers = tmp_path / "numbers.json"
    numbers.write_text("[1, 2, 3]")
    for main, argv in ((train_sft.main, ["--model", init]), (train_rl.main, ["--model", init, "--steps", "1"] + RL)):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--data", str(numbers), "--out", str(tmp_path / "r")])
        assert str(numbers) in str(e.value) and "row 0" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_16_base_a_file_is_one_line_naming_base(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit):
        train_sft.main(["--base", str(afile), "--out", str(tmp_path / "sft")] + SFT)
    err = capsys.readouterr().err.strip().splitlines()
    assert "argument --base" in err[-1] and str(afile) in err[-1]


def test_16_eval_out_a_folder_is_one_line_before_evaluating(init, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", init, "--n", "2", "--out", str(tmp_path)])
    assert "--out" in str(e.value) and str(tmp_path) in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not os.path.exists(str(tmp_path) + ".tmp")


def test_17_two_evals_on_one_results_file_the_second_is_refused(init, tmp_path):
    res_file = str(tmp_path / "e.json")
    argv = ["--model", init, "--n", "2", "--max-new-tokens", "4", "--out", res_file]
    msg, pid = refused_beside_a_paused_run("eval", "evaluate", argv, lambda: ev.main(argv), tmp_path / "evaluating")
    assert res_file in msg and str(pid) in msg and len(msg.splitlines()) == 1
    assert not os.path.exists(res_file)
    ev.main(argv)  # the killed one's lock does not block; the lock file goes at the end
    assert json.load(open(res_file))["summaries"]["normal"]["overall"]["n"] == 2
    assert sorted(os.listdir(tmp_path)) == ["e.json", "evaluating"]
