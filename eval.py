"""The ablation eval: accuracy per question type under latent interventions, latent rate, attention
share on latents, routing; on the synthetic test split or a real benchmark in its released layout.

    python eval.py --drop-latents                     # newest small-vl checkpoint (RL, else SFT), test split
    python eval.py --model DIR --compare              # every mode on the same questions, paired differences
    python eval.py --model DIR --route count,size     # latents forced for these types, forbidden for the rest
    python eval.py --model DIR --task hard            # another question mix than the model's own (data.py)
    python eval.py --model DIR --bench mmvp --bench-root data/MMVP     # blink | cvbench | mmvp | vstar | tsv
    python eval.py --model Qwen/Qwen2.5-VL-3B-Instruct --bench MMVP --bench-root data/vlmeval   # DIR/MMVP.tsv
    python eval.py --model DIR --bench all --bench-root data/vlmeval  # the paper's seven: one table row each
    python eval.py --plot runs/small-vl-rl/log.jsonl runs/small-vl-rl-att/log.jsonl   # training curves (PNG)

Modes (lvr.py documents each): normal; drop (no latent embedding enters the context: <|lvr_start|> is
followed at once by <|lvr_end|>); noise (every latent replaced by standard normal noise, the paper's);
noise_norm (Gaussian noise rescaled to the norm of the latent it replaces); zero (zero vectors); repeat
(the span's first latent fed again at every slot); shuffle (each question fed the latents the next
question of its batch generated); oracle (the question's stage-1 targets: an upper bound); K=n (a
test-time sweep of the number of latent steps). Necessity tests (2026): blind, blind+drop, blind+oracle
(CVRR's strict interface: no position from the span's <|lvr_end|> on sees the image; prompt text and latents
stay visible); edit, blind+edit (ReaLVR's counterfactual pairs: each question's scene after one edit,
edits.counterfactual; edited-view accuracy, strict paired correct flip, false flip); donor, donor-k4,
blind+donor (ReaLVR's latent swap: a donor question's latents, all K or the first 4 slots; how often the
answer moves to the donor's answer); force, never (normal decoding with a span opened first / never opened,
every question). --compare runs them all. Routing: --force-latents (a span is opened first), --no-latents
(never opened), --route T1,T2 (forced for those question types only).
The paper's seven benchmarks are run under --protocol vlmeval by default: VLMEvalKit's prompt per
dataset, its pixel bounds for a real checkpoint (min/max pixels 1280*28*28 / 8192*28*28), its
judge-free verdict and metrics (vlmeval_rules.py), with the share of replies its rules decide (the rest
would go to its API judge and score 0 here) and how many replies the lenient checker judges otherwise;
--protocol lenient sends our own prompt and scores with the RL reward's checker.
Grounding (the paper's "better visual grounding"): of the attention the answer tokens pay to the image, the
share inside the question's boxes, per layer band and over all layers (evaluate says how; synthetic questions
only, which have boxes). Accuracy intervals are 95% Wilson intervals; paired differences against normal (same questions) carry a
95% normal-approximation interval of the mean per-question difference.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import benchmarks
import data
import edits
import decode
import lvr
import model as M
import parallel as P
import reward
import rundir
import summary
import vlmeval_rules


def route_force(samples, route: str | None) -> torch.Tensor | None:
    """Per-sample forcing: 'all' -> 1 (open a span), 'none' -> -1 (never), 'T1,T2' -> 1 for those types, -1 else."""
    if route is None:
        return None
    if route in ("all", "none"):
        return torch.full((len(samples),), 1 if route == "all" else -1)
    types = set(route.split(","))
    return torch.tensor([1 if s.qtype in types else -1 for s in samples])


BLIND_ARMS = ("blind", "blind+drop", "blind+oracle")  # CVRR's strict interface: answers that cannot see the image
PAIR_ARMS = ("edit", "blind+edit")  # ReaLVR's counterfactual edit pairs (synthetic scenes only)
DONOR_ARMS = ("donor", "donor-k4", "blind+donor")  # ReaLVR's latent swap: a donor question's latents
DONOR_K = 4  # donor-k4: the donor's first k latents, then the model's own
ROUTE_ARMS = {"force": "all", "never": "none"}  # normal decoding with a span opened first / never opened, every question


ARMS = lvr.MODES + ("shuffle", "oracle") + BLIND_ARMS + PAIR_ARMS + DONOR_ARMS  # --compare's rows, then K, then routes
K_SWEEP = (0, 2, 4, 16)  # rows "K=n" (normal decoding with n latent steps; the default K is the normal row)


def spanless_copy(mode: str, done: dict, forbid: bool = False) -> list[dict] | None:
    """`mode`'s records without decoding, when the run they would equal opened no span on any question: every
    arm except the edit pairs and force changes only what happens inside or after a span (the latent
    interventions, shuffle, oracle, blind, donor, the K sweep, never), so it decodes exactly as done["normal"]
    did (same questions, seeds and settings), and blind+edit as done["edit"] did; `forbid` (spans forbidden:
    route "none") makes normal itself such an arm. None when the arm must be decoded."""
    base = "edit" if mode == "blind+edit" else None if mode in PAIR_ARMS or mode == "force" else "normal"
    if base not in done or (mode == base and not forbid) or any(r["opened"] for r in done[base]):
        return None
    extra = dict(donor=None, donor_answer=None, to_donor=None) if mode in DONOR_ARMS else {}
    return [{**r, **extra} for r in done[base]]


def first_span_latents(roll, K: int) -> torch.Tensor:
    """(N, K, D): each rollout's first K latents (zeros where it fed fewer)."""
    out = roll.latents.new_zeros(roll.latents.shape[0], K, roll.latents.shape[-1])
    for i in range(out.shape[0]):
        v = roll.latents[i][roll.latent_mask[i]][:K]
        out[i, :len(v)] = v
    return out


