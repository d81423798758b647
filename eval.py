"""The ablation eval: accuracy per question type under latent interventions, latent rate, routing.

    python eval.py --model runs/small-vl-sft --compare          # every mode on the same questions
    python eval.py --model runs/small-vl-sft --drop-latents     # one mode
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import data
import lvr
import model as M
import reward


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def route_force(samples, route: str | None) -> torch.Tensor | None:
    """Per-sample forcing: 'all' -> 1 (open a span), 'none' -> -1 (never), 'T1,T2' -> 1 for those types, -1 else."""
    if route is None:
        return None
    if route in ("all", "none"):
        return torch.full((len(samples),), 1 if route == "all" else -1)
    types = set(route.split(","))
    return torch.tensor([1 if s.qtype in types else -1 for s in samples])


@torch.no_grad()
def evaluate(model, tok, samples, mode="normal", latent_steps=8, route=None, batch_size=64, temperature=0.0,
             top_p=1.0, seed=0, max_new_tokens=32, blank=False, progress=True) -> list[dict]:
    """Greedy (or seeded sampling) batched decoding; one record per question."""
    gen = torch.Generator().manual_seed(seed)
    force = route_force(samples, route)
    records = []
    for i in tqdm(range(0, len(samples), batch_size), desc=f"eval {mode}", disable=not progress, leave=False):
        chunk = samples[i:i + batch_size]
        images = [np.full_like(s.load_image(), data.BACKGROUND) for s in chunk] if blank else None
        prompt = M.encode(model, tok, chunk, images=images)
        prompt = {k: v.to(model.device) for k, v in prompt.items()}
        roll = lvr.generate(model, tok, prompt, max_new_tokens=max_new_tokens, latent_steps=latent_steps, mode=mode,
                            temperature=temperature, top_p=top_p, generator=gen,
                            force=None if force is None else force[i:i + batch_size])
        for s, t, m, opened in zip(chunk, roll.tokens, roll.mask, roll.opened.tolist()):
            text = tok.decode(t[m], skip_special_tokens=False)
            pred = reward.parse_answer(text)
            records.append({"id": s.id, "qtype": s.qtype, "answer": s.answer, "pred": pred,
                            "correct": pred == s.answer, "opened": bool(opened), "text": text})
    return records


def summarize(records: list[dict]) -> dict:
    def stats(rs):
        k, n = sum(r["correct"] for r in rs), len(rs)
        lo, hi = wilson(k, n)
        return {"acc": k / max(n, 1), "ci95": [lo, hi], "n": n, "latent_rate": sum(r["opened"] for r in rs) / max(n, 1)}
    types = sorted({r["qtype"] for r in records}, key=lambda t: (data.QTYPES + (t,)).index(t))
    return {"overall": stats(records), "per_type": {t: stats([r for r in records if r["qtype"] == t]) for t in types}}


def table(summaries: dict) -> str:
    """Markdown: one row per mode, accuracy overall and per type, latent rate."""
    types = list(next(iter(summaries.values()))["per_type"])
    head = "| mode | overall | " + " | ".join(types) + " | latent rate |"
    rows = [head, "|" + "---|" * (len(types) + 3)]
    for mode, s in summaries.items():
        o = s["overall"]
        cells = [f"{o['acc']:.3f} [{o['ci95'][0]:.2f}, {o['ci95'][1]:.2f}]"]
        cells += [f"{s['per_type'][t]['acc']:.3f}" for t in types]
        rows.append(f"| {mode} | " + " | ".join(cells) + f" | {o['latent_rate']:.2f} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--split", default="test", choices=["val", "test"], help="synthetic split to evaluate")
    p.add_argument("--n", type=int, default=500, help="number of questions")
    p.add_argument("--seed", type=int, default=0, help="data seed (must match training's to keep splits apart)")
    p.add_argument("--latent-steps", type=int, default=8, help="K, latent steps per span")
    p.add_argument("--batch-size", type=int, default=64, help="questions decoded together")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--drop-latents", action="store_true", help="no latent embeddings enter the context")
    g.add_argument("--noise-latents", action="store_true", help="latents replaced by standard normal noise")
    g.add_argument("--compare", action="store_true", help="run normal, drop, noise, noise_norm and blank image")
    p.add_argument("--out", help="JSON file for the results (default: <model>/eval_<split>.json)")
    a = p.parse_args()
    try:
        model, tok = M.load_model(a.model)
    except M.ModelLoadError as e:
        sys.exit(f"error: {e}")
    samples = data.make_split(a.split, a.n, a.seed)
    modes = {"drop": {"mode": "drop"}} if a.drop_latents else {"noise": {"mode": "noise"}} if a.noise_latents else {"normal": {}}
    if a.compare:
        modes = {"normal": {}, "drop": {"mode": "drop"}, "noise": {"mode": "noise"}, "noise_norm": {"mode": "noise_norm"},
                 "blank image": {"blank": True}}
    summaries = {name: summarize(evaluate(model, tok, samples, latent_steps=a.latent_steps, batch_size=a.batch_size, **kw))
                 for name, kw in modes.items()}
    print(table(summaries))
    out = a.out or os.path.join(a.model, f"eval_{a.split}.json")
    with open(out, "w") as f:
        json.dump(summaries, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
