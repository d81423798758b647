"""study.py end to end on tiny settings: every model and mode evaluated, aggregates that match the
per-run files, and a rerun that only redoes what is missing."""
import json
import os
import shutil

import pytest

import data
import model as M
import study

TINY = ["--seeds", "0,1", "--base-steps", "2", "--sft-steps", "2", "--rl-steps", "1", "--n-test", "10",
        "--n-route", "10", "--sft-args", "--batch-size 4 --eval-every 0 --n-val 8",
        "--rl-args", "--prompts 2 --group 2 --n-eval 4"]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    args = TINY + ["--root", str(root / "runs"), "--results", str(root / "results")]
    study.main(args)
    return root, args


def test_study_writes_every_model_mode_and_seed(done):
    root, _ = done
    agg = json.load(open(root / "results" / "study.json"))
    assert set(agg["models"]) == set(study.MODELS)
    assert set(agg["models"]["text"]) == {"normal", "routed_types"}
    for name in study.LVR_MODELS:  # every LVR model: every arm, the edit pairs' flip metrics, the donor swap
        assert set(study.LATENT_MODES) <= set(agg["models"][name])
        assert {"blind", "blind+drop", "blind+oracle"} <= set(agg["models"][name])
        assert set(agg["models"][name]["flip"]) == {"edit", "blind+edit"}
        assert set(agg["models"][name]["flip"]["edit"]) == set(study.FLIP_KEYS)
        assert set(agg["models"][name]["donor_swap"]) == {"donor", "donor-k4", "blind+donor"}
        assert agg["models"][name]["donor"]["acc"]["seeds"] == [  # the donor arm's accuracy, kept beside the swap's metrics
            json.load(open(root / "results" / "runs" / f"{name}-s{s}.json"))["summaries"]["donor"]["overall"]["acc"] for s in (0, 1)]
    assert "evidence" in agg["models"] and "evidence - rl (normal)" in agg["paired"]
    assert "lvr-strict - lvr (blind)" in agg["paired"]
    for name in study.MODELS:
        for seed in (0, 1):
            run = json.load(open(root / "results" / "runs" / f"{name}-s{seed}.json"))
            assert all(len(v) == 10 for v in run["correct"].values())
            assert agg["models"][name]["normal"]["acc"]["seeds"][seed] == pytest.approx(sum(run["correct"]["normal"]) / 10)
    force = agg["models"]["lvr"]["force"]["latent_rate"]["mean"]
    never = agg["models"]["lvr"]["never"]["latent_rate"]["mean"]
    assert (force, never) == (1.0, 0.0)
    for mode in ("normal", "never"):  # finding 4 on accuracy, with spans and in silence
        d = agg["paired"][f"rl-att - rl ({mode})"]["overall"]
        assert d["n"] == 20 and d["ci95"][0] <= d["diff"] <= d["ci95"][1]
        pair = [json.load(open(root / "results" / "runs" / f"{n}-s{s}.json"))["correct"][mode]
                for s in (0, 1) for n in ("rl", "rl-att")]
        assert d["diff"] == pytest.approx((sum(pair[1]) + sum(pair[3]) - sum(pair[0]) - sum(pair[2])) / 20)
        assert d["seeds"] == pytest.approx([(sum(pair[1]) - sum(pair[0])) / 10, (sum(pair[3]) - sum(pair[2])) / 10])
        mean, half = sum(d["seeds"]) / 2, 12.706 * abs(d["seeds"][0] - d["seeds"][1]) / 2  # t(1) * sd / sqrt(2), 2 seeds
        assert d["seeds_ci95"] == pytest.approx([mean - half, mean + half])
    md = open(root / "results" / "study.md").read()
    assert "| rl-att - rl (never) |" in md and "| rl-strict | " in md.split("last 50 GRPO steps")[1]
    assert "| rl-att | routed |" in md and "| evidence | edit |" in md and "| rl-att-strict | blind+donor |" in md