def split_mode(mode: str) -> tuple[str, bool]:
    """'blind' -> ('normal', True); 'blind+X' -> ('X', True); 'X' -> ('X', False)."""
    if mode == "blind":
        return "normal", True
    if mode.startswith("blind+"):
        return mode[len("blind+"):], True
    return mode, False


def answer_text(sample, letter: str | None) -> str | None:
    """The option text a letter names in a question with lettered options (None when it names none)."""
    opts = data.options_of(sample.question)
    i = data.OPTION_LETTERS.find(letter) if letter else -1
    return opts[i] if 0 <= i < len(opts) else None


def question_form(sample) -> str:
    """The template a synthetic question was asked with (attribute: shape or colour), else its type."""
    first = sample.question.splitlines()[0]
    return next((k for k, r in edits.QUESTION_RES.items() if r.fullmatch(first)), sample.qtype)


def donors(samples, opened) -> list[int | None]:
    """For each question, its donor: the next question (cyclically) asked with the same template, whose own
    decoding opened a span, and whose right answer is another of this question's options; None if none is."""
    forms = [question_form(s) for s in samples]
    rights = [answer_text(s, s.answer) for s in samples]
    out = []
    for i, s in enumerate(samples):
        opts, n = data.options_of(s.question), len(samples)
        out.append(next((j for j in ((i + d) % n for d in range(1, n)) if opened[j] and forms[j] == forms[i]
                         and rights[j] is not None and rights[j] != rights[i] and rights[j] in opts), None))
    return out


