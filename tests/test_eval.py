"""eval.py: modes and routing do what they claim, intervals, paired differences, benchmarks, plots, errors."""
import argparse
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import edits
import eval as ev
import summary
import lvr
import model as M


@pytest.fixture(scope="module")
def questions():
    return [data.make_sample(0, "test", i) for i in range(10)]  # two of each type


def test_wilson_and_paired_on_known_cases():
    lo, hi = summary.wilson(50, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.404, 0.596)
    assert summary.wilson(0, 10)[0] == 0 and summary.wilson(10, 10)[1] == 1
    d = summary.paired([True, False, True, False], [True, True, True, False])
    assert d["diff"] == 0.25 and d["ci95"] == pytest.approx([0.25 - 0.49, 0.25 + 0.49])
    assert summary.across_seeds([0.01, 0.02, 0.03]) == pytest.approx([0.02 - 4.303 * 0.01 / 3 ** 0.5, 0.02 + 4.303 * 0.01 / 3 ** 0.5])
    assert summary.across_seeds([0.05]) is None  # one seed: no spread to estimate
    assert [round(summary.t975(d), 3) for d in (1, 30, 40, 120)] == [12.706, 2.042, 2.021, 1.980]  # t tables


@pytest.mark.parametrize("route, want", [("all", 1.0), ("none", 0.0)])
def test_forcing_sets_the_latent_rate(tiny, questions, route, want):
    m, tok = tiny
    s = summary.summarize(ev.evaluate(m, tok, questions, route=route, max_new_tokens=12, latent_steps=2, progress=False))
    assert s["overall"]["latent_rate"] == want
    assert (s["overall"]["att_share"] is None) == (want == 0)


def test_route_forces_per_type(tiny, questions):
    m, tok = tiny
    s = summary.summarize(ev.evaluate(m, tok, questions, route="count,size", max_new_tokens=12, latent_steps=2,
                                 batch_size=4, progress=False))
    assert {t: v["latent_rate"] for t, v in s["per_type"].items()} == \
        {"position": 0, "count": 1, "attribute": 0, "size": 1, "distance": 0}


def test_drop_and_noise_keep_the_questions_and_change_the_latents(tiny, questions):
    m, tok = tiny
    kw = dict(route="all", max_new_tokens=12, latent_steps=3, progress=False)
    runs = {mode: ev.evaluate(m, tok, questions, mode=mode, **kw) for mode in ("normal", "drop", "noise", "noise_norm")}
    out = summary.compare(runs)
    assert set(out["drop"]["vs_normal"]) == {"overall", *data.QTYPES}
    assert all(r["att_share"] is None or r["att_share"] == 0 for r in runs["drop"])  # no latent keys to attend to
    assert all(r["att_share"] > 0 for r in runs["normal"])
    assert [r["id"] for r in runs["noise"]] == [r["id"] for r in runs["normal"]]
    assert "vs normal" in summary.table(out)


def test_cli_compare_writes_json(tiny_ckpt, tmp_path, capsys):
    out = str(tmp_path / "res.json")
    ev.main(["--model", tiny_ckpt, "--n", "6", "--compare", "--max-new-tokens", "12", "--out", out])
    res = json.load(open(out))
    arms = {"normal", "drop", "noise", "noise_norm", "zero", "repeat", "shuffle", "oracle", "K=0", "K=2", "K=4", "K=16",
            "blind", "blind+drop", "blind+oracle", "edit", "blind+edit", "donor", "donor-k4", "blind+donor", "force", "never"}
    assert set(res["summaries"]) == arms
    assert res["summaries"]["force"]["overall"]["latent_rate"] == 1.0 and res["summaries"]["never"]["overall"]["latent_rate"] == 0.0
    assert {"paired_flip", "false_flip", "edited_acc"} <= set(res["summaries"]["edit"]["flip"])
    assert "flip" in res["summaries"]["blind+edit"] and "lift" in res["summaries"]["donor-k4"]["donor"]
    recs = res["records"]
    assert [r["correct"] for r in recs["K=0"]] == [r["correct"] for r in recs["drop"]]  # K=0 is the markers-only arm
    assert res["summaries"]["noise"]["vs_normal"]["overall"]["n"] == 6
    assert len(res["records"]["normal"]) == 6
    assert "| mode |" in capsys.readouterr().out


