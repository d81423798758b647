"""Supervised training of an LVR model and of the text-only baseline, on the synthetic spatial data.

Stage 0, the base model (small-vl only, once per seed, shared by every stage-1 variant): small-vl starts
from random weights, so the whole model, vision tower included, learns the task with plain text replies,
helped by dense grounding: a linear probe reads every merged visual token's cell (colour, shape, size of
the object over it, column, row) from the scene description. It stands in for the pretrained VLM the
paper starts from. Seeds 0-2's are shipped in checkpoints/; another seed's -> runs/small-vl-base-seedN.
Stage 1, LVR SFT (what this script is for): from the base, vision tower frozen as in LVR. A
--latent-fraction share of the replies carry a latent span (of 1..16 slots, --span-lengths) whose
slots are teacher-forced with the question's region tokens (lvr.py, "Stage-1 loss"); the rest answer
directly, so the model still chooses whether to open a span. --no-latents trains the same stage without spans: the paper's text-only baseline.

    python train_sft.py --model small-vl                  # base (if missing), then LVR SFT -> runs/small-vl-sft
    python train_sft.py --model small-vl --no-latents     # baseline from the same base -> runs/small-vl-sft-text
    python train_sft.py --model small-vl --resume         # continue killed runs (the base's too)
    python train_sft.py --model small-vl --task hard      # stage 1 on the hard question mix, from the shipped base
    python train_sft.py --model DIR --data lvr_sft.json   # stage 1 only, from a Qwen2.5-VL checkpoint (or hub id)

A real checkpoint (--model DIR or a cached hub id) needs --data (LVR's SFT format, data.py) and gets its
own defaults: lr 1e-5 (LVR's), no pointing loss (it needs the synthetic scenes), run folder
runs/<model name>-sft; --data holds out a seeded --val-fraction of its rows for validation.

Each run directory gets checkpoint/ (HF format, safetensors), trainer_state.pt (for --resume), log.jsonl
(metrics per step; all three written by rundir.py) and eval_val.json (validation: normal / drop / noise
latents, blank image, latent rate).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import datafiles
import eval as ev
import lvr
import model as M
import parallel as P
import reward
import rundir
import summary

OFFSET = {0: 0, 1: 10 ** 8}  # stream positions of each stage's questions (train_rl.py starts at 2 * 10**8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small-vl", help="'small-vl' (its base model, made first if missing) or a checkpoint")
    p.add_argument("--out", help="run directory (default runs/small-vl-sft, or runs/small-vl-sft-text with --no-latents)")
    p.add_argument("--base", help="small-vl's base model: a model directory, or a run folder trained first when "
                                  "unfinished (default: the shipped checkpoints/small-vl-base, -s1, -s2 for seeds 0-2 at the "
                                  "default --base-steps, else runs/small-vl-base[-seedN]; --base runs/small-vl-base "
                                  "retrains seed 0's)")
    p.add_argument("--data", type=rundir.existing_file, help="LVR-format data (JSON array or JSONL) instead of the synthetic generator")
    p.add_argument("--task", choices=list(data.TASKS),
                   help="synthetic question mix (data.py): hard (default) or easy (the first study's); --resume keeps "
                        "the run's. An easy-task model trained on hard gets the hard words' embeddings added")
    p.add_argument("--val-fraction", type=rundir.within(0, 1, "()"), default=0.05,
                   help="with --data: share of its rows held out for validation (at least 1, at most --n-val)")
    p.add_argument("--max-pixels", type=rundir.at_least(1), help="real checkpoints: override their max_pixels (image resize bound)")
    p.add_argument("--no-latents", action="store_true", help="text-only baseline: no reply carries a latent span")
    p.add_argument("--strict", action="store_true",
                   help="stage 1 under the image-blind interface (CVRR): the reply from a span's <|lvr_end|> on does not "
                        "see the image, so the answer has only the latents (lvr.py); validation decodes the same way")
    p.add_argument("--latent-fraction", type=rundir.within(0, 1), default=0.75, help="share of replies that carry a latent span")
    p.add_argument("--latent-steps", type=rundir.at_least(1), default=8, help="K: latent steps per span when decoding (evaluation)")
    p.add_argument("--span-lengths", metavar="LO,HI", type=span_range, default=(1, 16),
                   help="pooled targets: each training reply's span length, drawn from LO..HI per sample, so the text after "
                        "a span is seen at many offsets (results/NOTES.md: the drop collapse of fixed spans); '8,8' trains K = 8 only")
    p.add_argument("--latent-targets", default="pooled", choices=["pooled", "bbox"],
                   help="pooled: region tokens averaged onto K slots (matches inference); bbox: every token in the boxes")
    p.add_argument("--lam", type=rundir.at_least(0.0, float),
                   help="weight of the latent MSE against the text CE; default 1 for small-vl (results/NOTES.md: why LVR SFT "
                        "trailed text SFT at 0.1), the paper's 0.1 for a real checkpoint")
    p.add_argument("--base-steps", type=rundir.at_least(1), default=rundir.BASE_STEPS, help="stage 0 steps (the small-vl base model)")
    p.add_argument("--steps", type=rundir.at_least(1), default=1500, help="stage 1 steps (vision tower frozen)")
    p.add_argument("--ground-weight", type=rundir.at_least(0.0, float), default=1.0, help="weight of the grounding probe's loss in stage 0")
    p.add_argument("--coord-weight", type=rundir.at_least(0.0, float), default=0.25,
                   help="stage 0: weight of the coordinate read-out at reply words that name an object (layer 0's "
                        "output must hold the centre of that object and of the one named before it; 0 = off)")
    p.add_argument("--point-weight", type=rundir.at_least(0.0, float),
                   help="weight of the pointing loss (layer 0, head 0 attends from an object's name to its cells); "
                        "default 1 for small-vl, 0 for a real checkpoint")
    p.add_argument("--batch-size", type=rundir.at_least(1), default=32, help="questions per step")
    p.add_argument("--lr", type=rundir.positive(),
                   help="peak learning rate (AdamW, warm-up then cosine to 10%%); default 1e-3 small-vl, 1e-5 a real checkpoint")
    p.add_argument("--warmup", type=rundir.at_least(0), default=30, help="warm-up steps")
    p.add_argument("--min-lr", type=rundir.within(0, 1), default=0.1, help="cosine decay ends at this fraction of --lr (1 = constant)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data and the latent choice")
    p.add_argument("--n-val", type=rundir.at_least(1), default=500, help="validation questions for the final table")
    p.add_argument("--eval-every", type=rundir.at_least(0), default=250, help="quick greedy validation every N steps (0 = never)")
    p.add_argument("--save-every", type=rundir.at_least(1), default=250, help="write a checkpoint every N steps (and at the end)")
    rundir.add_run_args(p)
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of the decoder layers (non-reentrant)")
    p.add_argument("--param-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the trained weights, their gradients and AdamW's state")
    P.add_parallel_args(p)
    M.add_device_args(p)
    a = p.parse_args(argv)
    a.dtype = M.resolve_dtype(a)
    real = a.model != "small-vl"
    if real and not a.data:
        p.error("a real checkpoint (--model DIR or hub id) needs --data: the synthetic scenes are small-vl's")
    a.lr = a.lr if a.lr is not None else 1e-5 if real else 1e-3
    a.point_weight = a.point_weight if a.point_weight is not None else 0.0 if real else 1.0
    a.lam = a.lam if a.lam is not None else 0.1 if real else 1.0
    if a.out is None:
        a.out = os.path.join(rundir.RUNS, f"{rundir.model_name(a.model)}-sft" + ("-text" if a.no_latents else "")
                             + ("-strict" if a.strict else "") + ("" if real else rundir.task_suffix(a.task)))
    if a.base is None:
        a.base = rundir.shipped_base(a.seed, a.base_steps) or os.path.join(rundir.RUNS, "small-vl-base" + (f"-seed{a.seed}" if a.seed else ""))
    elif os.path.exists(a.base) and not os.path.isdir(a.base):
        p.error(f"argument --base: {a.base} is a file, not a model folder or a run folder")
    return a


def span_range(s: str) -> tuple[int, int]:
    """argparse type of --span-lengths: 'LO,HI' with 1 <= LO <= HI."""
    try:
        lo, hi = (int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two integers), got {s!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= LO <= HI, got {s!r}")
    return lo, hi


def span_length(args, index: int) -> int:
    """Latent slots of sample `index`'s span: a seeded draw from --span-lengths LO..HI."""
    return int(np.random.default_rng([args.seed, 2, index]).integers(args.span_lengths[0], args.span_lengths[1] + 1))


