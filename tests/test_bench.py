"""bench.py --part memory: the cell machinery (a real GRPO step in a fresh process) and the table, on a tiny
Qwen2.5-VL shape with the real vocabulary."""
import json
import re
import sys

import pytest

import bench


def test_verdict():
    assert bench.verdict(79.9) == "fits 80 GB"
    assert bench.verdict(120) == "fits 141 GB"
    assert bench.verdict(300.2) == "needs 300 GB"


def test_static_bytes_are_exact():
    s = bench.static_bytes("3b", "fp32")
    assert 3.7e9 < s["params"] < 3.8e9 and 3.0e9 < s["trained"] < 3.1e9  # Qwen2.5-VL-3B: 3.75B, vision 0.67B
    assert s["weights"] == 4 * s["params"] and s["adam"] == 2 * s["grads"] == 8 * s["trained"]
    assert bench.static_bytes("3b", "bf16")["weights"] == 2 * s["params"]
    assert 8.2e9 < bench.static_bytes("7b", "fp32")["params"] < 8.4e9  # 8.29B: untied embeddings


def test_memory_table_on_a_tiny_shape(capsys, tmp_path):
    cache = str(tmp_path / "cells.json")
    rows = bench.memory_table("cpu", shapes=("tiny",), micro_batches=(1, 4),
                              configs={"tiny": [(1, False, "fp32"), (4, False, "fp32")]}, cache=cache)
    out = capsys.readouterr().out
    measured = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| tiny |")]
    assert len(measured) == 4  # 2 micro-batches x 1 and 2 layers
    cells = json.load(open(cache))
    cell = {(c["layers"], c["micro_batch"]): c for c in cells.values()}  # bytes, not the table's rounded GB
    for layers in (1, 2):  # 4 micro-batched rollouts scored at once hold ~4x the activations of one (~60 MB more
        for phase in ("scoring", "update"):  # here); RSS noise is a few MB, so a 16 MiB margin cannot flip
            assert cell[layers, 4][phase] - cell[layers, 1][phase] > 16 * 2 ** 20, (layers, phase)
    table = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| Qwen2.5-VL-TINY |")]
    assert len(table) == len(rows) == 2 and {int(r[1]) for r in table} == {1, 4}
    for r in table:
        assert r[2].strip() == "no" and r[3].strip() == "fp32" and "extrapolated" in r[5]
        assert re.fullmatch(r" (fits 80 GB|fits 141 GB|needs \d+ GB) ", r[6])
    assert all(r[4] > 0 for r in rows)  # (rows of different micro-batches come from different cells: RSS noise)
    c1, c2 = (next(c for c in cells.values() if c["micro_batch"] == 4 and c["layers"] == d) for d in (1, 2))
    est = [bench.estimate("tiny", m, c1, c2) for m in (1, 4, 16)]
    assert est[0]["update"] < est[1]["update"] < est[2]["update"]
    assert est[0]["peak"] <= est[1]["peak"] <= est[2]["peak"]


def test_rollout_profile_reaches_the_contexts_it_is_asked_for(capsys):
    """bench.py --profile's prompts come out about as long as asked, past small-vl's 1024-image-token cap (the
    H100 run asked for 1600 and got 1203); each decoder prints a row, the static one without host syncs."""
    import bench_rollout
    import model as M
    model, tok = bench_rollout.profile_model("tiny", "cpu")
    for ctx in (300, 1600):
        length = M.encode(model, tok, bench_rollout.context_samples(model, tok, 2, ctx))["input_ids"].shape[1]
        assert abs(length - ctx) < 0.05 * ctx, (ctx, length)
    rows = bench_rollout.rollout_profile("cpu", "tiny", caches=("dynamic", "static"), contexts=(300,), batches=(8,),
                                         new_tokens=4, repeats=1, split=False)
    assert [r["path"] for r in rows] == ["dynamic", "static"] and all(abs(r["context"] - 300) < 15 for r in rows)
    assert rows[0]["syncs"] >= 1 and rows[1]["syncs"] == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| dynamic |", "| static |"))]
    assert len(table) == 2


def test_profile_split_counts_decode_steps_only():
    """The split is the difference of two profiled lengths: the prefill (vision tower, the prompt's forward)
    cancels, so every op's calls per decode step come out whole, and the labels carry host time."""
    import bench_rollout
    import model as M
    model, tok = bench_rollout.profile_model("tiny", "cpu")
    prompt = M.encode(model, tok, bench_rollout.context_samples(model, tok, 1, 200))
    for path in ("dynamic", "static"):
        sp = bench_rollout.profile_split(path, model, tok, prompt, 4, 8, "cpu")
        assert sp["top"] and all(abs(calls - round(calls)) < 1e-9 and calls >= 1 for _, _, calls in sp["top"]), sp["top"]
        assert not any("conv" in name for name, _, _ in sp["top"])  # the vision tower's patch embedding: prefill only
        assert sp["lvr.forward"][0] > 0 and sp["lvr.sample"][0] > 0 and sp["step_ms"] > 0


@pytest.mark.parametrize("argv, says", [
    (["--part", "gap", "--batches", "0"], "argument --batches: must be at least 1, got 0"),
    (["--part", "rollout", "--profile", "--new-tokens", "1"], "argument --new-tokens: must be at least 2, got 1"),
    (["--part", "grpo", "--configs", "bf16,ckpt"], "argument --configs: 'bf16,ckpt' is not PARAM_DTYPE,ckpt|no,MICRO_BATCH"),
    (["--part", "grpo", "--configs", "fp16,no,4"], "argument --configs: 'fp16,no,4' is not"),
    (["--part", "grpo", "--configs", "fp32,ckpt,0"], "argument --configs: 'fp32,ckpt,0' is not")])
def test_bad_options_are_one_line_naming_the_option(monkeypatch, capsys, argv, says):
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2 and says in capsys.readouterr().err.strip().splitlines()[-1]


def test_configs_option_parses_to_dtype_checkpointing_micro_batch():
    assert bench.grpo_config("fp32,ckpt,4") == ("fp32", True, 4) and bench.grpo_config("bf16,no,16") == ("bf16", False, 16)
