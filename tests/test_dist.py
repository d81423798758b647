"""The trainers and eval under torchrun (2 processes, gloo on the CPU) against one process."""
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import eval as ev
import rundir
import train_rl
import train_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL = ["--prompts", "4", "--group", "4", "--max-new-tokens", "16", "--latent-steps", "3", "--lr", "1e-3",
      "--temperature", "1.0", "--eval-every", "0"]
CURVE = ["--eval-every", "1", "--n-eval", "6"]  # validation rows at steps 0 and 1


def torchrun(script, args, n=2, wait=True):
    """`torchrun --standalone --nproc-per-node n -- script args` (the `--` keeps torchrun off our --n)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "--", script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def rows(path):
    return [json.loads(line) for line in open(os.path.join(path, "log.jsonl"))]


def max_diff(a, b):
    wa, wb = (load_file(os.path.join(p, "checkpoint", "model.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def one_rl(tiny_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("one") / "rl")
    train_rl.main(["--model", tiny_ckpt, "--steps", "1", "--out", out] + RL + CURVE)
    return out


@pytest.mark.parametrize("mode", [[], ["--zero"], ["--fsdp"]], ids=["ddp", "zero", "fsdp"])
def test_grpo_step_under_torchrun_equals_one_process(tiny_ckpt, one_rl, tmp_path, mode):
    """2 ranks x 2 questions = 1 process x 4 questions: the same rollouts (logged rewards, lengths, latent
    rate equal exactly), loss and weights equal to float rounding (seen: 4e-7 after the step, lr 1e-4); the
    validation rows (each rank decodes its share of the questions, rank 0 writes) as one process's."""
    out = str(tmp_path / "two")
    torchrun("train_rl.py", ["--model", tiny_ckpt, "--steps", "1", "--out", out] + RL + CURVE + mode)
    assert [(r["step"], "val_acc" in r) for r in rows(out)] == [(0, True), (1, False), (1, True)]
    for va, vb in zip(rows(one_rl)[::2], rows(out)[::2]):
        assert va.keys() == vb.keys() and all(vb[k] == (va[k] if va[k] is None else pytest.approx(va[k], abs=1e-5)) for k in va)
    a, b = rows(one_rl)[1], rows(out)[1]
    for key in ("reward", "acc", "format", "length", "latent_rate", "zero_spread", "kept_groups"):
        assert a[key] == b[key], key
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["kl"] == pytest.approx(a["kl"], abs=1e-6)
    assert b["adv_uniform"] == pytest.approx(a["adv_uniform"], abs=1e-6)  # over every rank's groups
    assert max_diff(one_rl, out) < 1e-6
    state = torch.load(os.path.join(out, rundir.STATE), weights_only=False)
    plain = torch.load(os.path.join(one_rl, rundir.STATE), weights_only=False)
    assert state["optimizer"]["state"].keys() == plain["optimizer"]["state"].keys()  # whole, plain AdamW layout


def test_uneven_split_is_a_one_line_error(tiny_ckpt, tmp_path):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--",
                          "train_rl.py", "--model", tiny_ckpt, "--steps", "1", "--out", str(tmp_path / "x"), *RL,
                          "--prompts", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0 and "error: --prompts (3) must be divisible by the number of processes (2)" in res.stderr


def two_ranks(args: list, timeout: float = 120) -> list:
    """train_rl.py as ranks 0 and 1 of one gloo group, started by hand (no torchrun agent that could stop
    rank 1 once rank 0 has failed): each rank's (return code, stderr)."""
    with socket.socket() as s:  # a free port for the group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "train_rl.py", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              stdout=subprocess.DEVNULL, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]  # stderr read while waiting: no full pipe
        return [(p.returncode, err) for p, err in zip(procs, errs)]
    finally:
        for p in procs:
            p.kill()


def test_rank0_refusals_stop_every_rank_with_one_line(tiny_ckpt, one_rl, tmp_path):
    """What only rank 0 checks (the run lock, --resume against the saved options) stops all ranks, with its
    one line said once by rank 0, instead of leaving rank 1 waiting in a collective (the 120 s timeout would fire)."""
    def run(out, *extra):
        (rc0, err0), (rc1, err1) = two_ranks(["--model", tiny_ckpt, "--steps", "1", "--out", out, *RL, *extra])
        assert rc0 == 1 and rc1 == 1, (err0[-2000:], err1[-2000:])  # rank 1 stops by itself, quietly
        assert err1.strip() == "", err1[-2000:]
        assert err0.count("error: ") == 1, err0[-2000:]
        return err0.strip().splitlines()[-1]
    busy = str(tmp_path / "busy")
    with rundir.locked(busy):  # this test process holds the folder
        assert run(busy).startswith(f"error: {busy} is in use by another run (pid {os.getpid()})")
    last = run(one_rl, "--resume", "--prompts", "2")
    assert last.startswith("error: --resume with --prompts 2 but the run used 4: that changes the data order")
    # without --resume in a folder that holds a save (issue 25)
    assert run(one_rl).startswith(f"error: {one_rl} holds a run (checkpoint, ")