def test_study_records_each_rl_run_s_last_steps_and_curve(done):
    """Per RL model and seed: its log copied into the results with its validation curve (steps 0 and 1, spans
    forbidden too), and zero_spread, latent rate and attention share over its last steps in study.json."""
    root, _ = done
    agg = json.load(open(root / "results" / "study.json"))
    assert {n for n, m in agg["models"].items() if "train" in m} == set(study.RL_MODELS)
    for name in study.RL_MODELS:
        logs = [root / "results" / "runs" / f"{name}-s{seed}_log.jsonl" for seed in (0, 1)]
        assert [l.read_text() for l in logs] == [(root / "runs" / f"{name}-s{s}" / "log.jsonl").read_text() for s in (0, 1)]
        train = agg["models"][name]["train"]
        for k in study.TRAIN_KEYS:
            assert train[k]["seeds"] == [study.last_steps(str(l))[k] for l in logs]
        assert train["steps"] == [1, 1]
        val = [json.loads(x) for x in logs[0].read_text().splitlines() if "val_acc" in x]
        assert [r["step"] for r in val] == [0, 1] and all("val_never_acc" in r for r in val)


def test_last_steps_means_against_a_hand_made_log(tmp_path):
    """The last 50 GRPO steps of an 80-step log, validation rows (no zero_spread) in between left out."""
    log = tmp_path / "log.jsonl"
    rows = []
    for step in range(1, 81):
        rows.append({"step": step, "reward": 0.5, "zero_spread": step / 100, "latent_rate": 1.0 if step <= 40 else 0.5,
                     "att_share": 0.2})
        if step % 25 == 0:
            rows.append({"step": step, "val_acc": 0.9, "val_latent_rate": 0.0})
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = study.last_steps(str(log))
    assert got["steps"] == 50 and got["zero_spread"] == pytest.approx((31 + 80) / 2 / 100)
    assert got["latent_rate"] == pytest.approx((10 * 1.0 + 40 * 0.5) / 50) and got["att_share"] == pytest.approx(0.2)
    assert study.last_steps(str(log), 5)["zero_spread"] == pytest.approx(0.78)
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))  # steps 1, 2, 3
    assert study.last_steps(str(short)) == pytest.approx({"zero_spread": 0.02, "latent_rate": 1.0, "att_share": 0.2, "steps": 3})
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"step": 1, "val_acc": 0.5}) + "\n")
    with pytest.raises(ValueError, match="sft.jsonl: no train_rl.py step rows"):
        study.last_steps(str(sft))


def test_each_seed_trains_from_its_own_base(done):
    root, _ = done
    default = study.parse_args(["--root", "r"])
    assert study.base_of(default, 0) == study.SHIPPED_BASE
    assert study.base_of(default, 1) == os.path.join("checkpoints", "small-vl-base-s1")  # shipped for seeds 0-2
    assert study.base_of(default, 3) == os.path.join("r", "base-s3")
    assert study.base_of(study.parse_args(["--root", "r", "--base", "b"]), 1) == "b"  # shared on request
    # TINY's --base-steps 2 is not the shipped bases' recipe: every seed trains its own, seed 0's too
    bases = {s: root / "runs" / f"base-s{s}" for s in (0, 1)}
    for s, base in bases.items():
        assert f"--seed {s} --base " in (base / study.COMMAND).read_text()
        assert json.load(open(base / "eval_val.json"))["normal"]["overall"]["n"] == 8
    starts = {s: (root / "runs" / f"lvr-s{s}" / study.COMMAND).read_text().split("starts from ")[1].strip() for s in (0, 1)}
    assert starts == {s: study.fingerprint(str(base / "checkpoint")) for s, base in bases.items()}
    assert starts[0] != starts[1]


def test_study_rerun_redoes_only_what_is_missing(done):
    root, args = done
    runs = root / "results" / "runs"
    kept = os.path.getmtime(runs / "lvr-s0.json")
    os.remove(runs / "rl-s1.json")
    older = json.load(open(runs / "lvr-s1.json"))  # an older version's file, without a mode of this version
    del older["summaries"]["oracle"], older["correct"]["oracle"]
    json.dump(older, open(runs / "lvr-s1.json", "w"))
    study.main(args)
    assert os.path.getmtime(runs / "lvr-s0.json") == kept and (runs / "rl-s1.json").exists()
    assert "oracle" in json.load(open(runs / "lvr-s1.json"))["summaries"]


