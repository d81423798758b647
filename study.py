"""The paper's four findings on small-vl, in one command: text-only SFT, LVR SFT, LVR SFT + plain GRPO and
LVR SFT + GRPO + attention reward, for several seeds; every LVR model evaluated on the same test questions
under every latent arm of eval.py --compare (normal, drop, noise, noise_norm, zero, repeat, shuffle, oracle,
the necessity tests blind, blind+drop, blind+oracle, edit, blind+edit, donor, donor-k4, blind+donor, a
test-time K sweep), with latents forced and forbidden, and with task-level routing. Beside them (2026's
necessity tests): `evidence`, LVR SFT + GRPO + ReaLVR's evidence loss (train_rl.py --evidence-weight), and
`lvr-strict`, an LVR SFT trained under the image-blind interface (train_sft.py --strict) with its two RL
runs `rl-strict` and `rl-att-strict` (train_rl.py --strict). study.json carries per model the accuracy of
every arm (keys such as `blind`, `blind+drop`, `donor`), `flip` (the edit pairs' metrics against their
original views), `donor_swap` (how often the answer moves to the donor's answer) and `grounding` (eval.py's
visual grounding per layer band, every arm; `grounding_paired`: rl-att - rl and both against lvr, normal and never, 95% intervals).

    python study.py              # seeds 0, 1, 2 (seeds 1 and 2 train their stage-1 models: README has the time)
    python study.py --quick      # seed 0 and the four core models (text, lvr, rl, rl-att): two RL runs from
                                 # the shipped stage-1 models, the same evaluation
    python study.py --models lvr,rl,rl-att --seeds 0,1   # some models and seeds only
    python study.py --task easy  # the first study's question mix (runs/study-easy, results/easy)

Each seed has its own base model (stage 0), so the spread across seeds includes the base's: seeds 0, 1
and 2 the shipped checkpoints/small-vl-base, -s1 and -s2 (what train_sft.py --seed N trains; README,
"Shipped starting points"), another seed or --base-steps the one train_sft.py trains with --seed N
(under --root as base-sN, trained first). --base shares one base across seeds instead, as the paper's
runs share one pretrained Qwen2.5-VL. A seed also sets stage-1 SFT and RL (data order, which replies carry latents and how long
their spans are, rollout sampling). Seed 0's stage-1 models are the shipped
ones (rundir.shipped_sft: checkpoints/small-vl-hard-sft, -hard-sft-text and -hard-sft-strict; on the easy task
small-vl-sft and -sft-text: what train_sft.py trains for seed 0), so --quick is the full study's seed 0 and shares its runs. Work units (a training run, a
model's evaluation) are kept under --root; an interrupted study run again continues where it stopped.
Writes to --results: one JSON per model and seed (summaries and per-question correctness) and each RL run's
log (runs/NAME-sSEED_log.jsonl), study.json (mean and spread across seeds, paired differences with 95%
intervals, among them rl-att - rl under normal decoding and with spans forbidden (never); per RL model
`train`: zero_spread, latent rate and attention share over its last 50 GRPO steps), study.md, and PNG plots
(ablation.png; rl_curves.png: the RL runs' training and validation curves, train_rl.py --eval-every, whose
default of every 25 steps the study keeps: about 4 s a point for small-vl on one CPU core).

Routing (finding 3): on --n-route validation questions each LVR model is run with latents forced and
forbidden; the types where forcing scored higher are routed to latents on the test split (--route).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time

import numpy as np

import data
import eval as ev
import model as M
import rundir
import summary
import train_rl
import train_sft

MODELS = ("text", "lvr", "rl", "rl-att", "evidence", "lvr-strict", "rl-strict", "rl-att-strict")
LVR_MODELS = MODELS[1:]  # every model that may open latent spans: evaluated under every arm
CORE = ("text", "lvr", "rl", "rl-att")  # the paper's four findings: --quick's models
SFT_MODELS = ("text", "lvr", "lvr-strict")
RL_MODELS = tuple(m for m in MODELS if m not in SFT_MODELS)  # trained by train_rl.py: a log of GRPO steps each
STRICT = ("lvr-strict", "rl-strict", "rl-att-strict")  # trained under the image-blind interface (--strict)
LATENT_MODES = ev.ARMS + tuple(f"K={k}" for k in ev.K_SWEEP) + tuple(ev.ROUTE_ARMS) + ("routed",)  # "normal" first
SHIPPED = {"lvr": "", "text": "-text", "lvr-strict": "-strict"}  # seed 0's stage-1 models (rundir.shipped_sft kinds)
SHIPPED_BASE = os.path.join(rundir.SHIPPED, "small-vl-base")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"seed 0 and the models {','.join(CORE)} only: two RL runs from the shipped stage-1 models")
    p.add_argument("--models", type=model_list, metavar="A,B",
                   help=f"these models only (default all: {','.join(MODELS)}; --quick {','.join(CORE)})")
    p.add_argument("--task", default=data.DEFAULT_TASK, choices=list(data.TASKS),
                   help="synthetic question mix (data.py); another than the default goes to --root runs/study-TASK, "
                        "--results results/TASK")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick 0)")
    p.add_argument("--sft-steps", type=rundir.at_least(1), default=1500, help="stage-1 SFT steps of the seeds that train them")
    p.add_argument("--rl-steps", type=rundir.at_least(1), default=300, help="GRPO steps per RL run")
    p.add_argument("--n-test", type=rundir.at_least(1), default=500, help="test questions, the same for every model")
    p.add_argument("--n-route", type=rundir.at_least(1), default=200, help="validation questions that choose the routed types")
    p.add_argument("--att-weight", type=rundir.at_least(0.0, float), default=1.0, help="attention reward weight of the rl-att models")
    p.add_argument("--evidence-weight", type=rundir.at_least(0.0, float), default=0.2, help="evidence loss weight (lambda_ev) of the evidence models")
    p.add_argument("--base", help="one base model for every seed: a model directory, or a run folder (trained first "
                                  "when unfinished); default: each seed its own (seed 0 the shipped one, seed N ROOT/base-sN)")
    p.add_argument("--sft-args", default="", help="extra train_sft.py arguments for stage 1, e.g. '--lam 1' "
                                                  "(then seed 0 trains its own instead of using the shipped ones)")
    p.add_argument("--rl-args", default="", help="extra train_rl.py arguments, e.g. '--att-variant relative'")
    p.add_argument("--base-steps", type=rundir.at_least(1), default=rundir.BASE_STEPS,
                   help="steps of the base models; another number than the default trains every seed's, seed 0's too")
    p.add_argument("--root", help="where the study's runs go (default runs/study; runs/study-TASK for another --task)")
    p.add_argument("--results", help="results folder (default results, with --quick results/quick, another --task results/TASK/...): "
                        "the default overwrites the shipped study's files")
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in (a.seeds or ("0" if a.quick else "0,1,2")).split(",")]
    a.models = a.models or list(CORE if a.quick else MODELS)
    other = "" if a.task == data.DEFAULT_TASK else a.task
    a.root = a.root or os.path.join(rundir.RUNS, "study" + rundir.task_suffix(a.task))
    a.results = a.results or os.path.join("results", other, "quick" if a.quick else "")
    return a


def model_list(s: str) -> list[str]:
    """argparse type of --models: comma-separated names of MODELS, kept in MODELS' order."""
    names = {x.strip() for x in s.split(",") if x.strip()}
    bad = ", ".join(sorted(names - set(MODELS))) if names else repr(s)
    if not names or names - set(MODELS):
        raise argparse.ArgumentTypeError(f"unknown model(s) {bad}; expected some of {', '.join(MODELS)}")
    return [m for m in MODELS if m in names]