def test_cli_on_a_benchmark_fixture(tiny_ckpt, tmp_path):
    """CV-Bench layout: test.jsonl + img/; answers scored per question."""
    root = tmp_path / "cvbench"
    (root / "img" / "2D").mkdir(parents=True)
    rows = []
    for i in range(3):
        Image.fromarray(np.full((64, 80, 3), 40 * i, dtype=np.uint8)).save(root / "img" / "2D" / f"{i}.png")
        rows.append({"idx": i, "type": "2D", "task": "Count", "image": f"img/2D/{i}.png", "source": "ade20k",
                     "question": "How many chairs are in the image?", "choices": ["1", "2", "3"], "answer": "(B)"})
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "cv.json")
    ev.main(["--model", tiny_ckpt, "--bench", "cvbench", "--bench-root", str(root), "--max-new-tokens", "8", "--out", out])
    res = json.load(open(out))
    recs = res["records"]["normal"]
    assert [r["answer"] for r in recs] == ["B", "B", "B"]
    assert res["summaries"]["normal"]["overall"]["acc"] == sum(r["pred"] == "B" for r in recs) / 3


def test_cli_errors_are_one_line(tiny_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="--bench needs --bench-root"):
        ev.main(["--model", tiny_ckpt, "--bench", "mmvp"])
    with pytest.raises(SystemExit, match="file not found"):
        ev.main(["--model", tiny_ckpt, "--bench", "mmvp", "--bench-root", str(tmp_path)])
    with pytest.raises(SystemExit, match="model path not found"):
        ev.main(["--model", str(tmp_path / "nothing")])


