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
the policy's hidden state that produces it, so latents sit inside the ratio and the KL (results/NOTES.md,
"What VLPO changes in practice"); `mask` (LVR's GRPO_latent): latent slots carry no policy gradient.
Writes OUT/checkpoint (HF format), OUT/trainer_state.pt, OUT/log.jsonl (rundir.py): a row per step, and with
--eval-every N (default 25) at step 0, every N steps and at the end a validation row (greedy accuracy on the
same --n-eval validation questions, latent rate, attention share, per type; val_never_acc: spans forbidden).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import benchmarks
import data
import datafiles
import eval as ev
import lvr
import model as M
import parallel as P
import reward
import rundir

LOSSES = ("dapo", "grpo", "dr_grpo")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small-vl",
                   help="'small-vl' (its SFT checkpoint, trained first if missing) or a checkpoint directory")
    p.add_argument("--out", help="run directory (default runs/small-vl-rl-att, or runs/small-vl-rl with --att-weight 0; "
                                 "a real model's: runs/<model name>-rl-att)")
    p.add_argument("--data", type=rundir.existing_file, help="questions (LVR / RL format: JSON array or JSONL; free-form answers too) "
                                  "instead of the synthetic generator")
    p.add_argument("--task", choices=list(data.TASKS),
                   help="synthetic question mix (data.py); default: the run's when resuming, else the starting model's "
                        "(config.json; easy when it records none, as the first shipped models)")
    p.add_argument("--steps", type=rundir.at_least(1), default=300, help="GRPO steps")
    p.add_argument("--prompts", type=rundir.at_least(1), default=8, help="questions per step")
    p.add_argument("--group", type=rundir.at_least(2), default=8, help="G: rollouts per question (at least 2)")
    p.add_argument("--temperature", type=rundir.positive(), default=1.0,
                   help="rollout sampling temperature (1.0: on the hard task 0.5 left two thirds of the groups without reward spread)")
    p.add_argument("--top-p", type=rundir.within(0, 1, "(]"), default=0.99, help="rollout nucleus sampling")
    p.add_argument("--max-new-tokens", type=rundir.at_least(1), default=32, help="rollout length cap (latent steps included)")
    p.add_argument("--latent-steps", type=rundir.at_least(0), default=8, help="K: latent steps per span")
    p.add_argument("--lr", type=rundir.positive(), default=5e-5, help="peak learning rate (AdamW; the paper: 1e-6 for the 7B)")
    p.add_argument("--warmup", type=rundir.at_least(0), default=10, help="linear warm-up steps")
    p.add_argument("--clip-grad", type=rundir.positive(), default=1.0, help="gradient norm clip")
    p.add_argument("--loss", default="dapo", choices=LOSSES,
                   help="dapo: token mean over the batch; grpo: mean per sequence, then over sequences; "
                        "dr_grpo: token sum / (rollouts * max-new-tokens), advantages without std")
    p.add_argument("--no-std", action="store_true", help="advantages: subtract the group mean, do not divide by std")
    p.add_argument("--clip-low", type=rundir.within(0, 1, "[)"), default=0.2, help="PPO ratio clip below 1")
    p.add_argument("--clip-high", type=rundir.at_least(0.0, float), default=0.3, help="PPO ratio clip above 1")
    p.add_argument("--dual-clip", type=rundir.at_least(0.0, float), default=3.0, help="dual clip for negative advantages (0 = off)")
    p.add_argument("--ppo-epochs", type=rundir.at_least(1), default=1, help="updates per rollout batch")
    p.add_argument("--beta", type=rundir.at_least(0.0, float), default=0.0, help="KL (k3) to a frozen reference; 0 builds no reference")
    p.add_argument("--latent-logp", default="vlpo", choices=["vlpo", "mask"], help="how latent slots enter the loss")
    p.add_argument("--sigma", type=rundir.positive(), default=10.0, help="VLPO's sigma")
    p.add_argument("--acc-weight", type=rundir.at_least(0.0, float), default=0.9, help="reward weight of answer accuracy")
    p.add_argument("--format-weight", type=rundir.at_least(0.0, float), default=0.1, help="reward weight of the answer format")
    p.add_argument("--len-weight", type=rundir.at_least(0.0, float), default=0.001, help="penalty per token beyond the shortest correct reply")
    p.add_argument("--att-weight", type=rundir.at_least(0.0, float), default=1.0, help="weight of the attention reward (0 = plain GRPO)")
    p.add_argument("--att-layers", type=rundir.layer_list, default=[0], help="decoder layers of the attention reward, comma-separated")
    p.add_argument("--att-variant", default="share", choices=["share", "relative"], help="attention reward variant")
    p.add_argument("--att-no-latent", default="zero", choices=["zero", "neutral"],
                   help="reward of rollouts without a span: 0 (paper) or their group's latent mean (not pushed)")
    p.add_argument("--evidence-weight", type=rundir.at_least(0.0, float), default=0.0,
                   help="lambda_ev of ReaLVR's evidence loss on the latents (reward.py; 0 = off, ReaLVR: 0.2)")
    p.add_argument("--evidence-margin", type=rundir.at_least(0.0, float), default=0.5, help="m of the evidence loss's hinge [m - g_t]+")
    p.add_argument("--evidence-eta", type=rundir.within(0, 1), default=0.3, help="eta of the evidence loss's slot weights")
    p.add_argument("--strict", action="store_true",
                   help="train under the image-blind interface (CVRR): rollouts, scoring and rewards with no position "
                        "from a span's <|lvr_end|> on seeing the image (lvr.py)")
    p.add_argument("--max-group-acc", type=rundir.within(0, 1), default=1.0,
                   help="skip groups whose accuracy is above this (paper: 0.6); 1 keeps all")
    p.add_argument("--skip-unsolved", action="store_true", help="skip groups with no correct rollout (paper)")
    p.add_argument("--train-vision", action="store_true", help="also train the vision tower")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the sampling")
    p.add_argument("--save-every", type=rundir.at_least(1), default=50, help="write a checkpoint every N steps (and at the end)")
    p.add_argument("--eval-every", type=rundir.at_least(0),
                   help="validation curve: a greedy pass over --n-eval fixed validation questions of the task at step 0, "
                        "every N steps and at the end, normal and with spans forbidden, into the log (val_acc, "
                        "val_never_acc, ...; blind under --strict); 0 = never; default 25, 0 with --data (no questions "
                        "held out)")
    p.add_argument("--n-eval", type=rundir.at_least(1), default=100, help="validation questions of --eval-every")
    rundir.add_run_args(p)
    p.add_argument("--micro-batch", type=rundir.at_least(1),
                   help="rollouts per scoring forward/backward, gradients accumulated (default: all of a step's for a "
                        "model under 100M parameters, as small-vl, else 4); any value gives the same update")
    p.add_argument("--rollout-batch", type=rundir.at_least(1), help="questions decoded together (default: all of a step's)")
    p.add_argument("--cache", choices=lvr.CACHES, help="rollout decoder (lvr.generate): dynamic, static or graph (CUDA); "
                                                       "default graph on CUDA, dynamic on the CPU and under --fsdp")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of the decoder layers (non-reentrant)")
    p.add_argument("--param-dtype", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of the trained weights, their gradients and AdamW's state (README, 'One GPU': what bf16 loses)")
    P.add_parallel_args(p)
    M.add_device_args(p)
    a = p.parse_args(argv)
    a.out = a.out or os.path.join(rundir.RUNS, rundir.model_name(a.model) + "-rl" + ("-att" if a.att_weight else "")
                                  + ("-ev" if a.evidence_weight else "") + ("-strict" if a.strict else "")
                                  + ("" if a.model != "small-vl" else rundir.task_suffix(a.task)))
    a.dtype = M.resolve_dtype(a)
    a.rollout_batch = a.rollout_batch or a.prompts
    if a.cache == "graph" and (a.fsdp or torch.device(a.device).type != "cuda"):
        p.error("argument --cache: graph needs CUDA and no --fsdp")
    if a.strict and a.att_variant == "relative":
        p.error("--strict hides the image from the answer: the relative attention reward (latents / image) is undefined")
    if 0 < a.dual_clip <= 1:
        p.error(f"argument --dual-clip: must be 0 (off) or above 1, got {a.dual_clip}")
    if a.eval_every and a.data:
        p.error("argument --eval-every: --data holds no validation questions (every row trains); pass --eval-every 0")
    a.eval_every = (0 if a.data else 25) if a.eval_every is None else a.eval_every
    return a


def initial_model(args) -> str:
    """The checkpoint RL starts from; for small-vl the task's SFT run (runs/small-vl-sft, -easy for easy)
    when there is one, else its shipped LVR SFT model (--strict: the strict ones), else one trained first."""
    if args.model != "small-vl":
        return args.model
    task, kind = args.task or data.DEFAULT_TASK, "-strict" if args.strict else ""
    run = os.path.join(rundir.RUNS, "small-vl-sft" + kind + rundir.task_suffix(task))
    ckpt, shipped = os.path.join(run, rundir.CKPT), rundir.shipped_sft(task, kind)
    if not os.path.isdir(ckpt) and os.path.isdir(shipped):
        return shipped
    if not os.path.isdir(ckpt):
        print(f"no small-vl SFT checkpoint at {ckpt}: training it first (python train_sft.py --model small-vl)")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_sft.py")
        cmd = [sys.executable, script, "--model", "small-vl", "--task", task, "--out", run, *(["--strict"] if args.strict else []),
               "--device", args.device, "--dtype", args.dtype, "--resume"]
        if subprocess.run(cmd).returncode:  # it said why
            raise rundir.RunError(f"training the SFT model failed: {' '.join(cmd[1:])}")
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


def loss_weights(mask, args) -> torch.Tensor:
    """Per-token weights whose weighted sum of per-token losses is the chosen aggregation over the whole
    batch, so micro-batches (any split of the rows) add up to exactly the full batch's loss."""
    m = mask.float()
    rows = m.shape[0] * P.world()  # under torchrun: the batch of all ranks (each holds an equal share)
    if args.loss == "dapo":
        return m / P.all_sum(m.sum()).clamp(min=1)
    if args.loss == "grpo":
        return m / m.sum(1, keepdim=True).clamp(min=1) / rows
    return m / (rows * args.max_new_tokens)


def policy_loss(logp, old_logp, adv, mask, weights, args, ref_logp=None) -> tuple[torch.Tensor, dict]:
    """PPO-clip (asymmetric, dual-clip) plus beta * k3 KL, summed with `weights` (loss_weights); stats are
    sums over the mask's tokens (clip_ratio: where the clip binds, as TRL counts it; kl) and their count."""
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
    low, high = (ratio < 1 - args.clip_low) & (a < 0), (ratio > 1 + args.clip_high) & (a > 0)
    m = mask.float()
    stats = {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high, "kl": kl}
    return (loss * weights).sum(), {"tokens": float(m.sum()), **{k: float((v.detach().float() * m).sum()) for k, v in stats.items()}}


# ------------------------------------------------------------------------------------ one step
def group_generator(args, step: int, question: int) -> torch.Generator:
    """The random source of question `question` (its index in the step) at `step`: its G rollouts are the
    same however the step's questions are split over ranks and decode batches."""
    seed = int(np.random.SeedSequence([args.seed, step, question]).generate_state(1)[0])
    return torch.Generator(device=args.device).manual_seed(seed)


def rollout(args, model, tok, samples, step, first: int = 0, timing: dict | None = None):
    """G rollouts of every question (samples[i] is question first + i of the step), decoded
    --rollout-batch questions at a time. timing: a dict given the decode loops' seconds (decode_s, prefill and
    encoding excluded) and steps, summed over the calls."""
    model.eval()
    rolls = []
    for i in range(0, len(samples), args.rollout_batch):
        prompt = {k: v.to(args.device) for k, v in M.encode(model, tok, samples[i:i + args.rollout_batch]).items()}
        gens = [group_generator(args, step, first + j) for j in range(i, min(len(samples), i + args.rollout_batch))]
        st = {}
        rolls.append(P.run(model, lvr.generate, model, tok, prompt, G=args.group, max_new_tokens=args.max_new_tokens,
                                  latent_steps=args.latent_steps, temperature=args.temperature, top_p=args.top_p,
                                  generator=gens, all_ranks=args.fsdp, cache=args.cache, blind=args.strict, stats=st))
        if timing is not None:
            for key in ("decode_s", "steps"):
                timing[key] = timing.get(key, 0) + st[key]
    model.train()
    return lvr.cat_rollouts(rolls, tok.pad_token_id)


def default_micro_batch(args, model):
    """--micro-batch when not given: a whole step's rollouts for a model under 100M parameters (small-vl,
    any of its checkpoints), else 4."""
    if args.micro_batch is None:
        args.micro_batch = args.prompts * args.group if sum(p.numel() for p in model.parameters()) < 10 ** 8 else 4


def micro_batches(args, n: int) -> list[slice]:
    return [slice(i, min(n, i + args.micro_batch)) for i in range(0, n, args.micro_batch)]


def score(args, model, roll, need_attn: bool, want_h: bool = False):
    """The scoring forward of one micro-batch: (logp per token, r_attn per rollout), latents as constants;
    with want_h also the hidden states (the evidence loss's regenerated latents)."""
    return P.run(model, _score, args, model, roll, need_attn, want_h)


def _score(args, model, roll, need_attn: bool, want_h: bool = False):
    h, r_attn = reward.score_rollout(model, roll, args.att_layers if need_attn else [], args.att_variant,
                                     vision_grad=args.train_vision and torch.is_grad_enabled(), blind=args.strict)
    return (token_logps(model, h, roll, args), r_attn) + ((h,) if want_h else ())


@torch.no_grad()
def score_all(args, model, roll, need_attn: bool):
    """Log-probs (N, T) and r_attn (N,) of every rollout, micro-batch by micro-batch, without gradients."""
    parts = [score(args, model, roll.select(mb), need_attn) for mb in micro_batches(args, roll.tokens.shape[0])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


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


def grpo_step(args, model, tok, ref, opt, samples, step, length_penalty, first: int = 0) -> dict:
    """Rollouts; a gradient-free scoring pass (the rollout policy's log-probs, r_attn, the reference's);
    rewards and advantages; then per PPO epoch one update accumulated over micro-batches of rollouts.
    Under torchrun `samples` are this rank's share (questions first, first + 1, ... of the step): the loss
    normaliser counts every rank's tokens and rollouts, gradients are averaged after the last micro-batch
    and the returned metrics cover all ranks, so the update is the one a single process makes."""
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    t0, timing = time.time(), {}
    with autocast:
        roll = rollout(args, model, tok, samples, step, first, timing)
    t1 = time.time()
    with autocast:
        old, r_attn = score_all(args, model, roll, need_attn=True)  # r_attn is always logged; the reward uses its weight
        ref_logp = score_all(args, ref, roll, need_attn=False)[0] if ref is not None else None
    total, parts = rewards(args, tok, samples, roll, r_attn, length_penalty)
    sync_length_penalty(length_penalty, samples)
    adv = advantages(total, args.group, std=not (args.no_std or args.loss == "dr_grpo")).to(old.device)
    keep = keep_groups(args, parts["acc"]).to(old.device)
    mask = roll.mask & ~roll.forced & (~roll.latent_mask if args.latent_logp == "mask" else torch.ones_like(roll.mask))
    mask = mask & keep[:, None]
    weights = loss_weights(mask, args)
    ev = evidence(args, model, tok, roll, samples, parts["acc"], autocast) if args.evidence_weight else None
    t2 = time.time()
    params = [p for g in opt.param_groups for p in g["params"]]
    skipped, loss = False, 0.0
    for epoch in range(args.ppo_epochs):
        opt.zero_grad(set_to_none=True)
        stats, loss = {}, 0.0
        for mb in micro_batches(args, len(adv)):
            with autocast:
                logp, _, *h = score(args, model, roll.select(mb), need_attn=False, want_h=ev is not None)
            part, st = policy_loss(logp, old[mb], adv[mb], mask[mb], weights[mb], args,
                                   None if ref_logp is None else ref_logp[mb])
            if ev is not None:
                g = reward.evidence_margin(h[0], ev["slots"][mb], ev["prow"][mb], ev["protos"], ev["has_box"])
                ev_part = reward.evidence_loss(g, ev["w"][mb], ev["row_weight"][mb], args.evidence_margin)
                part = part + ev_part
                st["evidence"], st["evidence_g"] = float(ev_part.detach()), float(g[ev["slots"][mb]].detach().sum())
            if not P.all_true(bool(torch.isfinite(part))):  # every rank skips, or none (collectives stay paired)
                warnings.warn(f"step {step}: non-finite loss, update skipped")
                skipped = True
                break
            (part * P.world()).backward()  # each rank's part of the sum; gradients are averaged over ranks
            loss += float(part.detach())
            stats = {k: stats.get(k, 0.0) + v for k, v in st.items()}
        if skipped:
            opt.zero_grad(set_to_none=True)
            break
        P.average_grads(params)
        if not rundir.clip_and_step(opt, args.clip_grad):  # the averaged gradients: every rank decides alike
            skipped = True
            break
    t3 = time.time()
    row = {"step": step + 1, **step_metrics(args, roll, total, parts, adv, keep, stats, loss, skipped),
           "t_rollout": t1 - t0, "t_decode": timing["decode_s"], "decode_steps": timing["steps"], "t_score": t2 - t1,
           "t_update": t3 - t2}
    if ev is not None:  # the loss term and the mean margin g_t over the slots it covers (last epoch, all ranks)
        ev_sums = P.all_sum(torch.tensor([stats.get("evidence", 0.0), stats.get("evidence_g", 0.0),
                                          float(ev["slots"].sum())], dtype=torch.float64)).tolist()
        row.update(evidence=ev_sums[0], evidence_g=ev_sums[1] / max(1.0, ev_sums[2]), evidence_rows=int(P.all_sum(
            torch.tensor(float(ev["take"].sum()), dtype=torch.float64))))
    return row


def evidence(args, model, tok, roll, samples, acc, autocast) -> dict:
    """The evidence loss's constants of a step (reward.evidence_setup), and each rollout's weight in it:
    lambda_ev over the number of rollouts it applies to on every rank, so micro-batches add up."""
    model.eval()
    with autocast:
        ev = P.run(model, reward.evidence_setup, model, tok, roll, samples, acc.bool().tolist(), args.group,
                   args.att_layers, args.evidence_eta, args.strict, args.micro_batch)
    model.train()
    n = P.all_sum(torch.tensor(float(ev["take"].sum()), dtype=torch.float64)).item()
    ev["row_weight"] = ev["take"].float() * args.evidence_weight / max(1.0, n)
    ev["prow"] = roll.prow.to(roll.tokens.device)
    return ev


def sync_length_penalty(penalty, samples):
    """Share this step's shortest correct lengths between ranks (a question may land on another rank later)."""
    if P.world() == 1:
        return
    mine = {q: penalty.best[q] for q in (s.id or s.question for s in samples) if q in penalty.best}
    for best in P.gather_objects(mine):
        for q, n in best.items():
            penalty.best[q] = min(n, penalty.best.get(q, n))


STAT_KEYS = ("tokens", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def uniform_share(adv: torch.Tensor, acc: torch.Tensor, G: int) -> float:
    """The share of the update's sum |advantage| that groups of uniform accuracy carry (all rollouts right, or
    all wrong): there the advantage ranks rollouts by format, length and r_attn, not by correctness, and the
    std normalisation gives it full size whatever those rewards' weights."""
    a, c = adv.abs().view(-1, G), acc.view(-1, G)
    uniform = (c == c[:, :1]).all(1)
    return (a[uniform].sum() / a.sum()).item() if a.sum() > 0 else 0.0


def step_metrics(args, roll, total, parts, adv, keep, stats, loss, skipped) -> dict:
    """The log row's metrics over the rollouts of every rank (gathered in rank order: the single-process order)."""
    multi = (roll.tokens == roll.lvr_start).sum(1).cpu() >= 2
    rows = torch.stack([total, parts["acc"], parts["format"], parts["r_attn"], parts["length"],
                        roll.opened.cpu().float(), multi.float(), keep.cpu().float(), adv.cpu()])
    total, acc, fmt, r_attn, length, opened, multi, keep, adv = P.gather_cat(rows.double(), 1).float()
    opened, multi = opened.bool(), multi.bool()
    sums = P.all_sum(torch.tensor([stats.get(k, 0.0) for k in STAT_KEYS] + [loss], dtype=torch.float64)).tolist()
    stats, loss = dict(zip(STAT_KEYS, sums[:-1])), sums[-1]
    n_tok = max(1.0, stats["tokens"]) if not skipped else 1.0
    same = (total.view(-1, args.group) == total.view(-1, args.group)[:, :1]).all(1)
    return {"reward": total.mean().item(), "acc": acc.mean().item(), "format": fmt.mean().item(),
            "latent_rate": opened.float().mean().item(),
            "att_share": (r_attn[opened].mean().item() if opened.any() else 0.0),
            "multi_span": multi.float().mean().item(),
            "att_share_multi": (r_attn[multi].mean().item() if multi.any() else None),
            **{k: (0.0 if skipped else stats[k] / n_tok) for k in STAT_KEYS[1:]},
            "zero_spread": same.float().mean().item(), "kept_groups": keep.mean().item(),
            "adv_uniform": uniform_share(adv * keep, acc, args.group),
            "length": length.mean().item(), "loss": loss, "skipped": skipped}


# ----------------------------------------------------------------------------------- the run
def start(args):
    """(model, tokenizer, reference, optimizer, trainer state, checkpoint dtype); from OUT's newest save with --resume.
    Under torchrun every rank loads the weights and the trainer state, then shards (--fsdp) and builds its optimizer."""
    found = rundir.resume_point(args.out) if args.resume else None
    if args.resume and not found and P.is_main():
        print(f"no checkpoint in {args.out}: starting fresh")
    init = found[0] if found else initial_model(args)
    model, tok = M.load_model(init, M.DTYPES[args.param_dtype], args.device)
    if args.data is None:  # the synthetic scenes: the task's words, and the task recorded in config.json
        tok = M.extend_vocabulary(model, tok, args.task)
        setattr(model.config, M.TASK_KEY, args.task)
    rundir.check_layers(model, args.att_layers)
    default_micro_batch(args, model)
    for p in model.model.visual.parameters():
        p.requires_grad_(args.train_vision)
    if args.grad_ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    state = {"step": 0, "length_penalty": {}, "skips": 0}
    if found:
        state = rundir.load_state(found, model)  # the master weights, before FSDP shards them
        rundir.check_resume(state.get("args", {}), vars(args), ("seed", "prompts", "data", "task"))
    if args.fsdp:
        P.shard_model(model)
    opt = P.make_optimizer([p for p in model.parameters() if p.requires_grad], args.lr, args.zero)
    if found:
        P.load_optimizer_state(model, opt, state["optimizer"])
        if P.is_main():
            print(f"resuming {args.out} at step {state['step']}")
    ref = None
    if args.beta > 0:  # the frozen reference is the starting checkpoint
        ref, ref_tok = M.load_model(initial_model(args), M.DTYPES[args.dtype], args.device)  # no grad, compute dtype
        if args.data is None:
            M.extend_vocabulary(ref, ref_tok, args.task)  # the same rows as the policy's
        ref.requires_grad_(False)
        if args.fsdp:
            P.shard_model(ref)
    return model, tok, ref, opt, state, M.saved_dtype(init)


def train(args) -> str:
    """The GRPO run; under torchrun each rank takes an equal contiguous share of every step's questions and
    rank 0 alone logs, shows the bar and writes checkpoints."""
    args.device = P.init_dist(args.device)
    P.check_parallel(args)
    mine = P.share(args.prompts, "--prompts")
    torch.manual_seed(args.seed)
    with rundir.locked(args.out, args):
        if args.task is None:  # the run's task when resuming, else the starting model's
            found = rundir.resume_point(args.out) if args.resume else None
            args.task = M.saved_task(found[0] if found else initial_model(args))
        stream = datafiles.Stream(args)
        model, tok, ref, opt, state, dtype = start(args)
        step, skips, streak = state["step"], state.get("skips", 0), 0
        penalty = reward.LengthPenalty()
        penalty.best = dict(state["length_penalty"])
        log = rundir.start_log(args.out, step)
        bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="grpo", disable=not P.is_main())
        val = stream.val(args.n_eval) if args.eval_every else None
        if val and step == 0:  # the curve's starting point: the model RL starts from
            validate(args, model, tok, val, log, 0, bar)
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
            base = (1 << 30) + step * args.prompts  # RL questions come from a part of the stream SFT never reaches
            row = grpo_step(args, model, tok, ref, opt, [stream[base + i] for i in mine], step, penalty, mine.start)
            opt.zero_grad(set_to_none=True)  # the gradients are not kept through the next rollout
            skips += row["skipped"]
            rundir.log(log, {**row, "skips": skips})
            bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['acc']:.2f}", latent=f"{row['latent_rate']:.2f}",
                            att=f"{row['att_share']:.3f}")
            streak = rundir.skip_streak(streak, row["skipped"], step + 1, args.steps)
            if val and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                validate(args, model, tok, val, log, step + 1, bar)
            if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
                rundir.save(args.out, model, tok, {"step": step + 1, "skips": skips, "length_penalty": penalty.best,
                                                   "args": vars(args)}, dtype, opt)
    return os.path.join(args.out, rundir.CKPT)


def validate(args, model, tok, val, log, step, bar):
    """The validation curve's point at `step` (eval.quick_eval): the questions decoded as the rollouts are (length
    cap, latent steps, decoder, blind under --strict) but greedily, then again with spans forbidden."""
    ev.quick_eval(model, tok, val, step, log, bar, blind=args.strict, never=True, latent_steps=args.latent_steps,
                  max_new_tokens=args.max_new_tokens, cache=args.cache)


def main(argv=None):
    args = parse_args(argv)
    try:
        ckpt = train(args)
    except (M.ModelLoadError, rundir.RunError, P.RankZeroError, OSError, ValueError) as e:
        sys.exit(f"error: {rundir.oneline(e)}" if P.is_main() else 1)  # rank 0 says it, once
    if P.is_main():
        print(f"checkpoint: {ckpt}\nnext: python eval.py --model {ckpt} --compare")


if __name__ == "__main__":
    main()
