"""Supervised training of an LVR model (and of the text-only baseline) on the synthetic spatial data.

Two stages. Stage 0 (--vision-steps, small-vl only, which starts from random weights): the vision
tower learns to see the objects; a linear probe reads every merged visual token's cell (colour, shape,
size) from the scene description (dense grounding; no language-model pass, so these steps are cheap).
Stage 1 (--steps): LVR SFT with the vision tower frozen, as in LVR. A --latent-fraction share of the
replies carry a latent span whose slots are teacher-forced with the question's region tokens (lvr.py,
"Stage-1 loss"); the rest answer directly, so the trained model still chooses whether to open a span.
Stage 0 is skipped for a checkpoint that already sees (--model DIR) and for --data (no scene labels).

    python train_sft.py --model small-vl                   # LVR SFT   -> runs/small-vl-sft
    python train_sft.py --model small-vl --no-latents      # baseline  -> runs/small-vl-sft-text
    python train_sft.py --model small-vl --resume          # continue a killed run where it stopped
    python train_sft.py --model DIR --data my.jsonl        # a local Qwen2.5-VL checkpoint on your data

Writes OUT/checkpoint (HF format, safetensors, replaced atomically), OUT/log.jsonl (metrics per step)
and OUT/eval_val.json (the final validation table: normal / drop / noise latents, blank image).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

import data
import eval as ev
import lvr
import model as M

RUNS = "runs"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small-vl", help="'small-vl' (fresh tiny Qwen2.5-VL) or a checkpoint directory")
    p.add_argument("--out", help="run directory (default runs/small-vl-sft, or runs/small-vl-sft-text with --no-latents)")
    p.add_argument("--data", help="LLaVA-style JSONL to train on instead of the synthetic generator")
    p.add_argument("--no-latents", action="store_true", help="text-only baseline: no reply carries a latent span")
    p.add_argument("--latent-fraction", type=float, default=0.75, help="share of replies that carry a latent span")
    p.add_argument("--latent-steps", type=int, default=8, help="K: latent slots per span (and decode steps at eval)")
    p.add_argument("--latent-targets", default="pooled", choices=["pooled", "bbox"],
                   help="pooled: region tokens averaged onto K slots (matches inference); bbox: every token in the boxes")
    p.add_argument("--lam", type=float, default=0.1, help="weight of the latent MSE against the text CE")
    p.add_argument("--vision-steps", type=int, default=300, help="stage 0: vision warm-up steps (small-vl only)")
    p.add_argument("--steps", type=int, default=1800, help="stage 1: LVR SFT steps (vision tower frozen)")
    p.add_argument("--batch-size", type=int, default=32, help="questions per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, warm-up then cosine to 10%%)")
    p.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data and the latent choice")
    p.add_argument("--n-val", type=int, default=500, help="validation questions for the final table")
    p.add_argument("--eval-every", type=int, default=250, help="quick greedy validation every N steps (0 = never)")
    p.add_argument("--save-every", type=int, default=250, help="write a checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint with the same data order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    a = p.parse_args(argv)
    if a.out is None:
        a.out = os.path.join(RUNS, "small-vl-sft-text" if a.no_latents else "small-vl-sft")
    if not 0 <= a.latent_fraction <= 1:
        p.error("--latent-fraction must be in [0, 1]")
    return a


class Stream:
    """The training questions in a fixed order given the seed: sample i of step s is index s*B+i."""

    def __init__(self, args):
        self.seed, self.rows = args.seed, data.load_jsonl(args.data) if args.data else None

    def __getitem__(self, index: int) -> data.Sample:
        if self.rows is None:
            return data.make_sample(self.seed, "train", index)
        epoch, i = divmod(index, len(self.rows))
        return self.rows[np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))[i]]

    def val(self, n: int) -> list[data.Sample]:
        return self.rows[:n] if self.rows is not None else data.make_split("val", n, self.seed)


def wants_latent(args, index: int) -> bool:
    if args.no_latents:
        return False
    return bool(np.random.default_rng([args.seed, 1, index]).random() < args.latent_fraction)


def lr_at(args, step: int, steps: int) -> float:
    """Warm-up, then cosine from --lr down to 10% of it at the end of the stage."""
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))


class GroundingProbe(torch.nn.Module):
    """Vision warm-up: a linear probe reads each merged visual token's cell (colour, shape, size) from
    the scene description, so the tower learns object features in tens of steps instead of having to
    discover them through the answer letter alone. Training-only: it is not part of the checkpoint."""

    def __init__(self, dim: int):
        super().__init__()
        self.sizes = (len(data.COLOURS) + 1, len(data.SHAPES) + 1, 4)
        self.head = torch.nn.Linear(dim, sum(self.sizes))

    @staticmethod
    def labels(samples, gh: int, gw: int) -> torch.Tensor:
        """(n_cells, 3): colour, shape, size bin of the object over each cell, 0 for background."""
        out = torch.zeros(len(samples), gh * gw, 3, dtype=torch.long)
        for i, s in enumerate(samples):
            for o in s.objects:
                size_bin = 1 + min(2, int(3 * (o.r * data.IMAGE_SIZE / s.image.shape[0] - data.RADIUS[0])
                                          / (data.RADIUS[1] - data.RADIUS[0])))
                cells = lvr.region_tokens(o.bbox(s.image.shape[0]), gh, gw)
                out[i, cells] = torch.tensor([1 + list(data.COLOURS).index(o.colour), 1 + data.SHAPES.index(o.shape), size_bin])
        return out.reshape(-1, 3)

    def forward(self, feats, labels):
        logits = self.head(feats.float()).split(self.sizes, dim=-1)
        return sum(torch.nn.functional.cross_entropy(lo, labels[:, j].to(lo.device)) for j, lo in enumerate(logits))


def start(args):
    """(model, tokenizer, probe, optimizer, first step); from OUT/checkpoint when resuming."""
    ckpt = os.path.join(args.out, "checkpoint")
    resume = args.resume and os.path.isdir(ckpt)
    if args.resume and not resume:
        print(f"no checkpoint in {args.out}: starting fresh")
    if resume:
        model, tok = M.load_model(ckpt, device=args.device)
    elif args.model == "small-vl":
        model, tok = M.build_small_vl(args.seed)
        model.to(args.device)
    else:
        model, tok = M.load_model(args.model, device=args.device)
        args.vision_steps = 0  # a real checkpoint already sees
    if args.data:
        args.vision_steps = 0  # user data has no scene description to ground on
    probe = GroundingProbe(model.config.vision_config.out_hidden_size).to(args.device)
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False) if resume else {"step": 0}
    if resume:
        probe.load_state_dict(state["probe"])
        print(f"resuming {args.out} at step {state['step']}")
    opt = optimizer(args, model, probe, state["step"])
    if resume:
        opt.load_state_dict(state["optimizer"])
    return model, tok, probe, opt, state["step"]


def optimizer(args, model, probe, step: int):
    """Stage 0 trains the vision tower and the probe; stage 1 everything but the vision tower."""
    stage0 = step < args.vision_steps
    for p in model.parameters():
        p.requires_grad_(not stage0)
    for p in model.model.visual.parameters():
        p.requires_grad_(stage0)
    params = [p for p in model.parameters() if p.requires_grad] + (list(probe.parameters()) if stage0 else [])
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)


def log_line(path: str, row: dict, upto: int | None = None):
    """Append a JSON row; with `upto`, first drop rows past that step (a resumed run rewrites them)."""
    if upto is not None and os.path.exists(path):
        keep = [line for line in open(path) if json.loads(line).get("step", 0) <= upto]
        with open(path, "w") as f:
            f.writelines(keep)
    if row:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def vision_step(args, model, probe, samples) -> dict:
    """Stage 0: the grounding probe's loss on every merged visual token."""
    pix, grids = zip(*(M.preprocess_image(s.load_image(), model.config.vision_config) for s in samples))
    feats = lvr.image_features(model, torch.cat(pix).to(args.device), torch.cat(grids).to(args.device))
    loss = probe(feats, probe.labels(samples, *M.merged_grid(samples[0].image.shape, model.config.vision_config)))
    return {"loss": loss, "ground": loss.detach()}