@torch.no_grad()
def evaluate(model, tok, samples, mode="normal", latent_steps=8, route=None, batch_size=64, temperature=0.0,
             top_p=1.0, seed=0, max_new_tokens=32, blank=False, progress=True, att_layers=(0,),
             protocol="lenient", cache=None) -> list[dict]:
    """Batched decoding (greedy, or sampling with one generator per question seeded by (`seed`, its
    index)); one record per question, with the rollout's attention share on its latents (reward.py's
    r_attn, None without a span) and its visual grounding (None for a question without boxes): of the
    attention its answer tokens (reward.answer_mask: the reply after its last <|lvr_end|>, all of it without a
    span) pay to the image's visual tokens, the share on those whose cells overlap the question's boxes
    (lvr.box_cells: the cells of the stage-1 targets), heads and answer tokens averaged, per layer band
    (layer_bands) and over all layers (grounding_record), from the same scoring forward as r_attn. Under the
    blind arms the answer after a span cannot see the image: its grounding is None (undefined, not 0), while
    a reply without a span sees it and keeps one. `protocol` decides "correct" (benchmarks.verdicts; the paper's seven also
    get both verdicts and VLMEvalKit's judge flag).

    mode: one of lvr.MODES; "shuffle" (each question is fed the latents the next question of its batch
    generated); "oracle" (its own stage-1 targets: the visual tokens of its boxes, pooled onto K slots);
    "K=n" (normal decoding with n latent steps); "edit" (the edited view of each question's counterfactual
    pair, edits.counterfactual: records add the edit and whether the right answer changed); "donor" /
    "donor-k4" (the latents its donor question generated, eval.donors: all K slots / the first 4, then the
    model's own; records add the donor's answer and whether the reply moved to it); "blind" and "blind+X"
    (X under the image-blind interface: no position from the span's <|lvr_end|> on sees the image); "force" /
    "never" (normal decoding with a span opened first / never opened on every question: `route` "all" / "none").
    Under torchrun each rank decodes a contiguous part of the questions and every rank gets all records, in
    order; "shuffle" and the donor arms (which pair questions) and an FSDP-sharded model (in lockstep) decode
    all questions on every rank instead."""
    base, blind = split_mode(mode)
    if base.startswith("K="):
        base, latent_steps = "normal", int(base[2:])
    if base in ROUTE_ARMS:
        base, route = "normal", ROUTE_ARMS[base]
    pairs = None
    if base == "edit":
        if any(not s.objects for s in samples):
            raise ValueError("edit pairs need the synthetic scenes (objects to edit)")
        pairs = [edits.counterfactual(s, i) for i, s in enumerate(samples)]
        samples, base = [p.edited for p in pairs], "normal"
    sharded = P.is_sharded(model)
    donor = base in ("donor", "donor-k4")
    whole = sharded or base == "shuffle" or donor
    mine = range(len(samples)) if whole else P.part(len(samples))
    force = route_force(samples, route)
    gen = lambda idx: [torch.Generator(device=model.device).manual_seed(seed * 1_000_003 + j) for j in idx]  # noqa: E731
    kw = dict(max_new_tokens=max_new_tokens, latent_steps=latent_steps, temperature=temperature, top_p=top_p,
              all_ranks=sharded, cache=cache, keep=True)  # batches of one shape reuse the static decoder (released below)
    encode = lambda chunk: {k: v.to(model.device) for k, v in M.encode(model, tok, chunk).items()}  # noqa: E731
    batches = [range(i, min(mine.stop, i + batch_size)) for i in range(mine.start, mine.stop, batch_size)]
    own_latents = donor_of = None
    if donor:  # every question's own latents first (they come before any blind position: blind or not alike)
        rolls = [P.run(model, lvr.generate, model, tok, encode(samples[idx.start:idx.stop]), generator=gen(idx),
                       force=None if force is None else force[idx.start:idx.stop], **kw) for idx in batches]
        own_latents = torch.cat([first_span_latents(r, latent_steps) for r in rolls])
        donor_of = donors(samples, torch.cat([r.opened for r in rolls]).tolist())
    records = []
    for idx in tqdm(batches, desc=f"eval {mode}", disable=not progress or not P.is_main(), leave=False):
        chunk = samples[idx.start:idx.stop]
        images = [np.full_like(s.load_image(), data.BACKGROUND) for s in chunk] if blank else None
        prompt = {k: v.to(model.device) for k, v in M.encode(model, tok, chunk, images=images).items()}
        gens = gen(idx)
        kw["force"] = None if force is None else force[idx.start:idx.stop]
        given = None
        if base == "oracle":
            given = P.run(model, lvr.oracle_latents, model, prompt, chunk, latent_steps)
        elif base == "shuffle":
            own = P.run(model, lvr.generate, model, tok, prompt, generator=gens, blind=blind, **kw)
            given = first_span_latents(own, latent_steps).roll(-1, 0)
            gens = gen(idx)
        elif donor:
            rows = [i if donor_of[i] is None else donor_of[i] for i in idx]  # no donor: its own latents
            given = own_latents[rows][:, :DONOR_K if base == "donor-k4" else latent_steps]
        roll = P.run(model, lvr.generate, model, tok, prompt, mode=base if base in lvr.MODES else "normal",
                     generator=gens, given=given, blind=blind, **kw)
        cells = [lvr.box_cells(model, s) for s in chunk] if any(s.bboxes for s in chunk) else None
        scored = P.run(model, reward.score_rollout, model, roll, att_layers, blind=blind, cells=cells)
        share = scored[1].cpu()
        ground = [grounding_record(g, c, p, model.config.image_token_id) if s.bboxes else None
                  for g, c, p, s in zip(scored[2].cpu(), cells, prompt["input_ids"], chunk)] if cells else [None] * len(chunk)
        fit = latent_fit(model, prompt, chunk, roll, latent_steps) if base == "normal" and not blank else None
        for j, s in enumerate(chunk):
            text = tok.decode(roll.tokens[j][roll.mask[j]], skip_special_tokens=False)
            pred = reward.parse_answer(text) if s.choices or len(s.answer) == 1 else benchmarks.final_text(text)
            opened = bool(roll.opened[j])
            rec = {"id": s.id, "qtype": s.qtype, "answer": s.answer, "pred": pred,
                   **benchmarks.verdicts(text, s, protocol),
                   "opened": opened, "att_share": float(share[j]) if opened else None, "grounding": ground[j], "text": text,
                   "latent_fit": fit[j] if fit is not None and opened else None,
                   "chance": 1 / summary.n_options(s) if s.choices or len(s.answer) == 1 else 0.0}
            if pairs is not None:
                pair = pairs[idx.start + j]
                rec.update(edit=pair.edit.kind, changes=pair.changes, original_answer=pair.original.answer)
            if donor:
                d = donor_of[idx.start + j]
                to = None if d is None else data.OPTION_LETTERS[data.options_of(s.question).index(answer_text(samples[d], samples[d].answer))]
                rec.update(donor=None if d is None else samples[d].id, donor_answer=to,
                           to_donor=None if d is None or not opened else pred == to)
            records.append(rec)
    decode.release(model)
    return finish_fit(records if whole else [r for rs in P.gather_objects(records) for r in rs], latent_steps)