# ---------------------------------------------------------------------------------- training
def finished(run: str, steps: int) -> bool:
    return rundir.saved_step(run) >= steps


COMMAND = "study_command.txt"  # in each run folder: the arguments it was trained with


def check_command(run: str, argv: list[str], init: str):
    """A run folder belongs to one command and one starting model: reusing it with other settings (another
    --lam, --sft-steps, --base, new weights at the same path ...) would silently mix them, so that is
    refused; a new run records both."""
    start = fingerprint(init) if os.path.isfile(os.path.join(init, "model.safetensors")) else init
    path, want = os.path.join(run, COMMAND), f"{shlex.join(argv)}\nstarts from {start}"
    if os.path.isfile(path):
        have = open(path).read().strip()
        if have != want:
            raise ValueError(f"{run} was trained by another command or from other weights ({have.replace(chr(10), '; ')}); "
                             "pass another --root or delete it")
    elif rundir.saved_step(run) == 0:
        os.makedirs(run, exist_ok=True)
        with open(path, "w") as f:
            f.write(want + "\n")


def fingerprint(ckpt: str) -> str:
    """sha256 of a checkpoint's weights: what the evaluation cache is keyed on (a path can get new weights)."""
    h = hashlib.sha256()
    with open(os.path.join(ckpt, "model.safetensors"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_of(a, seed: int) -> str:
    """Where seed's base model is: --base for every seed, else the seed's shipped one (seeds 0-2 at the
    default --base-steps) or ROOT/base-sN."""
    return a.base or rundir.shipped_base(seed, a.base_steps) or os.path.join(a.root, f"base-s{seed}")


def base_checkpoint(a, seed: int) -> str:
    """Seed's base model, trained first (stage 0 of train_sft.py) when it is an unfinished run folder; a
    shared --base is one model for every seed, seed 0's."""
    run = base_of(a, seed)
    if os.path.isfile(os.path.join(run, "config.json")):
        return run
    argv = ["--model", "small-vl", "--seed", str(0 if a.base else seed), "--base", run, "--base-steps", str(a.base_steps), "--resume",
            *task_args(a), *shlex.split(a.sft_args)]
    check_command(run, argv, "small-vl")
    if not finished(run, a.base_steps):
        print(f"== training {run}")
    return train_sft.base_model(train_sft.parse_args(argv))


def task_args(a) -> list[str]:
    """--task for the trainers, always: their default is data.DEFAULT_TASK."""
    return ["--task", a.task]


def shipped(a, name: str, seed: int) -> str | None:
    """Seed 0's shipped stage-1 model, when the study's stage-1 settings are the ones it was trained with."""
    if name not in SHIPPED:
        return None
    path = rundir.shipped_sft(a.task, SHIPPED[name])
    default = (seed == 0 and a.sft_steps == 1500 and not a.sft_args.strip()
               and os.path.normpath(base_of(a, 0)) == SHIPPED_BASE)
    return path if default and os.path.isfile(os.path.join(path, "config.json")) else None


def train(a, name: str, seed: int) -> str:
    """The checkpoint of model `name` for `seed`: shipped, or trained (or resumed) if not finished."""
    ship = shipped(a, name, seed)
    if ship:
        return ship
    run = os.path.join(a.root, f"{name}-s{seed}")
    steps = a.sft_steps if name in SFT_MODELS else a.rl_steps
    common = ["--seed", str(seed), "--steps", str(steps), "--out", run, "--resume", *task_args(a)]
    strict = ["--strict"] if name in STRICT else []
    if name in SFT_MODELS:
        script, init = train_sft, base_checkpoint(a, seed)
        argv = (["--model", "small-vl", "--base", init, "--n-val", "100"] + common
                + (["--no-latents"] if name == "text" else []) + strict + shlex.split(a.sft_args))
    else:
        script, init = train_rl, train(a, "lvr-strict" if strict else "lvr", seed)
        argv = (["--model", init, "--att-weight", str(a.att_weight if name.startswith("rl-att") else 0)]
                + (["--evidence-weight", str(a.evidence_weight)] if name == "evidence" else []) + strict + common
                + shlex.split(a.rl_args))
    check_command(run, argv, init)
    if not finished(run, steps):
        print(f"== training {run}")
        script.main(argv)
    return os.path.join(run, "checkpoint")


# -------------------------------------------------------------------------------- evaluation
def routed_types(model, tok, a, seed: int) -> list[str]:
    """Question types where forcing latents beat forbidding them on validation questions."""
    val = data.make_split("val", a.n_route, seed, task=a.task)
    acc = {r: summary.summarize(ev.evaluate(model, tok, val, route=r, progress=False))["per_type"] for r in ("all", "none")}
    return [t for t in acc["all"] if acc["all"][t]["acc"] > acc["none"][t]["acc"]]


def evaluate(a, name: str, seed: int) -> dict:
    """Every mode of one model on the shared test questions; cached in results/runs/NAME-sSEED.json."""
    path = os.path.join(a.results, "runs", f"{name}-s{seed}.json")
    ckpt = train(a, name, seed)
    modes = ["normal"] if name == "text" else LATENT_MODES
    weights = fingerprint(ckpt)
    if os.path.isfile(path):  # kept unless it is other weights' or lacks a mode (an older version's file)
        old = json.load(open(path))
        if (old.get("weights") == weights and set(modes) <= set(old["summaries"]) and (name == "text" or "flip" in old)
                and "grounding" in old):
            return old
    print(f"== evaluating {ckpt}")
    model, tok = M.load_model(ckpt)
    test = data.make_split("test", a.n_test, 0, task=a.task)
    route = routed_types(model, tok, a, seed) if name != "text" else []
    plan = {m: {"route": ",".join(route) or "none"} if m == "routed" else {"mode": m} for m in modes}
    records = {}
    for m, kw in plan.items():  # a model that opens no span decodes most arms once (eval.spanless_copy)
        records[m] = (ev.spanless_copy(kw.get("mode", "normal"), records, forbid=kw.get("route") == "none")
                      or ev.evaluate(model, tok, test, **kw))
    out = {"model": name, "seed": seed, "checkpoint": ckpt, "weights": weights, "routed_types": route,
           "summaries": {m: summary.summarize(r) for m, r in records.items()},
           "flip": {m: summary.flip_metrics(records[b], records[m]) for m, b in summary.PAIRED_BASE.items() if m in records},
           "correct": {m: [int(x["correct"]) for x in r] for m, r in records.items()},
           "grounding": {m: [x["grounding"]["all"] if x["grounding"] else None for x in r] for m, r in records.items()},
           "qtypes": [x["qtype"] for x in records["normal"]]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, path)
    return out


# --------------------------------------------------------------------------------- aggregation
def spread(values: list[float]) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    return {"mean": float(v.mean()) if len(v) else None, "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "seeds": [float(x) for x in v]}


def pooled(a_runs: list[dict], b_runs: list[dict], mode_a: str, mode_b: str, qtype=None) -> dict:
    """Paired difference b - a over the same (seed, question) pairs, all seeds pooled (the interval is over
    questions: it leaves out how training runs vary), each seed's own difference (`seeds`), which shows it,
    and a t-interval over those (`seeds_ci95`: the training run as the unit)."""
    xa, xb, seeds = [], [], []
    for ra, rb in zip(a_runs, b_runs):
        keep = [qtype is None or t == qtype for t in ra["qtypes"]]
        ca = [c for c, k in zip(ra["correct"][mode_a], keep) if k]
        cb = [c for c, k in zip(rb["correct"][mode_b], keep) if k]
        xa, xb, seeds = xa + ca, xb + cb, seeds + [(sum(cb) - sum(ca)) / max(len(ca), 1)]
    return {**summary.paired(xa, xb), "seeds": seeds, "seeds_ci95": summary.across_seeds(seeds)}


def aggregate(runs: dict, task: str = "easy") -> dict:
    out = {"models": {}, "paired": {}}
    for name, rs in runs.items():
        out["models"][name] = {}
        for mode in rs[0]["summaries"]:
            s = [r["summaries"][mode] for r in rs]
            out["models"][name][mode] = {
                "acc": spread([x["overall"]["acc"] for x in s]),
                "latent_rate": spread([x["overall"]["latent_rate"] for x in s]),
                "att_share": spread([x["overall"]["att_share"] for x in s]),
                "latent_r2": spread([x["overall"].get("latent_r2") for x in s]),
                "grounding": {k: spread([(x["overall"]["grounding"] or {}).get(k) for x in s]) for k in GROUNDING_KEYS},
                "per_type": {t: spread([x["per_type"][t]["acc"] for x in s]) for t in s[0]["per_type"]}}
        out["models"][name]["routed_types"] = [r["routed_types"] for r in rs]
        if rs[0].get("flip"):  # the edit pairs: per edit arm, each metric's rate across seeds
            out["models"][name]["flip"] = {m: {k: spread([r["flip"][m][k]["rate"] for r in rs]) for k in FLIP_KEYS}
                                           for m in rs[0]["flip"]}
        donor = [m for m in rs[0]["summaries"] if "donor" in rs[0]["summaries"][m]]
        if donor:  # the latent swap: per donor arm, how often the answer moved to the donor's, and kept its own
            out["models"][name]["donor_swap"] = {m: {k: spread([r["summaries"][m]["donor"][k]["rate"] for r in rs])
                                                for k in ("lift", "kept")} for m in donor}
    types = list(data.qtypes_of(task))
    for name in (n for n in LVR_MODELS if n in runs):
        for mode in LATENT_MODES[1:]:
            out["paired"][f"{name}: {mode} - normal"] = {
                "overall": pooled(runs[name], runs[name], "normal", mode),
                **{t: pooled(runs[name], runs[name], "normal", mode, t) for t in types}}
    out["grounding_paired"] = {f"{b_} - {a_} ({mode})": pooled_grounding(runs[a_], runs[b_], mode)
                               for a_, b_, mode in GROUNDING_COMPARISONS if a_ in runs and b_ in runs}
    for a_, b_, mode in ((a_, b_, m) for a_, b_, m in COMPARISONS if a_ in runs and b_ in runs):
        out["paired"][f"{b_} - {a_} ({mode})"] = {"overall": pooled(runs[a_], runs[b_], mode, mode),
                                                  **{t: pooled(runs[a_], runs[b_], mode, mode, t) for t in types}}
    return out


FLIP_KEYS = ("edited_acc", "paired_flip", "change_rate", "false_flip")
GROUNDING_KEYS = ("early", "middle", "late", "all", "uniform")  # eval.grounding_record (no middle band below 3 layers)
GROUNDING_COMPARISONS = tuple((a_, b_, m) for m in ("normal", "never") for a_, b_ in (("lvr", "rl"), ("lvr", "rl-att"), ("rl", "rl-att")))


def pooled_grounding(a_runs: list[dict], b_runs: list[dict], mode: str) -> dict:
    """Paired difference b - a of the per-question grounding (all layers) under `mode`, over the (seed,
    question) pairs where both have one, all seeds pooled (diff None without any)."""
    pairs = [(x, y) for ra, rb in zip(a_runs, b_runs) for x, y in zip(ra["grounding"][mode], rb["grounding"][mode])
             if x is not None and y is not None]
    return summary.paired(*zip(*pairs)) if pairs else {"diff": None, "ci95": None, "n": 0}


COMPARISONS = (("text", "lvr", "normal"), ("lvr", "rl", "normal"), ("lvr", "rl-att", "normal"), ("rl", "rl-att", "normal"),
               ("rl", "rl-att", "never"),  # finding 4 in silence: both RL models with spans forbidden
               ("lvr", "evidence", "normal"), ("rl", "evidence", "normal"), ("rl-att", "evidence", "normal"),
               ("lvr", "lvr-strict", "normal"), ("lvr", "lvr-strict", "blind"), ("lvr-strict", "rl-strict", "blind"),
               ("lvr-strict", "rl-att-strict", "blind"), ("rl-strict", "rl-att-strict", "blind"))


# ------------------------------------------------------------------------------ the RL runs' logs
LAST_STEPS = 50  # the end of an RL run, which its training means are taken over
TRAIN_KEYS = ("zero_spread", "latent_rate", "att_share")


def rl_logs(a) -> dict:
    """Each RL run's train_rl.py log, copied next to its evaluation (RESULTS/runs/NAME-sSEED_log.jsonl: the file
    behind its curves and its training means): {name: [path per seed]}."""
    out = {}
    for name in (n for n in RL_MODELS if n in a.models):
        out[name] = []
        for seed in a.seeds:
            src = os.path.join(a.root, f"{name}-s{seed}", rundir.LOG)
            dst = os.path.join(a.results, "runs", f"{name}-s{seed}_log.jsonl")
            if os.path.isfile(src):
                shutil.copyfile(src, dst)
            if not os.path.isfile(dst):
                raise FileNotFoundError(f"{src}: no training log of {name} seed {seed}")
            out[name].append(dst)
    return out


def last_steps(log: str, n: int = LAST_STEPS) -> dict:
    """Means of TRAIN_KEYS over the last n GRPO steps of a train_rl.py log (its rows with zero_spread, not its
    validation rows) and how many steps that is. zero_spread: the share of groups whose rollouts all got one
    reward (no gradient); att_share counts 0 at a step where no rollout opened a span."""
    with open(log) as f:
        rows = [r for r in map(json.loads, f) if "zero_spread" in r][-n:]
    if not rows:
        raise ValueError(f"{log}: no train_rl.py step rows (with 'zero_spread')")
    return {**{k: float(np.mean([r[k] for r in rows])) for k in TRAIN_KEYS}, "steps": len(rows)}


def train_means(logs: list[str]) -> dict:
    """One RL model's last_steps across its seeds' logs."""
    per = [last_steps(p) for p in logs]
    return {"window": LAST_STEPS, **{k: spread([x[k] for x in per]) for k in TRAIN_KEYS}, "steps": [x["steps"] for x in per]}


def markdown(agg: dict, a) -> str:
    f = lambda s: "-" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"  # noqa: E731
    types = list(data.qtypes_of(a.task))
    lines = [f"Seeds {a.seeds}; {a.n_test} test questions; mean ± std across seeds. Latent R²: how the latents of "
             "normal decoding fit the question's stage-1 targets (eval.latent_fit; 0: no better than the mean target).", "",
             "| model | mode | overall | " + " | ".join(types) + " | latent rate | att. share | latent R² |",
             "|---|---|---|" + "---|" * len(types) + "---|---|---|"]
    for name, modes in agg["models"].items():
        for mode, s in modes.items():
            if mode in ("routed_types", "flip", "donor_swap", "train"):
                continue
            lines.append(f"| {name} | {mode} | {f(s['acc'])} | " + " | ".join(f(s["per_type"][t]) for t in types)
                         + f" | {f(s['latent_rate'])} | {f(s['att_share'])} | {f(s['latent_r2'])} |")
    lines += ["", "Necessity tests: edit pairs (strict paired correct flip on pairs whose answer changes, false flip on "
              "pairs whose answer does not) and the latent swap (share of answers moved to the donor's answer):", "",
              "| model | arm | edited-view acc. | paired correct flip | answer changed | false flip |", "|---|---|---|---|---|---|"]
    for name, modes in agg["models"].items():
        for arm, fl in modes.get("flip", {}).items():
            lines.append(f"| {name} | {arm} | " + " | ".join(f(fl[k]) for k in FLIP_KEYS) + " |")
    lines += ["", "| model | arm | moved to the donor's answer | kept its own |", "|---|---|---|---|"]
    for name, modes in agg["models"].items():
        for arm, d in modes.get("donor_swap", {}).items():
            lines.append(f"| {name} | {arm} | {f(d['lift'])} | {f(d['kept'])} |")
    lines += ["", f"RL training, the last {LAST_STEPS} GRPO steps: share of groups with equal rewards (zero_spread: no "
              "gradient), latent rate and attention share of the rollouts:", "",
              "| model | zero_spread | latent rate | att. share |", "|---|---|---|---|"]
    for name, modes in agg["models"].items():
        if "train" in modes:
            lines.append(f"| {name} | " + " | ".join(f(modes["train"][k]) for k in TRAIN_KEYS) + " |")
    lines += ["", "Paired differences (all seeds pooled, 95% interval over questions; per seed: each seed's own difference, "
              "then the 95% t-interval of their mean, training runs as the unit):",
              "", "| comparison | overall | per seed | " + " | ".join(types) + " |", "|---|---|---|" + "---|" * len(types)]
    g = lambda d: f"{d['diff']:+.3f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"  # noqa: E731
    for k, d in agg["paired"].items():
        ci = d["overall"]["seeds_ci95"]
        per_seed = " / ".join(f"{x:+.3f}" for x in d["overall"]["seeds"]) + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
        lines.append(f"| {k} | {g(d['overall'])} | {per_seed} | " + " | ".join(g(d[t]) for t in types) + " |")
    lines += ["", "Visual grounding: of the attention the answer tokens pay to the image, the share inside the question's "
              "boxes (eval.py; layer bands early/middle/late, all layers; uniform: attention spread evenly over the image):",
              "", "| model | mode | " + " | ".join(GROUNDING_KEYS) + " |", "|---|---|" + "---|" * len(GROUNDING_KEYS)]
    for name, modes in agg["models"].items():
        for mode in ("normal", "never"):
            if mode in modes:
                lines.append(f"| {name} | {mode} | " + " | ".join(f(modes[mode]["grounding"][k]) for k in GROUNDING_KEYS) + " |")
    lines += [""] + [f"Grounding {k} (pooled, 95% interval): " + ("-" if d["diff"] is None else f"{g(d)} (n {d['n']})")
                     for k, d in agg["grounding_paired"].items()]
    lines += ["", "Routed types per seed: " + "; ".join(f"{n}: {v['routed_types']}" for n, v in agg["models"].items()
                                                       if n != "text")]
    return "\n".join(lines)


def plots(a, agg: dict, logs: dict):
    try:
        print("wrote", ev.plot([p for paths in logs.values() for p in paths], os.path.join(a.results, "rl_curves.png")))
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"plots skipped: {e}")
        return
    modes = ("normal", "drop", "noise", "zero", "shuffle", "oracle", "blind", "blind+drop", "blind+oracle", "K=16", "force",
             "never", "routed")
    fig, ax = plt.subplots(figsize=(16, 3.5))
    names = [n for n in MODELS if n in agg["models"]]
    for i, name in enumerate(names):
        for j, mode in enumerate(modes):
            s = agg["models"][name].get(mode)
            if s and isinstance(s.get("acc"), dict):
                ax.bar(i * (len(modes) + 1) + j, s["acc"]["mean"], yerr=s["acc"]["std"], color=f"C{j}",
                       label=mode if name == "lvr" else None)
    ax.axhline(np.mean([1 / summary.n_options(x) for x in data.make_split("test", a.n_test, 0, task=a.task)]), color="k", ls=":", lw=1)
    ax.set_xticks([i * (len(modes) + 1) + len(modes) / 2 for i in range(len(names))], names)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.12)
    ax.legend(ncol=len(modes), fontsize=7, loc="upper center")
    fig.tight_layout()
    fig.savefig(os.path.join(a.results, "ablation.png"), dpi=120)
    print("wrote", os.path.join(a.results, "ablation.png"))


def main(argv=None):
    a = parse_args(argv)
    t0 = time.time()
    try:
        runs = {name: [evaluate(a, name, s) for s in a.seeds] for name in a.models}
        logs = rl_logs(a)
        train = {name: train_means(paths) for name, paths in logs.items()}
    except (M.ModelLoadError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    agg = aggregate(runs, a.task)
    for name, means in train.items():
        agg["models"][name]["train"] = means
    agg["config"] = dict(vars(a))
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, "study.json"), "w") as f:
        json.dump(agg, f, indent=1)
    md = markdown(agg, a)
    with open(os.path.join(a.results, "study.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    plots(a, agg, logs)
    print(f"study done in {math.ceil((time.time() - t0) / 60)} min (this invocation); results in {os.path.normpath(a.results)}/")


if __name__ == "__main__":
    main()
