"""Compact GRPO with latent rollouts and the attention reward (full fine-tuning, vision tower frozen).

    python train_rl.py --model small-vl                  # attention reward (weight 1) -> runs/small-vl-rl-att
    python train_rl.py --model small-vl --att-weight 0   # plain GRPO, the paper's baseline -> runs/small-vl-rl
    python train_rl.py --model small-vl --resume         # continue a killed run with the same data order

Per step: P questions, G rollouts each from one shared prefill (lvr.generate: latent mode per sample);
rewards (reward.py); advantages normalised within each group (exactly 0 for a group of equal rewards);
one scoring forward over prompt + completion with the image, the attention mask and the recorded latents
put back as constants; token log-probs scored at the rollout temperature (as verl, EasyR1 and TRL do, so
the ratio refers to the policy that sampled); PPO-clipped policy loss over the sampled tokens (a forced
<|lvr_end|> is not in it). Latent slots: `--latent-logp vlpo` (default, Monet's VLPO as in the paper's
code): a slot's log-probability is -||z - h||^2 / (2 sigma^2), z the latent fed during the rollout and h
the policy's hidden state that produces it, so latents sit inside the ratio and the KL (README says what
that changes in practice); `mask` (LVR's GRPO_latent): latent slots carry no policy gradient.
Writes OUT/checkpoint (HF format, atomic), OUT/log.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import benchmarks
import data
import lvr
import model as M
import reward
import train_sft

LOSSES = ("dapo", "grpo", "dr_grpo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small-vl",
                   help="'small-vl' (its SFT checkpoint, trained first if missing) or a checkpoint directory")
    p.add_argument("--out", help="run directory (default runs/small-vl-rl-att, or runs/small-vl-rl with --att-weight 0)")
    p.add_argument("--data", help="questions (LVR / RL format: JSON array or JSONL; free-form answers too) "
                                  "instead of the synthetic generator")
    p.add_argument("--steps", type=int, default=300, help="GRPO steps")
    p.add_argument("--prompts", type=int, default=8, help="questions per step")
    p.add_argument("--group", type=int, default=8, help="G: rollouts per question")
    p.add_argument("--temperature", type=float, default=0.5, help="rollout sampling temperature")
    p.add_argument("--top-p", type=float, default=0.99, help="rollout nucleus sampling")
    p.add_argument("--max-new-tokens", type=int, default=32, help="rollout length cap (latent steps included)")
    p.add_argument("--latent-steps", type=int, default=8, help="K: latent steps per span")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (AdamW; the paper: 1e-6 for the 7B)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--loss", default="dapo", choices=LOSSES,
                   help="dapo: token mean over the batch; grpo: mean per sequence, then over sequences; "
                        "dr_grpo: token sum / (rollouts * max-new-tokens), advantages without std")
    p.add_argument("--no-std", action="store_true", help="advantages: subtract the group mean, do not divide by std")
    p.add_argument("--clip-low", type=float, default=0.2, help="PPO ratio clip below 1")
    p.add_argument("--clip-high", type=float, default=0.3, help="PPO ratio clip above 1")
    p.add_argument("--dual-clip", type=float, default=3.0, help="dual clip for negative advantages (0 = off)")
    p.add_argument("--ppo-epochs", type=int, default=1, help="updates per rollout batch")
    p.add_argument("--beta", type=float, default=0.0, help="KL (k3) to a frozen reference; 0 builds no reference")
    p.add_argument("--latent-logp", default="vlpo", choices=["vlpo", "mask"], help="how latent slots enter the loss")
    p.add_argument("--sigma", type=float, default=10.0, help="VLPO's sigma")
    p.add_argument("--acc-weight", type=float, default=0.9, help="reward weight of answer accuracy")
    p.add_argument("--format-weight", type=float, default=0.1, help="reward weight of the answer format")
    p.add_argument("--len-weight", type=float, default=0.001, help="penalty per token beyond the shortest correct reply")
    p.add_argument("--att-weight", type=float, default=1.0, help="weight of the attention reward (0 = plain GRPO)")
    p.add_argument("--att-layers", default="0", help="decoder layers of the attention reward, comma-separated")
    p.add_argument("--att-variant", default="share", choices=["share", "relative"], help="attention reward variant")
    p.add_argument("--att-no-latent", default="zero", choices=["zero", "neutral"],
                   help="reward of rollouts without a span: 0 (paper) or their group's latent mean (not pushed)")
    p.add_argument("--max-group-acc", type=float, default=1.0,
                   help="skip groups whose accuracy is above this (paper: 0.6); 1 keeps all")
    p.add_argument("--skip-unsolved", action="store_true", help="skip groups with no correct rollout (paper)")
    p.add_argument("--train-vision", action="store_true", help="also train the vision tower")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the sampling")
    p.add_argument("--save-every", type=int, default=50, help="write a checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    a = p.parse_args(argv)
    a.out = a.out or os.path.join(train_sft.RUNS, "small-vl-rl-att" if a.att_weight else "small-vl-rl")
    a.att_layers = [int(x) for x in a.att_layers.split(",")]
    return a


def initial_model(args) -> str:
    """The checkpoint RL starts from; for small-vl the SFT run's, made first when missing."""
    if args.model != "small-vl":
        return args.model
    ckpt = os.path.join(train_sft.RUNS, "small-vl-sft", "checkpoint")
    if not os.path.isdir(ckpt):
        print(f"no small-vl SFT checkpoint at {ckpt}: training it first (python train_sft.py --model small-vl)")
        train_sft.main(["--model", "small-vl", "--device", args.device])
    return ckpt