def layer_bands(n: int) -> dict[str, list[int]]:
    """The n decoder layers in bands: early and late the first and last round(n / 3) (at least one), middle
    the rest (left out when empty). small-vl's 4 layers: early [0], middle [1, 2], late [3]; 2 layers: early
    [0], late [1]; 1 layer: early and late both [0]; 36 (3B): 12 each; 28 (7B): 9, 10, 9."""
    k = max(1, round(n / 3))
    bands = {"early": list(range(k)), "middle": list(range(k, n - k)), "late": list(range(n - k, n))}
    return {b: layers for b, layers in bands.items() if layers}


def grounding_record(per_layer: torch.Tensor, cells: list[int], ids: torch.Tensor, image_id: int) -> dict | None:
    """A record's grounding from its per-layer shares (reward.grounding): the mean per band (layer_bands) and
    over all layers, and `uniform`, what attention spread evenly over the prompt's image tokens would score
    (the box cells' share of them). None when the answer tokens pay the image nothing (NaN: none, or blind)."""
    if torch.isnan(per_layer).any():
        return None
    bands = {b: float(per_layer[layers].mean()) for b, layers in layer_bands(len(per_layer)).items()}
    return {**bands, "all": float(per_layer.mean()), "uniform": len(cells) / int((ids == image_id).sum())}


def latent_fit(model, prompt, samples, roll, K: int) -> list[list] | None:
    """Per rollout, how its first span's generated latents z fit the stage-1 targets t of its question's
    slots (lvr.oracle_latents): [mean cosine(z, t) over the K slots, sum ||z - t||^2, sum ||t||^2, sum t]
    (finish_fit turns the last two into the spread about the mean target of all questions). None when K = 0
    or a question has no boxes (real benchmarks)."""
    if K == 0 or any(not s.bboxes for s in samples):
        return None
    t = P.run(model, lvr.oracle_latents, model, prompt, samples, K).double().cpu()  # float64: the spread about
    z = first_span_latents(roll, K).double().cpu()  # the mean is a difference of large sums (finish_fit)
    cos = torch.nn.functional.cosine_similarity(z, t, dim=-1).mean(-1)
    return [[float(cos[i]), float((z[i] - t[i]).pow(2).sum()), float(t[i].pow(2).sum()), t[i].sum(0).tolist()]
            for i in range(len(samples))]