def sft_step(args, model, tok, samples, index) -> dict:
    """Stage 1: CE + lam * MSE on a batch whose replies carry latent spans where wants_latent says so."""
    batch, W = lvr.sft_batch(model, tok, samples, [wants_latent(args, i) for i in index], args.latent_steps,
                             args.latent_targets)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    out = lvr.sft_loss(model, batch, W.to(args.device), args.lam)
    out["latent_share"] = W.shape[0] / max(1, args.latent_steps) / len(samples)
    return out


def train(args) -> str:
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    stream = Stream(args)
    model, tok, probe, opt, step = start(args)
    total = args.vision_steps + args.steps
    log = os.path.join(args.out, "log.jsonl")
    log_line(log, {}, upto=step)
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda")
    bar = tqdm(range(step, total), initial=step, total=total, desc="sft")
    for step in bar:
        stage = 0 if step < args.vision_steps else 1
        if step == args.vision_steps and step > 0:
            opt = optimizer(args, model, probe, step)
        t0 = time.time()
        index = range(step * args.batch_size, (step + 1) * args.batch_size)
        samples = [stream[i] for i in index]
        lr = lr_at(args, step - args.vision_steps if stage else step, args.steps if stage else args.vision_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast:
            out = vision_step(args, model, probe, samples) if stage == 0 else sft_step(args, model, tok, samples, index)
        opt.zero_grad(set_to_none=True)
        skipped = not torch.isfinite(out["loss"])
        if skipped:
            warnings.warn(f"step {step}: non-finite loss, update skipped")
        else:
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
        row = {"step": step + 1, "stage": stage, "lr": lr, "skipped": skipped, "sec": time.time() - t0,
               **{k: float(v.detach()) if torch.is_tensor(v) else v for k, v in out.items() if k in ("loss", "ce", "mse", "ground", "latent_share")}}
        log_line(log, row)
        bar.set_postfix({k: f"{row[k]:.3f}" for k in ("ground", "ce", "mse") if k in row})
        if stage and args.eval_every and (step + 1 - args.vision_steps) % args.eval_every == 0:
            model.eval()
            quick = ev.summarize(ev.evaluate(model, tok, stream.val(100), latent_steps=args.latent_steps, progress=False))
            model.train()
            log_line(log, {"step": step + 1, "val_acc": quick["overall"]["acc"], "val_latent_rate": quick["overall"]["latent_rate"],
                           **{f"val_{t}": v["acc"] for t, v in quick["per_type"].items()}})
            bar.write(f"step {step + 1}: val acc {quick['overall']['acc']:.2f} "
                      + " ".join(f"{t} {v['acc']:.2f}" for t, v in quick["per_type"].items()))
        if (step + 1) % args.save_every == 0 or step + 1 == total:
            M.save_checkpoint(model, tok, os.path.join(args.out, "checkpoint"),
                              {"step": step + 1, "optimizer": opt.state_dict(), "probe": probe.state_dict(), "args": vars(args)})
    return os.path.join(args.out, "checkpoint")


def final_eval(args, ckpt: str) -> dict:
    """The validation table: latent interventions, blank images, latent rate (greedy and sampled)."""
    model, tok = M.load_model(ckpt, device=args.device)
    val = Stream(args).val(args.n_val)
    modes = {"normal": {}, "drop": {"mode": "drop"}, "noise": {"mode": "noise"}, "noise_norm": {"mode": "noise_norm"},
             "blank image": {"blank": True}, "sampled T=1": {"temperature": 1.0}}
    res = {name: ev.summarize(ev.evaluate(model, tok, val, latent_steps=args.latent_steps, **kw)) for name, kw in modes.items()}
    print(ev.table(res))
    with open(os.path.join(args.out, "eval_val.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def main(argv=None):
    args = parse_args(argv)
    try:
        t0 = time.time()
        ckpt = train(args)
        print(f"trained in {time.time() - t0:.0f}s; checkpoint: {ckpt}")
        final_eval(args, ckpt)
    except (M.ModelLoadError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