# ------------------------------------------------------------------------------------- the loss
def advantages(rewards: torch.Tensor, G: int, std: bool) -> torch.Tensor:
    """Rewards minus their group's mean (divided by the group's std with `std`); a group whose rewards
    are all equal gets exactly 0 (a float mean can miss equal values by an ulp, which std would blow up)."""
    r = rewards.view(-1, G).double()
    a = r - r.mean(1, keepdim=True)
    if std:
        a = a / (r.std(1, keepdim=True) + 1e-6)
    same = (r == r[:, :1]).all(1, keepdim=True)
    return torch.where(same, 0.0, a).float().reshape(-1)


def token_logps(model, h, roll, args, chunk: int = 64) -> torch.Tensor:
    """log p of each completion token under the policy that sampled it: log_softmax(logits / T) with the
    never-sampled structural tokens excluded, from h (lvr.score_forward: the state predicting each token).
    At latent slots VLPO's Gaussian log-density -||z - h||^2 / (2 sigma^2) of the fed latent z around the
    state that produced it, or 0 with `--latent-logp mask`; 0 where the decoder forced the token.

    The (N, T, vocab) logits are made `chunk` positions at a time and recomputed in the backward
    (activation checkpointing), so only one chunk of them is ever alive."""
    banned = torch.tensor(lvr.structural_ids(model), device=h.device)

    def chunk_logp(hc, tc):
        logits = model.lm_head(hc).float() / args.temperature
        logits = logits.index_fill(-1, banned, float("-inf"))
        return logits.gather(-1, tc[..., None])[..., 0] - logits.logsumexp(-1)

    lp = torch.cat([checkpoint(chunk_logp, h[:, i:i + chunk], roll.tokens[:, i:i + chunk], use_reentrant=False)
                    for i in range(0, roll.tokens.shape[1], chunk)], 1)
    lp = lp.masked_fill(roll.forced | roll.latent_mask, 0.0)  # a forced <|lvr_end|> scores -inf: never in the loss
    if args.latent_logp == "mask":
        return lp
    gauss = -0.5 * (roll.latents.float() - h.float()).pow(2).sum(-1) / args.sigma ** 2
    return torch.where(roll.latent_mask, gauss, lp)