def finish_fit(records: list[dict], K: int) -> list[dict]:
    """Each record's latent_fit becomes [cosine, ||z - t||^2, ||t - m||^2] (sums over its K slots), m the
    mean target over every slot of every question with a fit, so that it depends neither on batching nor
    on the rank split; summarize turns the last two into an R^2 (0: the latents are no better than m)."""
    fits = [r for r in records if r.get("latent_fit") is not None]
    if fits:
        m = np.sum([r["latent_fit"][3] for r in fits], axis=0) / (K * len(fits))
        for r in fits:
            cos, err, sq, tsum = r["latent_fit"]
            r["latent_fit"] = [cos, err, float(sq - 2 * np.dot(m, tsum) + K * np.dot(m, m))]
    return records


# ------------------------------------------------------------------------------------ the CLI
def newest_checkpoint(runs: str = "runs") -> str:
    """The newest small-vl RL checkpoint, else the SFT one (trained here, else the shipped one); says which."""
    rl = sorted(glob.glob(os.path.join(runs, "small-vl-rl*", "checkpoint")), key=os.path.getmtime)
    sft = os.path.join(runs, "small-vl-sft", "checkpoint")
    path = rl[-1] if rl else sft if os.path.isdir(sft) else rundir.shipped_sft(data.DEFAULT_TASK)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no small-vl checkpoint under {runs}/: run python train_sft.py --model small-vl first")
    if P.is_main():
        print(f"evaluating {path} ({'RL' if rl else 'SFT'}: the newest small-vl checkpoint)")
    return path


def run_name(path: str) -> str:
    """A log's legend label: its run folder (OUT/log.jsonl), or its file name (results/default/RUN_log.jsonl)."""
    name = os.path.basename(path)
    if name == "log.jsonl":
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    return name.removesuffix(".jsonl").removesuffix("_log")


def quick_eval(model, tok, samples, step: int, log: str, bar, blind: bool = False, never: bool = False, **kw) -> dict:
    """A trainer's point on its validation curve: greedy accuracy, latent rate, attention share on the latents
    and accuracy per type on `samples` (a fixed set: the run's validation questions), under the image-blind
    interface with `blind`; with `never` also the same questions' accuracy with spans forbidden (val_never_acc,
    the curve in silence). One row into the run's log, one line above the bar. Every rank calls it under
    torchrun (evaluate splits the questions); rank 0 writes. `kw`: evaluate's decoding options. Greedy
    decoding draws on no random source, so training's random state is left as it was."""
    mode = "blind" if blind else "normal"
    model.eval()
    s = summary.summarize(evaluate(model, tok, samples, mode=mode, progress=False, **kw))
    o = s["overall"]
    row = {"step": step, "val_acc": o["acc"], "val_latent_rate": o["latent_rate"], "val_att_share": o["att_share"],
           **{f"val_{t}": v["acc"] for t, v in s["per_type"].items()}}
    if never:
        row["val_never_acc"] = summary.summarize(evaluate(model, tok, samples, mode=mode, route="none", progress=False,
                                                  **kw))["overall"]["acc"]
    model.train()
    rundir.log(log, row)
    if P.is_main():
        never_acc = f" (spans forbidden {row['val_never_acc']:.2f})" if never else ""
        bar.write(f"step {step}: val acc {o['acc']:.2f}{never_acc}, latent rate {o['latent_rate']:.2f} | "
                  + " ".join(f"{t} {v['acc']:.2f}" for t, v in s["per_type"].items()))
    return row


CURVES = (("reward", "reward"), ("acc", "rollout accuracy"), ("val_acc", "validation accuracy (dashed: spans forbidden)"),
          ("latent_rate", "latent rate"), ("att_share", "attention share on latents"),
          ("zero_spread", "groups with equal rewards (zero_spread)"))


def run_group(name: str) -> str:
    """A run's name without its seed suffix ('rl-att-s2' -> 'rl-att')."""
    head, _, seed = name.rpartition("-s")
    return head if head and seed.isdigit() else name