def wants_latent(args, stage: int, index: int) -> bool:
    if args.no_latents or stage == 0:
        return False
    return bool(np.random.default_rng([args.seed, 1, index]).random() < args.latent_fraction)


def lr_at(args, step: int, steps: int) -> float:
    """Warm-up, then cosine from --lr down to --min-lr of it at the last step."""
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    return args.lr * warm * (args.min_lr + (1 - args.min_lr) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))


POINT_PREV_HEAD = 2  # layer-0 head that points at the previously named object (its own KV head)


class GroundingProbe(torch.nn.Module):
    """Dense grounding for stage 0. Every merged visual token is classified by the colour and the shape of
    the object over its cell (or background), by that object's size and by the cell's column and row.
    Colour and shape are scored by cosine similarity with the decoder's own input embeddings of the
    colour and shape words (CLIP-like), so the token of a red cell and the word "red" come to share a
    direction: the question's words can then find their objects by a plain "same direction" match in
    attention, the step a tiny decoder otherwise fails to learn (results/NOTES.md, "How small-vl was made
    to learn"). The probe reads RMS-normalised tokens so it never pays the tower to grow their scale.
    Training-only: it is not part of the checkpoint (the tied embeddings are)."""

    def __init__(self, model, tok, grid: int = 6):
        super().__init__()
        self.words = [tok.convert_tokens_to_ids(list(data.COLOURS)), tok.convert_tokens_to_ids(list(data.SHAPES))]
        self.embed = model.get_input_embeddings()  # shared with the model, not a copy
        dim = self.embed.weight.shape[1]
        self.background = torch.nn.Parameter(torch.zeros(2, dim))  # "no object" prototypes
        self.scale = torch.nn.Parameter(torch.tensor(10.0))
        self.sizes = (4, grid, grid)
        self.head = torch.nn.Linear(dim, sum(self.sizes))
        self.coord = torch.nn.Linear(dim, 4)  # centres (x, y) of the object a word names and of the one before it
        torch.nn.init.zeros_(self.coord.weight), torch.nn.init.zeros_(self.coord.bias)  # draws no random numbers

    @staticmethod
    def labels(samples, gh: int, gw: int) -> torch.Tensor:
        """(n_cells, 5): colour, shape, size bin of the object over each cell (0: background), column, row."""
        out = torch.zeros(len(samples), gh * gw, 5, dtype=torch.long)
        out[..., 3] = torch.arange(gw).repeat(gh)
        out[..., 4] = torch.arange(gh).repeat_interleave(gw)
        for i, s in enumerate(samples):
            for o in s.objects:
                size_bin = 1 + min(2, max(0, int(3 * (o.r * data.IMAGE_SIZE / s.image.shape[0] - data.RADIUS[0])
                                                 / (data.RADIUS[1] - data.RADIUS[0]))))  # the hard task's are smaller
                cells = lvr.region_tokens(o.bbox(s.image.shape[0]), gh, gw)
                out[i, cells, :3] = torch.tensor([1 + list(data.COLOURS).index(o.colour), 1 + data.SHAPES.index(o.shape), size_bin])
        return out.reshape(-1, 5)

    def forward(self, feats, labels):
        x = feats.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        labels = labels.to(x.device)
        loss = 0.0
        for j, ids in enumerate(self.words):  # colour, shape: cosine against [background, word embeddings]
            protos = torch.cat([self.background[j:j + 1], self.embed.weight[ids].float()])
            logits = self.scale * F.normalize(x, dim=-1) @ F.normalize(protos, dim=-1).T
            loss = loss + F.cross_entropy(logits, labels[:, j])
        for j, lo in enumerate(self.head(x).split(self.sizes, dim=-1)):
            loss = loss + F.cross_entropy(lo, labels[:, 2 + j])
        return loss