def lock_free(path: str, deadline: float):
    """Wait until no process holds the run lock (the kernel drops it once the killed process is fully gone)."""
    fd = os.open(path, os.O_RDWR)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                assert time.time() < deadline, f"{path} is still held after the kill"
                time.sleep(0.05)
    finally:
        os.close(fd)


def test_killed_torchrun_run_resumes_in_one_process(tiny_ckpt, tmp_path):
    """kill -9 of the whole torchrun process group (--zero: the optimizer state consolidated on rank 0) after a
    checkpoint, then --resume in ONE process: the end state is the uninterrupted single-process run's."""
    steps, out, full = 12, str(tmp_path / "killed"), str(tmp_path / "full")
    args = ["--model", tiny_ckpt, "--steps", str(steps), "--save-every", "1"] + RL
    proc = torchrun("train_rl.py", args + ["--out", out, "--zero"], wait=False)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(out, rundir.STATE)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(workers) == 2
    deadline = time.time() + 30  # the workers (each in its own session) die with torchrun (model._die_with_parent)
    while any(os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z" for w in workers):
        assert time.time() < deadline, "torchrun's workers outlived it"
        time.sleep(0.05)
    lock_free(os.path.join(out, rundir.LOCK), deadline)  # a zombie leader's other threads may still hold its files
    done = rundir.saved_step(out)
    assert 1 <= done < steps, "the kill must land mid-run"
    train_rl.main(args + ["--out", out, "--resume"])
    train_rl.main(args + ["--out", full])
    assert [r["step"] for r in rows(out)] == list(range(1, steps + 1))
    for a, b in zip(rows(full), rows(out)):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6) and a["length"] == b["length"]
    assert max_diff(full, out) < 1e-5


def test_sft_step_under_torchrun_equals_one_process(tmp_path):
    """One stage-0 and one stage-1 step (batch 4 = 2 ranks x 2), then the validation table split over ranks."""
    sft = ["--base-steps", "1", "--steps", "1", "--batch-size", "4", "--n-val", "8", "--eval-every", "0", "--lr", "1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    train_sft.main(sft + ["--base", str(one / "base"), "--out", str(one / "sft")])
    torchrun("train_sft.py", sft + ["--base", str(two / "base"), "--out", str(two / "sft")])
    for stage in ("base", "sft"):
        assert max_diff(one / stage, two / stage) < 1e-6
        a, b = rows(one / stage)[0], rows(two / stage)[0]
        for key in ("loss", "ce", "mse", "point", "ground", "coord", "latent_share"):
            assert (key in a) == (key in b) and (key not in a or b[key] == pytest.approx(a[key], rel=1e-6)), key
    assert same_tables(json.load(open(one / "sft" / "eval_val.json")), json.load(open(two / "sft" / "eval_val.json")))


def same_tables(a, b) -> bool:
    """Equal, but floats (attention shares, latent fit: means over differently batched forwards) to 1e-6,
    absolute or relative (a latent R² of a random tiny model is in the hundreds)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tables(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_tables(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-6)
    return a == b


def test_eval_under_torchrun_equals_one_process(tiny_ckpt, tmp_path, capsys):
    """--compare with sampling (T=1) on 10 questions (5 per rank, batches of 4): the same records and table."""
    args = ["--model", tiny_ckpt, "--n", "10", "--batch-size", "4", "--max-new-tokens", "12", "--compare", "--temperature", "1.0"]
    ev.main(args + ["--out", str(tmp_path / "one.json")])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    res = torchrun("eval.py", args + ["--out", str(tmp_path / "two.json")])
    assert [line for line in res.stdout.splitlines() if line.startswith("|")] == table
    a, b = (json.load(open(tmp_path / f)) for f in ("one.json", "two.json"))
    assert same_tables(a["records"], b["records"]) and same_tables(a["summaries"], b["summaries"])