def plot(logs: list[str], out: str) -> str:
    """Curves of train_rl.py logs: reward, rollout accuracy, latent rate, attention share and the share of
    equal-reward groups, each a moving average over ~5% of the run, and the validation curve where a log has
    one (--eval-every: val_acc, dashed val_never_acc with spans forbidden). A colour per run, its seeds' logs
    (names ending -sN, run_group) overlaid in it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4))
    colours = {}
    for path in logs:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        steps, val = [r for r in rows if "reward" in r], [r for r in rows if "val_acc" in r]
        if not steps:
            raise ValueError(f"{path}: no train_rl.py rows (with 'reward') in this log")
        group = run_group(run_name(path))
        label = None if group in colours else group
        colour = colours.setdefault(group, f"C{len(colours) % 10}")
        for ax, (k, _) in zip(axes.flat, CURVES):
            if k == "val_acc":
                for key, ls in (("val_acc", "-"), ("val_never_acc", "--")):
                    pts = [(r["step"], r[key]) for r in val if key in r]
                    if pts:
                        ax.plot(*zip(*pts), ls=ls, marker=".", color=colour, lw=1)
                continue
            y = np.array([r.get(k) for r in steps], dtype=float)  # a key an older log lacks: no line
            w = max(1, len(y) // 20)  # light smoothing: moving average over ~5% of the run
            ax.plot([r["step"] for r in steps][w - 1:], np.convolve(y, np.ones(w) / w, "valid"), color=colour, lw=1,
                    label=label)
    for ax, (_, title) in zip(axes.flat, CURVES):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory or cached hub id (default: the newest small-vl RL, else SFT)")
    p.add_argument("--max-pixels", type=rundir.at_least(1), help="override the checkpoint's max_pixels (image resize bound)")
    p.add_argument("--split", default="test", choices=["val", "test"], help="synthetic split to evaluate")
    p.add_argument("--n", type=rundir.at_least(1), help="number of questions (default: 500 synthetic, all of a benchmark)")
    p.add_argument("--data-seed", type=int, default=0, help="synthetic data seed (the one training used)")
    p.add_argument("--task", choices=list(data.TASKS),
                   help="synthetic question mix (data.py); default: the one the model was trained on (its config.json; "
                        "easy when it records none)")
    p.add_argument("--bench", choices=list(benchmarks.BENCHMARKS) + ["all"],
                   help="a real benchmark instead of synthetic data; all: the paper's seven, one table row each")
    p.add_argument("--bench-root", help="the benchmark's directory (tsv: the .tsv file; the paper's seven: the folder "
                                        "holding NAME.tsv, as VLMEvalKit stores them)")
    p.add_argument("--latent-steps", type=rundir.at_least(0), default=8, help="K, latent steps per span")
    p.add_argument("--batch-size", type=rundir.at_least(1), default=64, help="questions decoded together")
    p.add_argument("--max-new-tokens", type=rundir.at_least(1),
                   help="reply length cap, latent steps included (default: 32 for small-vl, 2048 for real checkpoints, "
                        "VLMEvalKit's room for a reasoning reply)")
    p.add_argument("--protocol", choices=benchmarks.PROTOCOLS,
                   help="the paper's seven benchmarks: vlmeval (default: VLMEvalKit's prompt, pixel bounds for real "
                        "checkpoints, judge-free verdict and metrics) or lenient (our checker, the RL reward's; the "
                        "default for the other benchmarks and the synthetic split)")
    p.add_argument("--temperature", type=rundir.at_least(0.0, float), default=0.0, help="0 = greedy; else sampling (seeded by --seed)")
    p.add_argument("--top-p", type=rundir.within(0, 1, "(]"), default=1.0, help="nucleus sampling when sampling")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling and of the noise latents")
    p.add_argument("--cache", choices=lvr.CACHES, help="decoder (lvr.generate): default graph on CUDA, dynamic on the CPU")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--drop-latents", action="store_true", help="no latent embedding enters the context")
    m.add_argument("--noise-latents", action="store_true", help="latents replaced by standard normal noise")
    m.add_argument("--noise-norm-latents", action="store_true", help="latents replaced by noise of the same norm")
    m.add_argument("--compare", action="store_true",
                   help="every arm on the same questions: normal, drop (markers only), noise, noise_norm, zero, repeat "
                        "(first latent repeated), shuffle (another question's latents), oracle (the stage-1 targets), "
                        "blind, blind+drop, blind+oracle (no position after the span sees the image), edit and "
                        "blind+edit (counterfactual edit pairs: flip metrics), donor, donor-k4, blind+donor (a donor "
                        "question's latents: how often the answer moves to the donor's), a test-time K sweep (K=0, 2, 4, 16), "
                        "force and never (a span opened first / never opened on every question)")
    m.add_argument("--arms", type=arm_list, metavar="A,B",
                   help="these --compare arms only (normal always first, for the paired differences), e.g. blind,edit,never")
    r = p.add_mutually_exclusive_group()
    r.add_argument("--force-latents", action="store_true", help="every reply opens a latent span")
    r.add_argument("--no-latents", action="store_true", help="no reply opens a latent span")
    r.add_argument("--route", metavar="T1,T2", help="latents forced for these question types, forbidden for the rest")
    p.add_argument("--att-layers", type=rundir.layer_list, default=[0], help="layers of the attention share (as train_rl.py)")
    p.add_argument("--out", help="JSON results file, rewritten after each mode (default: eval_<split or bench>.json in the "
                                   "model's folder; runs/eval_<model name>_<split or bench>.json for a shipped model or a "
                                   "folder that is not writable)")
    M.add_device_args(p)
    p.add_argument("--plot", nargs="+", metavar="LOG", help="draw train_rl.py log(s) side by side and exit")
    p.add_argument("--plot-out", default=os.path.join(rundir.RUNS, "curves.png"), help="PNG file for --plot")
    return p.parse_args(argv)


def arm_list(s: str) -> list[str]:
    """argparse type of --arms: comma-separated names of --compare's arms (or K=n)."""
    arms = [x.strip() for x in s.split(",") if x.strip()]
    known = ARMS + tuple(ROUTE_ARMS)
    bad = [x for x in arms if x not in known and not (x.startswith("K=") and x[2:].isdigit())]
    if not arms or bad:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {', '.join(bad) if bad else repr(s)}; expected some of {', '.join(known)} or K=n")
    return arms