def test_results_of_a_shipped_model_stay_out_of_its_committed_folder(tmp_path, monkeypatch):
    """eval.py's default results file: beside a trained model, but never inside checkpoints/ (committed)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "small-vl-hard-sft").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "checkpoint").mkdir(parents=True)
    args = lambda model: argparse.Namespace(out=None, bench=None, split="test", model=model)  # noqa: E731
    shipped = ev.output_path(args(os.path.join("checkpoints", "small-vl-hard-sft")))
    assert shipped == os.path.join("runs", "eval_small-vl-hard-sft_test.json") and os.path.isdir("runs")
    assert ev.output_path(args(os.path.join("runs", "r", "checkpoint"))) == os.path.join("runs", "r", "checkpoint", "eval_test.json")
    (tmp_path / "checkpoints" / "r2" / "checkpoint").mkdir(parents=True)  # named after its run, not "checkpoint"
    assert ev.output_path(args(os.path.join("checkpoints", "r2", "checkpoint"))) == os.path.join("runs", "eval_r2_test.json")


def test_newest_checkpoint_prefers_rl(tmp_path, monkeypatch):
    """RL (newest first), else the SFT run here, else the shipped LVR SFT model, else one line."""
    monkeypatch.chdir(tmp_path)  # no shipped checkpoints/ here
    with pytest.raises(FileNotFoundError, match="no small-vl checkpoint"):
        ev.newest_checkpoint("runs")
    (tmp_path / "checkpoints" / "small-vl-sft").mkdir(parents=True)  # the easy task's: not the default's
    with pytest.raises(FileNotFoundError, match="no small-vl checkpoint"):
        ev.newest_checkpoint("runs")
    (tmp_path / "checkpoints" / "small-vl-hard-sft").mkdir(parents=True)
    assert ev.newest_checkpoint("runs") == os.path.join("checkpoints", "small-vl-hard-sft")
    (tmp_path / "runs" / "small-vl-sft" / "checkpoint").mkdir(parents=True)
    assert ev.newest_checkpoint("runs").endswith(os.path.join("small-vl-sft", "checkpoint"))
    (tmp_path / "runs" / "small-vl-rl-att" / "checkpoint").mkdir(parents=True)
    assert ev.newest_checkpoint("runs").endswith(os.path.join("small-vl-rl-att", "checkpoint"))


def test_plot_writes_a_png_or_says_what_is_missing(tmp_path):
    logs = []
    for name, slope in (("small-vl-rl", 0.0), ("small-vl-rl-att", 0.01)):
        (tmp_path / name).mkdir()
        path = tmp_path / name / "log.jsonl"
        path.write_text("".join(json.dumps({"step": i + 1, "reward": 0.5 + slope * i, "acc": 0.4, "latent_rate": 0.9 - 0.01 * i,
                                            "att_share": 0.1 + slope * i}) + "\n" for i in range(30)))
        logs.append(str(path))
    for seed in (0, 1):  # a study's copies (RUN-sSEED_log.jsonl): validation rows and zero_spread
        path = tmp_path / f"rl-att-s{seed}_log.jsonl"
        path.write_text("".join(json.dumps({"step": i, "val_acc": 0.5, "val_never_acc": 0.4}) + "\n" + json.dumps(
            {"step": i + 1, "reward": 0.5, "acc": 0.4, "latent_rate": 0.9, "att_share": 0.1, "zero_spread": 0.5}) + "\n"
            for i in range(30)))
        logs.append(str(path))
    assert [ev.run_group(ev.run_name(p)) for p in logs] == ["small-vl-rl", "small-vl-rl-att", "rl-att", "rl-att"]
    assert ev.run_group("rl-strict") == "rl-strict" and ev.run_group("rl-att-strict-s2") == "rl-att-strict"
    png = str(tmp_path / "plots" / "curves.png")  # its folder is made
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(SystemExit, match="needs matplotlib"):
            ev.main(["--plot", *logs, "--plot-out", png])
    else:
        ev.main(["--plot", *logs, "--plot-out", png])
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "sft.jsonl"
    bad.write_text(json.dumps({"step": 1, "ce": 1.0}) + "\n")
    if importlib.util.find_spec("matplotlib") is not None:
        with pytest.raises(SystemExit, match="no train_rl.py rows"):
            ev.main(["--plot", str(bad), "--plot-out", png])


def test_bench_counts_tokens_up_to_the_first_eos():
    """A pad id sampled as text mid-reply is a generated token; what follows the first EOS is not."""
    import bench
    pad, eos, a, b = 0, 9, 5, 6
    seqs = torch.tensor([[a, pad, b, eos, pad, pad], [a, a, a, a, a, a], [eos, pad, pad, pad, pad, pad]])
    assert bench.tokens_until_eos(seqs, [eos, 8]) == 4 + 6 + 1


@pytest.mark.parametrize("arm", ["blind", "blind+oracle"])
def test_blind_arms_decode_on_the_decoder_named(tiny, samples, monkeypatch, arm):
    """--cache static decodes the image-blind arms with the static decoder (no fallback to the dynamic one),
    reply for reply as the dynamic decoder does."""
    m, tok = tiny
    calls, real = [], lvr.generate
    monkeypatch.setattr(lvr, "generate", lambda *a, **k: calls.append((k["cache"], k["blind"])) or real(*a, **k))
    recs = {c: ev.evaluate(m, tok, samples, mode=arm, route="all", latent_steps=3, max_new_tokens=10, progress=False,
                           cache=c) for c in ("static", "dynamic")}
    assert calls == [("static", True), ("dynamic", True)]
    assert [r["text"] for r in recs["static"]] == [r["text"] for r in recs["dynamic"]]


@pytest.mark.parametrize("arm", ["shuffle", "oracle"])
def test_shuffle_and_oracle_arms_feed_what_they_say(tiny, samples, monkeypatch, arm):
    """shuffle: each question is fed the latents the next question of its batch generated; oracle: its own
    stage-1 targets."""
    m, tok = tiny
    calls, real = [], lvr.generate
    monkeypatch.setattr(lvr, "generate", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    recs = ev.evaluate(m, tok, samples, mode=arm, route="all", latent_steps=3, max_new_tokens=10, progress=False)
    assert len(recs) == len(samples) and all(r["opened"] for r in recs)
    fed = calls[-1].latents[:, 1:4]
    if arm == "shuffle":
        assert len(calls) == 2 and torch.allclose(fed, calls[0].latents[:, 1:4].roll(-1, 0))
    else:
        assert torch.allclose(fed, lvr.oracle_latents(m, M.encode(m, tok, samples), samples, 3), atol=1e-6)


def test_latent_fit_against_the_stage_1_targets(tiny, samples):
    """Cosine 1 and error 0 for a rollout fed its own targets (the oracle arm); for generated latents the
    cosine, squared error and spread about the mean target written out by hand, the R^2 summarize makes of
    them, and the same figures whatever the batching. Other arms do not record the fit."""
    m, tok = tiny
    prompt = M.encode(m, tok, samples)
    t = lvr.oracle_latents(m, prompt, samples, 3)
    force = torch.ones(len(samples), dtype=torch.long)
    oracle = ev.latent_fit(m, prompt, samples, lvr.generate(m, tok, prompt, max_new_tokens=10, latent_steps=3, given=t,
                                                            force=force), 3)
    assert [f[0] for f in oracle] == pytest.approx([1.0] * len(samples), abs=1e-5)
    assert [f[1] for f in oracle] == pytest.approx([0.0] * len(samples), abs=1e-6)
    z = ev.first_span_latents(lvr.generate(m, tok, prompt, max_new_tokens=10, latent_steps=3, force=force), 3)
    mean = sum(t[i, k] for i in range(len(samples)) for k in range(3)) / (3 * len(samples))
    recs = ev.evaluate(m, tok, samples, route="all", latent_steps=3, max_new_tokens=10, progress=False)
    for i, r in enumerate(recs):
        cos, err, dev = r["latent_fit"]
        assert cos == pytest.approx(sum(float(z[i, k] @ t[i, k] / (z[i, k].norm() * t[i, k].norm())) for k in range(3)) / 3, abs=1e-5)
        assert err == pytest.approx(sum(float((z[i, k] - t[i, k]).pow(2).sum()) for k in range(3)), rel=1e-4)
        assert dev == pytest.approx(sum(float((t[i, k] - mean).pow(2).sum()) for k in range(3)), rel=1e-4)
    o = summary.summarize(recs)["overall"]
    assert o["latent_cos"] == pytest.approx(sum(r["latent_fit"][0] for r in recs) / len(recs))
    assert o["latent_r2"] == pytest.approx(1 - sum(r["latent_fit"][1] for r in recs) / sum(r["latent_fit"][2] for r in recs))
    small = ev.evaluate(m, tok, samples, route="all", latent_steps=3, max_new_tokens=10, progress=False, batch_size=2)
    assert [x for r in small for x in r["latent_fit"]] == pytest.approx([x for r in recs for x in r["latent_fit"]], rel=1e-4)
    assert all(r["latent_fit"] is None for r in ev.evaluate(m, tok, samples, mode="noise", route="all", latent_steps=3,
                                                            max_new_tokens=10, progress=False))


def test_flip_metrics_by_hand():
    base = [{"id": str(i), "pred": p, "correct": c} for i, (p, c) in enumerate([("A", True), ("B", True), ("A", False),
                                                                                ("C", True), ("D", True)])]
    edited = [{"id": "0", "pred": "B", "correct": True, "changes": True, "edit": "swap"},    # a correct flip
              {"id": "1", "pred": "B", "correct": False, "changes": True, "edit": "colour"},  # did not move
              {"id": "2", "pred": "C", "correct": True, "changes": True, "edit": "swap"},   # right only when edited
              {"id": "3", "pred": "A", "correct": False, "changes": False, "edit": "shape"},  # a false flip
              {"id": "4", "pred": "D", "correct": True, "changes": False, "edit": "remove"}]
    f = summary.flip_metrics(base, edited)
    assert f["paired_flip"]["rate"] == pytest.approx(1 / 3) and f["paired_flip"]["n"] == 3
    assert f["change_rate"]["rate"] == pytest.approx(2 / 3)
    assert f["false_flip"]["rate"] == 0.5 and f["false_flip"]["n"] == 2
    assert f["edited_acc"]["rate"] == 0.6 and f["per_edit"]["swap"]["paired_flip"]["rate"] == 0.5


def test_edit_arm_decodes_the_edited_views(tiny, questions):
    m, tok = tiny
    kw = dict(max_new_tokens=12, latent_steps=2, progress=False, route="all")
    recs = ev.evaluate(m, tok, questions, mode="edit", **kw)
    pairs = [edits.counterfactual(s, i) for i, s in enumerate(questions)]
    assert [r["answer"] for r in recs] == [p.edited.answer for p in pairs]
    assert [r["changes"] for r in recs] == [p.changes for p in pairs] and any(r["changes"] for r in recs)
    direct = ev.evaluate(m, tok, [p.edited for p in pairs], **kw)
    assert [r["text"] for r in recs] == [r["text"] for r in direct]
    out = summary.compare({"normal": ev.evaluate(m, tok, questions, **kw), "edit": recs})
    assert out["edit"]["flip"]["paired_flip"]["n"] == sum(p.changes for p in pairs)


def test_donors_share_the_template_and_offer_another_option(questions):
    qs = data.make_split("test", 60)
    got = ev.donors(qs, [True] * 60)
    assert sum(d is not None for d in got) > 30
    for i, d in enumerate(got):
        if d is None:
            continue
        own, theirs = ev.answer_text(qs[i], qs[i].answer), ev.answer_text(qs[d], qs[d].answer)
        assert ev.question_form(qs[d]) == ev.question_form(qs[i]) and d != i
        assert theirs != own and theirs in data.options_of(qs[i].question)
    assert ev.donors(qs, [i != 1 for i in range(60)])[0] != 1  # a donor must have opened a span


def test_donor_arms_feed_the_donors_latents(tiny, questions):
    """donor: all K slots are the donor's own latents; donor-k4: the first k, then the model's own states."""
    m, tok = tiny
    K, k = 6, 4
    prompt = M.encode(m, tok, questions)
    force = torch.ones(len(questions), dtype=torch.long)
    own = lvr.generate(m, tok, prompt, latent_steps=K, max_new_tokens=12, force=force)
    donor_latents = ev.first_span_latents(own, K).roll(1, 0)
    part = lvr.generate(m, tok, prompt, latent_steps=K, max_new_tokens=12, force=force, given=donor_latents[:, :k])
    assert torch.allclose(part.latents[:, 1:1 + k], donor_latents[:, :k])
    h = lvr.score_forward(m, part)
    assert torch.allclose(part.latents[:, 1 + k:1 + K], h[:, 1 + k:1 + K], atol=1e-5)  # the model's own after k
    assert not torch.allclose(part.latents[:, 1 + k:1 + K], donor_latents[:, k:K])
    recs = ev.evaluate(m, tok, questions, mode="donor-k4", route="all", max_new_tokens=12, latent_steps=K, progress=False)
    s = summary.summarize(recs)["donor"]
    assert s["lift"]["n"] == sum(r["to_donor"] is not None for r in recs) > 0
    assert all(r["to_donor"] == (r["pred"] == r["donor_answer"]) for r in recs if r["to_donor"] is not None)


def test_arms_option_runs_the_named_arms_after_normal():
    import argparse
    assert ev.arm_list("blind, edit,K=3,never") == ["blind", "edit", "K=3", "never"]
    for bad, named in (("blind,sideways", "sideways;"), ("", "'';"), ("K=x", "K=x;")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"^unknown arm\\(s\\) {named}"):
            ev.arm_list(bad)
    assert ev.split_mode("blind") == ("normal", True) and ev.split_mode("blind+oracle") == ("oracle", True)
    assert ev.split_mode("donor-k4") == ("donor-k4", False)


def test_arms_of_a_model_that_opens_no_span_are_copied_exactly(tiny, questions):
    """spanless_copy against decoding: every arm of a model whose greedy decoding opens no span (the tiny random
    model on these questions) decodes record for record as normal (blind+edit as edit), spans forbidden too;
    nothing is copied once a span opens, nor for normal and edit themselves."""
    m, tok = tiny
    kw = dict(max_new_tokens=12, latent_steps=2, batch_size=4, progress=False)
    done = {mode: ev.evaluate(m, tok, questions, mode=mode, **kw) for mode in ("normal", "edit")}
    assert not any(r["opened"] for rs in done.values() for r in rs)  # the premise
    for mode in [a for a in ev.ARMS if a not in ("normal", "edit")] + ["K=0", "K=4", "never"]:
        assert ev.spanless_copy(mode, done) == ev.evaluate(m, tok, questions, mode=mode, **kw), mode
    never = ev.evaluate(m, tok, questions, route="none", **kw)
    assert ev.spanless_copy("normal", done, forbid=True) == never == ev.evaluate(m, tok, questions, mode="never", **kw)
    assert ev.spanless_copy("normal", done) is None and ev.spanless_copy("edit", done) is None
    opened = {"normal": ev.evaluate(m, tok, questions, route="all", **kw)}
    assert opened["normal"] == ev.evaluate(m, tok, questions, mode="force", **kw)  # force: route "all", as an arm
    assert ev.spanless_copy("force", done) is None  # force opens the spans normal did not
    assert all(ev.spanless_copy(mode, opened) is None for mode in ev.ARMS + tuple(ev.ROUTE_ARMS))