def policy_loss(logp, old_logp, adv, mask, args, ref_logp=None) -> tuple[torch.Tensor, dict]:
    """PPO-clip (asymmetric, dual-clip) with the chosen aggregation, plus beta * k3 KL."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    clipped = torch.clamp(ratio, 1 - args.clip_low, 1 + args.clip_high)
    loss = torch.maximum(-ratio * a, -clipped * a)
    if args.dual_clip:
        loss = torch.where(a < 0, torch.minimum(loss, -args.dual_clip * a), loss)
    kl = torch.zeros_like(loss)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        loss = loss + args.beta * kl
    m = mask.float()
    if args.loss == "dapo":
        total = (loss * m).sum() / m.sum().clamp(min=1)
    elif args.loss == "grpo":
        total = ((loss * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    else:
        total = (loss * m).sum() / (loss.shape[0] * args.max_new_tokens)
    low = (ratio < 1 - args.clip_low) & (a < 0)  # where the clip binds (TRL's clip_ratio metrics)
    high = (ratio > 1 + args.clip_high) & (a > 0)
    mean = lambda x: (x.float() * m).sum() / m.sum().clamp(min=1)  # noqa: E731
    stats = {"clip_ratio/low_mean": mean(low), "clip_ratio/high_mean": mean(high),
             "clip_ratio/region_mean": mean(low | high), "kl": mean(kl)}
    return total, {k: float(v) for k, v in stats.items()}


# ------------------------------------------------------------------------------------ one step
def rollout(args, model, tok, samples, step):
    gen = torch.Generator(device=args.device).manual_seed(args.seed * 1_000_003 + step)
    prompt = {k: v.to(args.device) for k, v in M.encode(model, tok, samples).items()}
    model.eval()
    roll = lvr.generate(model, tok, prompt, G=args.group, max_new_tokens=args.max_new_tokens,
                        latent_steps=args.latent_steps, temperature=args.temperature, top_p=args.top_p, generator=gen)
    model.train()
    return roll


def score(args, model, roll, need_attn: bool):
    """The scoring forward: (logp per token, r_attn per rollout) with the latents put back as constants."""
    h, r_attn = reward.score_rollout(model, roll, args.att_layers if need_attn else [], args.att_variant)
    return token_logps(model, h, roll, args), r_attn


def rewards(args, tok, samples, roll, r_attn, length_penalty):
    """Total reward per rollout and its parts."""
    G = args.group
    texts = [tok.decode(t[m], skip_special_tokens=False) for t, m in zip(roll.tokens.cpu(), roll.mask.cpu())]
    acc = torch.tensor([float(benchmarks.is_correct(t, s)) for t, s in zip(texts, [s for s in samples for _ in range(G)])])
    fmt = torch.tensor([float(reward.has_format(t)) for t in texts])
    lengths = roll.mask.sum(1).cpu().tolist()
    excess = length_penalty([s.id or s.question for s in samples for _ in range(G)], lengths, acc.bool().tolist())
    r_attn = reward.no_latent_fill(r_attn.detach().cpu(), roll.opened.cpu(), G, args.att_no_latent)
    total = args.acc_weight * acc + args.format_weight * fmt - args.len_weight * excess + args.att_weight * r_attn
    return total, {"acc": acc, "format": fmt, "r_attn": r_attn, "length": torch.tensor(lengths, dtype=torch.float)}


def keep_groups(args, acc: torch.Tensor) -> torch.Tensor:
    """Per rollout: does its group take part in the update (online difficulty filtering)?"""
    g = acc.view(-1, args.group).mean(1)
    keep = g <= args.max_group_acc
    if args.skip_unsolved:
        keep &= g > 0
    return keep.repeat_interleave(args.group)


def grpo_step(args, model, tok, ref, opt, samples, step, length_penalty) -> dict:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda")
    t0 = time.time()
    with autocast:
        roll = rollout(args, model, tok, samples, step)
    t1 = time.time()
    with autocast:
        logp, r_attn = score(args, model, roll, need_attn=True)  # r_attn is always logged; the reward uses its weight
    total, parts = rewards(args, tok, samples, roll, r_attn, length_penalty)
    adv = advantages(total, args.group, std=not (args.no_std or args.loss == "dr_grpo")).to(logp.device)
    keep = keep_groups(args, parts["acc"]).to(logp.device)
    mask = roll.mask & ~roll.forced & (~roll.latent_mask if args.latent_logp == "mask" else torch.ones_like(roll.mask))
    mask = mask & keep[:, None]
    ref_logp = None
    if ref is not None:
        with torch.no_grad():
            ref_logp, _ = score(args, ref, roll, False)
    old = logp.detach()
    t2 = time.time()
    stats, skipped = {}, False
    for epoch in range(args.ppo_epochs):
        if epoch:
            with autocast:
                logp, _ = score(args, model, roll, False)
        loss, stats = policy_loss(logp, old, adv, mask, args, ref_logp)
        if not torch.isfinite(loss):
            warnings.warn(f"step {step}: non-finite loss, update skipped")
            skipped = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.clip_grad)
        opt.step()
    t3 = time.time()
    same = (total.view(-1, args.group) == total.view(-1, args.group)[:, :1]).all(1)
    opened = roll.opened.cpu()
    multi = (roll.tokens == roll.lvr_start).sum(1).cpu() >= 2
    return {"step": step + 1, "reward": total.mean().item(), "acc": parts["acc"].mean().item(),
            "format": parts["format"].mean().item(), "latent_rate": opened.float().mean().item(),
            "att_share": (parts["r_attn"][opened].mean().item() if opened.any() else 0.0),
            "multi_span": multi.float().mean().item(),
            "att_share_multi": (parts["r_attn"][multi].mean().item() if multi.any() else None),
            **{k: stats.get(k, 0.0) for k in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")},
            "zero_spread": same.float().mean().item(), "kept_groups": keep.float().mean().item(),
            "length": parts["length"].mean().item(), "loss": float(loss.detach()), "skipped": skipped,
            "t_rollout": t1 - t0, "t_score": t2 - t1, "t_update": t3 - t2}


# ----------------------------------------------------------------------------------- the run
def start(args):
    ckpt = os.path.join(args.out, "checkpoint")
    resume = args.resume and os.path.isdir(ckpt)
    if args.resume and not resume:
        print(f"no checkpoint in {args.out}: starting fresh")
    model, tok = M.load_model(ckpt if resume else initial_model(args), device=args.device)
    for p in model.model.visual.parameters():
        p.requires_grad_(args.train_vision)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    state = {"step": 0, "length_penalty": {}}
    if resume:
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
        opt.load_state_dict(state["optimizer"])
        print(f"resuming {args.out} at step {state['step']}")
    ref = None
    if args.beta > 0:  # the frozen reference is the starting checkpoint
        ref, _ = M.load_model(initial_model(args), device=args.device)
        ref.requires_grad_(False)
    penalty = reward.LengthPenalty()
    penalty.best = dict(state["length_penalty"])
    return model, tok, ref, opt, state["step"], penalty


def train(args) -> str:
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    stream = train_sft.Stream(args)
    model, tok, ref, opt, step, penalty = start(args)
    log = os.path.join(args.out, "log.jsonl")
    train_sft.log_line(log, {}, upto=step)
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="grpo")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        base = (1 << 30) + step * args.prompts  # RL questions come from a part of the stream SFT never reaches
        row = grpo_step(args, model, tok, ref, opt, [stream[base + i] for i in range(args.prompts)], step, penalty)
        train_sft.log_line(log, row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['acc']:.2f}", latent=f"{row['latent_rate']:.2f}",
                        att=f"{row['att_share']:.3f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            M.save_checkpoint(model, tok, os.path.join(args.out, "checkpoint"),
                              {"step": step + 1, "optimizer": opt.state_dict(), "length_penalty": penalty.best,
                               "args": vars(args)})
    return os.path.join(args.out, "checkpoint")


def main(argv=None):
    args = parse_args(argv)
    try:
        ckpt = train(args)
    except (M.ModelLoadError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"checkpoint: {ckpt}\nnext: python eval.py --model {ckpt} --compare")


if __name__ == "__main__":
    main()