def test_seed_0_uses_the_shipped_stage_1_models_only_at_their_settings():
    quick = study.parse_args(["--quick"])
    assert quick.seeds == [0]
    assert quick.task == data.DEFAULT_TASK == "hard"
    assert study.train(quick, "lvr", 0) == os.path.join("checkpoints", "small-vl-hard-sft")
    assert study.train(quick, "text", 0) == os.path.join("checkpoints", "small-vl-hard-sft-text")
    assert study.train(quick, "lvr-strict", 0) == os.path.join("checkpoints", "small-vl-hard-sft-strict")
    easy = study.parse_args(["--quick", "--task", "easy"])
    assert study.train(easy, "lvr", 0) == os.path.join("checkpoints", "small-vl-sft")  # the easy task's own
    assert study.shipped(easy, "lvr-strict", 0) is None  # none shipped: the easy study trains it
    assert study.shipped(quick, "lvr", 1) is None and study.shipped(quick, "rl", 0) is None
    for other in (["--sft-args", "--lam 1"], ["--sft-steps", "500"], ["--base", "runs/other-base"], ["--base-steps", "500"]):
        assert study.shipped(study.parse_args(["--quick"] + other), "lvr", 0) is None


def test_new_weights_at_a_checkpoint_path_are_evaluated_again(done):
    root, args = done
    ckpt = root / "runs" / "rl-s1" / "checkpoint" / "model.safetensors"
    kept = ckpt.read_bytes()
    try:
        shutil.copy(root / "runs" / "rl-att-s1" / "checkpoint" / "model.safetensors", ckpt)
        study.main(args)
        run = json.load(open(root / "results" / "runs" / "rl-s1.json"))
        assert run["weights"] == study.fingerprint(str(ckpt.parent)) == study.fingerprint(str(root / "runs" / "rl-att-s1" / "checkpoint"))
    finally:
        ckpt.write_bytes(kept)


@pytest.mark.parametrize("change", ["settings", "start"])
def test_a_run_folder_of_another_command_is_refused(done, change):
    root, args = done
    lvr = root / "runs" / "lvr-s1" / "checkpoint" / "model.safetensors"
    kept = lvr.read_bytes()
    try:
        if change == "settings":  # another --lam: the first seed's runs, its base first (it gets --sft-args too), are refused
            argv, refused = args[:args.index("--sft-args") + 1] + ["--batch-size 4 --eval-every 0 --n-val 8 --lam 0.5"] \
                + args[args.index("--sft-args") + 2:], "base-s0"
        else:  # LVR SFT got new weights: the RL runs trained from the old ones are refused
            shutil.copy(root / "runs" / "text-s1" / "checkpoint" / "model.safetensors", lvr)
            argv, refused = args, "rl-s1"
        with pytest.raises(SystemExit, match=f"{refused} was trained by another command or from other weights"):
            study.main(argv)
    finally:
        lvr.write_bytes(kept)


def test_a_shared_base_run_folder_is_trained_once_for_every_seed(tmp_path):
    a = study.parse_args(TINY + ["--base", str(tmp_path / "base"), "--root", str(tmp_path / "runs")])
    first = study.base_checkpoint(a, 0)
    assert study.base_checkpoint(a, 1) == first  # not refused as "another command", not retrained
    assert "--seed 0 " in (tmp_path / "base" / study.COMMAND).read_text()