def load_samples(a) -> dict:
    """{name: samples}: the synthetic split, one benchmark, or (--bench all) the paper's seven."""
    if not a.bench:
        return {a.split: data.make_split(a.split, a.n or 500, a.data_seed, task=a.task)}
    if not a.bench_root:
        raise ValueError("--bench needs --bench-root (the benchmark's directory or .tsv file)")
    names = benchmarks.PAPER if a.bench == "all" else [a.bench]
    sets = {}
    for name in names:
        samples = benchmarks.load_benchmark(name, a.bench_root)[:a.n]
        if a.protocol == "vlmeval" and name == "MMVP":
            try:
                vlmeval_rules.mmvp_pairs([s.row for s in samples])
            except ValueError as e:
                raise ValueError(f"--n {a.n}: {e}") from None
        sets[name] = [dataclasses.replace(s, question=benchmarks.prompt_text(s, a.protocol)) for s in samples]
    return sets


def resolve_protocol(a):
    """--protocol: vlmeval for the paper's seven, lenient otherwise (vlmeval only fits the seven)."""
    paper = a.bench == "all" or a.bench in benchmarks.PAPER
    if a.protocol == "vlmeval" and not paper:
        raise ValueError(f"--protocol vlmeval is for the paper's seven benchmarks (--bench all or one of "
                         f"{', '.join(benchmarks.PAPER)}), not {a.bench or 'the synthetic split'}")
    return a.protocol or ("vlmeval" if paper else "lenient")


def write_json(path: str, obj):
    """Write JSON whole or not at all (rundir.writing): a kill or a full disk never leaves half a file."""
    with rundir.writing(path) as f:
        json.dump(obj, f, indent=1)


def output_path(a) -> str:
    """--out (its folder must exist), else eval_<split or bench>.json in the model's folder if it is writable
    and not a shipped (committed) model (a trainer's resume ignores it: rundir.digest), else
    runs/eval_<model name>_<split or bench>.json (rundir.model_name; said in one line)."""
    if a.out:
        if os.path.isdir(a.out):
            raise ValueError(f"--out {a.out} is a folder: give the results file's name")
        folder = os.path.dirname(os.path.abspath(a.out))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--out {a.out}: folder {folder} does not exist")
        return a.out
    name = f"eval_{a.bench or a.split}.json"
    shipped = os.path.abspath(a.model).startswith(os.path.abspath(rundir.SHIPPED) + os.sep)
    if os.path.isdir(a.model) and os.access(a.model, os.W_OK) and not shipped:
        return os.path.join(a.model, name)
    out = os.path.join(rundir.RUNS, f"eval_{rundir.model_name(a.model)}_{a.bench or a.split}.json")
    if P.is_main():
        os.makedirs(rundir.RUNS, exist_ok=True)
        print(f"{a.model} is {'a shipped model' if shipped else 'not a writable folder'}: results go to {out}")
    return out


