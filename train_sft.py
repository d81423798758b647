"""Supervised training of an LVR model (and of the text-only baseline) on the synthetic spatial data.

One schedule, two phases: for the first --vision-steps steps the whole model learns (the vision tower
included: small-vl starts from random weights); then the vision tower is frozen, as in LVR's stage 1,
and only the language model trains. Throughout, a --latent-fraction share of the replies carry a latent
span whose slots are teacher-forced with the question's region tokens (lvr.py, "Stage-1 loss"); the
rest answer directly, so the trained model still has a real choice to open a span or not.

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
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps in all")
    p.add_argument("--vision-steps", type=int, default=750, help="steps before the vision tower is frozen")
    p.add_argument("--batch-size", type=int, default=32, help="questions per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, warm-up then cosine to 10%%)")
    p.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the data and the latent choice")
    p.add_argument("--n-val", type=int, default=500, help="validation questions for the final table")
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


def lr_at(args, step: int) -> float:
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, args.steps))))


def start(args):
    """(model, tokenizer, optimizer, first step); from OUT/checkpoint when resuming."""
    ckpt = os.path.join(args.out, "checkpoint")
    if args.resume and os.path.isdir(ckpt):
        model, tok = M.load_model(ckpt, device=args.device)
    elif args.model == "small-vl":
        model, tok = M.build_small_vl(args.seed)
        model.to(args.device)
    else:
        model, tok = M.load_model(args.model, device=args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step = 0
    if args.resume and os.path.isdir(ckpt):
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
        freeze_vision(model, state["step"] >= args.vision_steps)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resuming {args.out} at step {step}")
    elif args.resume:
        print(f"no checkpoint in {args.out}: starting fresh")
    return model, tok, opt, step


def freeze_vision(model, frozen: bool):
    for p in model.model.visual.parameters():
        p.requires_grad_(not frozen)


def log_line(path: str, row: dict, upto: int | None = None):
    """Append a JSON row; with `upto`, first drop rows past that step (a resumed run rewrites them)."""
    if upto is not None and os.path.exists(path):
        keep = [line for line in open(path) if json.loads(line).get("step", 0) <= upto]
        with open(path, "w") as f:
            f.writelines(keep)
    if row:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def train(args) -> str:
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    stream = Stream(args)
    model, tok, opt, step = start(args)
    log = os.path.join(args.out, "log.jsonl")
    log_line(log, {}, upto=step)
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda")
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="sft")
    for step in bar:
        if step == args.vision_steps:
            freeze_vision(model, True)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
        t0 = time.time()
        idx = range(step * args.batch_size, (step + 1) * args.batch_size)
        samples = [stream[i] for i in idx]
        batch, W = lvr.sft_batch(model, tok, samples, [wants_latent(args, i) for i in idx], args.latent_steps,
                                 args.latent_targets)
        batch = {k: v.to(args.device) for k, v in batch.items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(args, step)
        with autocast:
            out = lvr.sft_loss(model, batch, W.to(args.device), args.lam)
        opt.zero_grad(set_to_none=True)
        skipped = not torch.isfinite(out["loss"])
        if skipped:
            warnings.warn(f"step {step}: non-finite loss, update skipped")
        else:
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        row = {"step": step + 1, "loss": out["loss"].item(), "ce": out["ce"].item(), "mse": out["mse"].item(),
               "lr": lr_at(args, step), "latent_share": W.shape[0] / max(1, args.latent_steps) / len(samples),
               "skipped": skipped, "vision_frozen": step >= args.vision_steps, "sec": time.time() - t0}
        log_line(log, row)
        bar.set_postfix(ce=f"{row['ce']:.3f}", mse=f"{row['mse']:.3f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            M.save_checkpoint(model, tok, os.path.join(args.out, "checkpoint"),
                              {"step": step + 1, "optimizer": opt.state_dict(), "args": vars(args)})
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