def test_easy_study_trains_every_model_on_the_easy_task(tmp_path):
    """--task easy (the first study's task) stays runnable beside the default: its own folders, every run
    trains on easy (a base of other --base-steps too), the test questions and the per-type tables are easy's."""
    easy = study.parse_args(["--task", "easy"])
    assert (easy.root, easy.results) == (os.path.join("runs", "study-easy"), os.path.join("results", "easy", ""))
    args = TINY[2:] + ["--seeds", "0", "--task", "easy", "--root", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    study.main(args)
    agg = json.load(open(tmp_path / "res" / "study.json"))
    assert agg["config"]["task"] == "easy"
    assert set(agg["models"]["lvr"]["normal"]["per_type"]) == set(data.qtypes_of("easy"))
    for run in ("base-s0", "text-s0", "lvr-s0", "rl-s0", "rl-att-s0"):
        assert M.saved_task(str(tmp_path / "runs" / run / "checkpoint")) == "easy", run


def test_study_trains_the_evidence_and_strict_models_with_their_flags(done):
    root, _ = done
    cmd = lambda name: (root / "runs" / f"{name}-s1" / study.COMMAND).read_text()  # noqa: E731
    assert "--evidence-weight 0.2" in cmd("evidence") and "--att-weight 0 " in cmd("evidence")
    assert "--strict" in cmd("lvr-strict") and "--strict" not in cmd("lvr")
    for name in ("rl-strict", "rl-att-strict"):
        assert "--strict" in cmd(name) and cmd(name).split("starts from ")[1].strip() == \
            study.fingerprint(str(root / "runs" / "lvr-strict-s1" / "checkpoint"))
    assert "--att-weight 1.0" in cmd("rl-att-strict") and "--att-weight 0 " in cmd("rl-strict")


def test_study_carries_the_grounding_and_its_paired_differences(done):
    """Per model and seed the per-question grounding of every arm; study.json its mean across seeds per band
    and the paired differences (rl-att - rl under normal and never) equal to the hand-pooled ones; a run file
    of an older version, without grounding, is evaluated again."""
    root, args = done
    runs = {n: [json.load(open(root / "results" / "runs" / f"{n}-s{s}.json")) for s in (0, 1)] for n in ("rl", "rl-att")}
    agg = json.load(open(root / "results" / "study.json"))
    for name, rs in runs.items():
        for r in rs:
            assert set(r["grounding"]) == set(r["correct"]) and all(len(v) == 10 for v in r["grounding"].values())
            assert None not in r["grounding"]["never"]  # synthetic questions have boxes; no span: nothing is blind
        for band in study.GROUNDING_KEYS:  # small-vl's 4 layers: early, middle, late
            want = [r["summaries"]["never"]["overall"]["grounding"][band] for r in rs]
            assert agg["models"][name]["never"]["grounding"][band]["seeds"] == pytest.approx(want)
    for mode in ("normal", "never"):
        d = agg["grounding_paired"][f"rl-att - rl ({mode})"]
        pairs = [(x, y) for a, b in zip(runs["rl"], runs["rl-att"]) for x, y in zip(a["grounding"][mode], b["grounding"][mode])
                 if x is not None and y is not None]
        assert d["n"] == len(pairs) and d["diff"] == pytest.approx(sum(y - x for x, y in pairs) / len(pairs))
    md = open(root / "results" / "study.md").read()
    assert "| rl-att | never |" in md and "Grounding rl-att - rl (never)" in md
    path = root / "results" / "runs" / "lvr-s0.json"
    older = json.load(open(path))
    del older["grounding"]
    json.dump(older, open(path, "w"))
    study.main(args)
    assert "grounding" in json.load(open(path))


def test_models_option_evaluates_and_compares_only_those(done, capsys):
    """--models (--quick: the four core models) leaves the others untrained and out of study.json, keeping
    the comparisons between the chosen ones; an unknown name is refused in one line naming it."""
    root, args = done
    assert study.parse_args(["--quick"]).models == list(study.CORE) == ["text", "lvr", "rl", "rl-att"]
    out = root / "only"
    study.main(args[:args.index("--results")] + ["--results", str(out), "--models", "rl,lvr", "--seeds", "1"])
    agg = json.load(open(out / "study.json"))
    assert set(agg["models"]) == {"lvr", "rl"} and agg["config"]["models"] == ["lvr", "rl"]
    assert set(k.split(" (")[0] for k in agg["paired"] if " - normal" not in k) == {"rl - lvr"}
    assert set(agg["grounding_paired"]) == {"rl - lvr (normal)", "rl - lvr (never)"}
    assert sorted(os.listdir(out / "runs")) == ["lvr-s1.json", "rl-s1.json", "rl-s1_log.jsonl"]
    with pytest.raises(SystemExit):
        study.parse_args(["--models", "rl,rl-atx"])
    assert "unknown model(s) rl-atx; expected some of text, lvr" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--rl-steps", "0"], ["--sft-steps", "-1"], ["--n-test", "0"], ["--n-route", "0"],
                                 ["--att-weight", "-1"], ["--evidence-weight", "nan"], ["--base-steps", "0"]])
def test_bad_arguments_are_one_line_naming_the_option(bad, capsys):
    with pytest.raises(SystemExit) as e:
        study.parse_args(bad + ["--root", "never-made"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "error: argument " + bad[0] in err[-1]