def naming_words(tok, ids, labels, samples):
    """(row, position, objects it names, objects the previous such word named) for every reply word that
    names objects: a colour, or the shape an attribute question names."""
    colours, shapes = {tok.convert_tokens_to_ids(c): c for c in data.COLOURS}, {tok.convert_tokens_to_ids(x): x for x in data.SHAPES}
    for b, s in enumerate(samples):
        prev = []
        for p in (labels[b] != -100).nonzero()[:, 0].tolist():
            word = ids[b, p].item()
            named = [o for o in s.objects if colours.get(word) == o.colour
                     or (s.qtype in ("attribute", "search") and shapes.get(word) == o.shape)]
            if named:
                yield b, p, named, prev
                prev = named


def coord_loss(probe, h0, batch, samples, tok):
    """At every reply word that names one object: a linear read-out of layer 0's output (RMS-normalised)
    should give that object's centre and the centre of the one object the previous naming word named, as
    fractions of the image less 0.5; squared error in units of a uniform coordinate's variance (1/12), so
    that chance is about 1. Position and distance questions need both centres at the second word ("yellow
    purple below"), which is the step that failed for most base seeds (results/NOTES.md). Returns (loss, number of
    coordinates it averages over: the weight of its mean when ranks are combined)."""
    rows, want, known = [], [], []
    for b, p, named, prev in naming_words(tok, batch["input_ids"], batch["labels"], samples):
        if len(named) != 1:
            continue
        h, w = samples[b].image.shape[:2]
        centre = lambda objs: [objs[0].cx / w - 0.5, objs[0].cy / h - 0.5] if len(objs) == 1 else [0.0, 0.0]  # noqa: E731
        rows.append((b, p))
        want.append(centre(named) + centre(prev))
        known.append([1.0, 1.0] + [float(len(prev) == 1)] * 2)
    if not rows:
        return h0.new_zeros(()), 0
    x = h0[tuple(torch.tensor(rows, device=h0.device).T)].float()
    pred = probe.coord(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    want, known = torch.tensor(want, device=x.device), torch.tensor(known, device=x.device)
    return 12 * ((pred - want).pow(2) * known).sum() / known.sum(), int(known.sum())  # count: what it averages over


@contextlib.contextmanager
def layer0_output(model, on: bool):
    """Within the block, forwards of the language model record decoder layer 0's output in the yielded list."""
    got = []
    hook = model.model.language_model.layers[0].register_forward_hook(
        lambda _m, _i, out: got.append(out[0] if isinstance(out, tuple) else out)) if on else None
    try:
        yield got
    finally:
        if hook is not None:
            hook.remove()


def point_loss(model, tok, qk, batch, samples, with_count: bool = False, blind=None):
    """Pointing: at every reply word that names objects (a colour; the shape an attribute question
    names), head 0 of decoder layer 0 should put its attention on those objects' cells, and head 2 on
    the cells of the objects the previous such word named (so a pair's second word sees both objects,
    e.g. "yellow purple below"): -log(attention mass on the cells), averaged over such words and heads.
    Synthetic data only (needs the scene). with_count: also the number of (word, head) terms averaged.
    blind (B, L) bool: positions that may not see the image (--strict, after a span): their words are skipped."""
    q, k = qk[0]
    q, k = q.float(), k.float()  # (B, H, L, d), (B, Hkv, L, d)
    group = q.shape[1] // k.shape[1]
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
    rows = []
    for b, p, named, prev in naming_words(tok, ids, labels, samples):
        if blind is not None and blind[b, p]:
            continue
        s = samples[b]
        cells = (ids[b] == model.config.image_token_id).nonzero()[:, 0]
        gh, gw = M.merged_grid(s.image.shape, model)
        for head, objs in ((0, named), (POINT_PREV_HEAD, prev)):
            target = sorted({c for o in objs for c in lvr.region_tokens(o.bbox(s.image.shape[0]), gh, gw)})
            if target:
                rows.append((b, head, p, cells[target]))
    if not rows:
        return (q.new_zeros(()), 0) if with_count else q.new_zeros(())
    losses = []
    for b, head, p, target in rows:
        logits = (k[b, head // group, :p + 1] @ q[b, head, p]) / q.shape[-1] ** 0.5
        logits = logits.masked_fill(~mask[b, :p + 1], float("-inf"))
        losses.append(logits.logsumexp(0) - logits[target].logsumexp(0))
    return (torch.stack(losses).mean(), len(losses)) if with_count else torch.stack(losses).mean()


def start(args, stage: int, out: str, init: str | None):
    """(model, tokenizer, probe, optimizer, trainer state) of a stage; from OUT's newest save when resuming.
    Under torchrun every rank loads the weights and the trainer state, then shards (--fsdp) and builds its optimizer."""
    found = rundir.resume_point(out) if args.resume else None
    if args.resume and not found and P.is_main():
        print(f"no checkpoint in {out}: starting fresh")
    if found or init is not None:
        model, tok = M.load_model(found[0] if found else init, M.DTYPES[args.param_dtype], args.device,
                                  max_pixels=args.max_pixels)
    else:
        model, tok = M.build_small_vl(args.seed, args.task)
        model.to(args.device, M.DTYPES[args.param_dtype])
    if args.data is None:  # the synthetic scenes: the task's words, and the task recorded in config.json
        tok = M.extend_vocabulary(model, tok, args.task)
        setattr(model.config, M.TASK_KEY, args.task)
    if args.grad_ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    grid = M.merged_grid((data.IMAGE_SIZE, data.IMAGE_SIZE), model)[0]
    probe = GroundingProbe(model, tok, grid).to(args.device)
    for p in model.model.visual.parameters():
        p.requires_grad_(stage == 0)
    own = [p for n, p in probe.named_parameters() if not n.startswith("embed.")]  # the embeddings are the model's
    state = {"step": 0, "skips": 0, "dtype": M.saved_dtype(found[0] if found else init) if (found or init) else None}
    if found:
        state = {**state, **rundir.load_state(found, model)}  # the master weights, before FSDP shards them
        rundir.check_resume(state.get("args", {}), vars(args), ("seed", "batch_size", "data", "task"))
        probe.load_state_dict({**probe.state_dict(), **state["probe"]})  # older checkpoints also hold embed.weight
    if args.fsdp and stage == 1:  # stage 0 (the tiny small-vl base, whose probe shares the embeddings) stays whole
        P.shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad] + (own if stage == 0 else [])
    opt = P.make_optimizer(params, args.lr, args.zero)
    if found:
        P.load_optimizer_state(model, opt, state["optimizer"])
        if P.is_main():
            print(f"resuming {out} at step {state['step']}")
    return model, tok, probe, opt, state


def sft_step(args, model, tok, probe, samples, index, stage: int) -> dict:
    """CE + lam * MSE on a batch whose replies carry latent spans where wants_latent says so; in stage 0
    plus the grounding probe's loss on every merged visual token."""
    wants = [wants_latent(args, stage, i) for i in index]
    batch, W = lvr.sft_batch(model, tok, samples, wants, [span_length(args, i) for i in index], args.latent_targets)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    point = args.point_weight > 0 and args.data is None
    strict = getattr(args, "strict", False) and stage == 1
    coord = stage == 0 and args.coord_weight > 0 and args.data is None
    with reward.capture_qk(model, [0] if point else []) as qk, layer0_output(model, coord) as h0:
        out = lvr.sft_loss(model, batch, W.to(args.device), args.lam, blind=strict)
    out["latent_share"] = sum(wants) / len(samples)
    if point:
        blind = lvr.post_span(batch["input_ids"], model.config.lvr_end_id) if strict else None
        out["point"], out["n_point"] = point_loss(model, tok, qk, batch, samples, with_count=True, blind=blind)
        out["loss"] = out["loss"] + args.point_weight * out["point"]
    if stage == 0 and args.ground_weight > 0:
        out["ground"] = probe(out["feats"], probe.labels(samples, *M.merged_grid(samples[0].image.shape, model)))
        out["n_ground"] = out["feats"].shape[0]
        out["loss"] = out["loss"] + args.ground_weight * out["ground"]
    if coord:
        out["coord"], out["n_coord"] = coord_loss(probe, h0[0], batch, samples, tok)
        out["loss"] = out["loss"] + args.coord_weight * out["coord"]
    out["n_latent_share"] = len(samples)
    return out


TERMS = ("ce", "mse", "point", "ground", "coord")


def across_ranks(args, out: dict) -> dict:
    """Under torchrun: each loss term reweighted so that, gradients averaged over ranks, it is its mean over
    the whole batch of every rank (as one process takes it); the logged values are those global means."""
    if P.world() == 1:
        return {k: float(out[k].detach()) if torch.is_tensor(out[k]) else out[k] for k in TERMS + ("loss", "latent_share") if k in out}
    weight = {"ce": 1.0, "mse": args.lam, "point": args.point_weight, "ground": args.ground_weight, "coord": args.coord_weight}
    keys = [k for k in TERMS + ("latent_share",) if k in out]
    n = torch.tensor([float(out[f"n_{k}"]) for k in keys], dtype=torch.float64)
    sums = P.all_sum(torch.stack([n, n * torch.tensor([float(out[k]) for k in keys], dtype=torch.float64)]))
    total = sums[0].clamp(min=1)
    share = dict(zip(keys, (n * P.world() / total).tolist()))
    out["loss"] = sum(weight[k] * out[k] * share[k] for k in keys if k in weight)
    logged = dict(zip(keys, (sums[1] / total).tolist()))
    return {**logged, "loss": sum(weight[k] * logged[k] for k in keys if k in weight)}


def train(args, stage: int, out: str, init: str | None) -> str:
    """One stage into run directory `out`; returns its checkpoint. Under torchrun each rank takes an equal
    contiguous share of every batch; rank 0 alone logs, shows the bar and writes checkpoints."""
    torch.manual_seed(args.seed + stage)
    with rundir.locked(out, args):
        return _train(args, stage, out, init)


def resolve_task(args, out: str):
    """--task as given; else the task of the run being resumed (its checkpoint's config.json); else the default."""
    if args.task is None:
        found = rundir.resume_point(out) if args.resume else None
        args.task = M.saved_task(found[0]) if found else data.DEFAULT_TASK


def _train(args, stage: int, out: str, init: str | None) -> str:
    resolve_task(args, out)
    stream = datafiles.Stream(args)
    model, tok, probe, opt, state = start(args, stage, out, init)
    step, skips, streak = state["step"], state["skips"], 0
    total = args.base_steps if stage == 0 else args.steps
    log = rundir.start_log(out, step)
    model.train()
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    bar = tqdm(range(step, total), initial=step, total=total, desc=f"stage {stage}", disable=not P.is_main())
    mine = P.share(args.batch_size, "--batch-size")
    params = [p for g in opt.param_groups for p in g["params"]]
    for step in bar:
        t0 = time.time()
        first = OFFSET[stage] + step * args.batch_size
        index = range(first + mine.start, first + mine.stop)
        samples = [stream[i] for i in index]
        lr = lr_at(args, step, total)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast:
            res = P.run(model, sft_step, args, model, tok, probe, samples, index, stage)
            logged = across_ranks(args, res)
        opt.zero_grad(set_to_none=True)
        res["loss"].backward()  # on every rank (FSDP's backward is a collective)
        P.average_grads(params)
        skipped = not rundir.clip_and_step(opt, 1.0)  # the averaged gradients: every rank decides alike
        opt.zero_grad(set_to_none=True)  # not kept through the next forward
        skips += skipped
        row = {"step": step + 1, "stage": stage, "lr": lr, "skipped": skipped, "skips": skips, "sec": time.time() - t0,
               **logged}
        rundir.log(log, row)
        bar.set_postfix({k: f"{row[k]:.3f}" for k in ("ground", "coord", "point", "ce", "mse") if k in row})
        streak = rundir.skip_streak(streak, skipped, step + 1, total)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            ev.quick_eval(model, tok, stream.val(100), step + 1, log, bar, blind=getattr(args, "strict", False),
                          latent_steps=args.latent_steps)
        if (step + 1) % args.save_every == 0 or step + 1 == total:
            probe_state = {k: v for k, v in probe.state_dict().items() if not k.startswith("embed.")}  # the model's
            rundir.save(out, model, tok, {"step": step + 1, "probe": probe_state, "skips": skips, "args": vars(args)},
                        state["dtype"], opt)
    return os.path.join(out, rundir.CKPT)


def base_model(args) -> str:
    """small-vl's stage-0 checkpoint: --base itself when it is a model directory (the shipped one), else
    that run's checkpoint, trained first when missing or unfinished (its table written if missing)."""
    if os.path.isfile(os.path.join(args.base, "config.json")):
        return args.base
    ckpt = os.path.join(args.base, rundir.CKPT)
    if rundir.saved_step(args.base) >= args.base_steps:
        if not os.path.isfile(os.path.join(args.base, "eval_val.json")):  # killed after its last save
            final_eval(args, ckpt, args.base, modes=("normal", "blank image"))
        return ckpt
    if P.is_main():
        print(f"small-vl base model {args.base} is missing or unfinished: training it first (stage 0)")
    t0 = time.time()
    args = argparse.Namespace(**{**vars(args), "data": None})  # the base always learns the synthetic scenes
    ckpt = train(args, 0, args.base, None)
    if P.is_main():
        print(f"base model trained in {time.time() - t0:.0f}s: {ckpt}")
    final_eval(args, ckpt, args.base, modes=("normal", "blank image"))
    return ckpt


def final_eval(args, ckpt: str, out: str, modes=None) -> dict:
    """The validation table: latent interventions, blank images, latent rate (greedy and sampled) -> OUT/eval_val.json.
    Under torchrun the questions are split over the ranks; rank 0 prints and writes."""
    with rundir.locked(out):
        model, tok = M.load_model(ckpt, M.DTYPES[args.dtype], args.device)
        args = argparse.Namespace(**{**vars(args), "task": args.task or M.saved_task(ckpt)})  # the model's task
        val = datafiles.Stream(args).val(args.n_val)
        table = {"normal": {}, "drop": {"mode": "drop"}, "noise": {"mode": "noise"}, "noise_norm": {"mode": "noise_norm"},
                 "blank image": {"blank": True}, "sampled T=1": {"temperature": 1.0}}
        if getattr(args, "strict", False):  # the interface it was trained for, first
            table = {"blind": {"mode": "blind"}, "blind+drop": {"mode": "blind+drop"}, **table}
        res = {name: summary.summarize(ev.evaluate(model, tok, val, latent_steps=args.latent_steps, **kw))
               for name, kw in table.items() if modes is None or name in modes}
        if P.is_main():
            print(summary.table(res))
        P.on_main(ev.write_json, os.path.join(out, "eval_val.json"), res)
    return res


def main(argv=None):
    args = parse_args(argv)
    try:
        args.device = P.init_dist(args.device)
        P.check_parallel(args)
        if args.data:
            datafiles.load_jsonl(args.data)  # bad rows fail now, not after the base model's training
        rundir.claim(args.out, args, remove=False)  # a folder holding a run fails now too (removed under its lock)
        init = args.model if args.model != "small-vl" else base_model(args)
        t0 = time.time()
        ckpt = train(args, 1, args.out, init)
        if P.is_main():
            print(f"stage 1 trained in {time.time() - t0:.0f}s; checkpoint: {ckpt}")
        final_eval(args, ckpt, args.out)
    except (M.ModelLoadError, rundir.RunError, P.RankZeroError, OSError, ValueError) as e:
        sys.exit(f"error: {rundir.oneline(e)}" if P.is_main() else 1)  # rank 0 says it, once


if __name__ == "__main__":
    main()