def check_route(route: str | None, samples):
    types = sorted({s.qtype for s in samples})
    unknown = sorted(set(route.split(",")) - set(types)) if route else []
    if unknown:
        raise ValueError(f"--route: no question of type {', '.join(unknown)} here (types: {', '.join(types)})")


def main(argv=None):
    a = parse_args(argv)
    held = contextlib.ExitStack()  # the results file's lock
    try:
        if a.plot:
            print("wrote", plot(a.plot, a.plot_out))
            return
        a.device = P.init_dist(a.device)  # under torchrun: questions split over the ranks, rank 0 reports
        a.model = a.model or newest_checkpoint()
        out = output_path(a)
        protocol = a.protocol = resolve_protocol(a)
        held.enter_context(rundir.locked_file(out))  # a second eval writing it is refused, before any work
        model, tok = M.load_model(a.model, M.DTYPES[M.resolve_dtype(a)], a.device, max_pixels=a.max_pixels)
        real = model.config.vision_config.in_channels != 5  # small-vl's tower has 5 channels
        if protocol == "vlmeval" and real:  # VLMEvalKit's pixel bounds for Qwen2.5-VL
            model.image_processor = M.image_processor(model.config.vision_config, M.resolve(a.model),
                                                      max_pixels=a.max_pixels or vlmeval_rules.MAX_PIXELS,
                                                      min_pixels=vlmeval_rules.MIN_PIXELS)
        a.max_new_tokens = a.max_new_tokens or (2048 if real else 32)
        rundir.check_layers(model, a.att_layers)
        a.task = a.task or getattr(model.config, M.TASK_KEY, None) or "easy"
        if not a.bench:  # an easy-task small-vl model asked hard questions: their words get (untrained) rows
            tok = M.extend_vocabulary(model, tok, a.task)
        sets = load_samples(a)
        for samples in sets.values():
            check_route(a.route, samples)
        route = "all" if a.force_latents else "none" if a.no_latents else a.route
        chosen = ["drop"] if a.drop_latents else ["noise"] if a.noise_latents else ["noise_norm"] if a.noise_norm_latents else ["normal"]
        modes = [*ARMS, *(f"K={k}" for k in K_SWEEP if k != a.latent_steps), *ROUTE_ARMS] if a.compare else chosen
        if a.arms:
            a.compare, modes = True, ["normal"] + [x for x in a.arms if x != "normal"]
        if a.bench:  # edit pairs need the synthetic scenes
            modes = [m for m in modes if m not in PAIR_ARMS]
        kw = dict(latent_steps=a.latent_steps, route=route, batch_size=a.batch_size, temperature=a.temperature,
                  top_p=a.top_p, seed=a.seed, max_new_tokens=a.max_new_tokens, att_layers=a.att_layers, protocol=protocol,
                  cache=a.cache)
        report = {}
        for name, samples in sets.items():
            results = {}
            for mode in modes:  # the results file is rewritten after each mode: a late failure keeps the rest
                results[mode] = spanless_copy(mode, results) or evaluate(model, tok, samples, mode=mode, **kw)
                summaries = summary.compare(results) if a.compare else {m: summary.summarize(r) for m, r in results.items()}
                if samples and isinstance(samples[0], benchmarks.BenchSample):
                    for m, recs in results.items():
                        summaries[m]["vlmeval"] = benchmarks.report(name, samples, recs)
                report[name] = {"summaries": summaries, "records": results}
                P.on_main(write_json, out, {"model": a.model, "route": route, "protocol": protocol,
                                            **(report[name] if len(sets) == 1 else {"benchmarks": report})})
            if P.is_main():
                print(f"{name}:\n{summary.table(summaries)}" if len(sets) > 1 else summary.table(summaries))
                if "vlmeval" in summaries[modes[0]]:
                    print(summary.vlmeval_lines(name, summaries[modes[0]]["vlmeval"]))
    except (M.ModelLoadError, rundir.RunError, P.RankZeroError, OSError, ValueError, ImportError) as e:
        sys.exit(f"error: {rundir.oneline(e)}" if P.is_main() else 1)  # rank 0 says it, once
    finally:
        held.close()
    if not P.is_main():
        return
    if len(sets) > 1 or a.bench in benchmarks.PAPER:
        print(summary.bench_table({name: r["summaries"][modes[0]] for name, r in report.items()}))
    print("wrote", out)


if __name__ == "__main__":
    main()
