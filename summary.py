"""Numbers from evaluation records: Wilson and paired intervals (over questions, and across seeds), per-type
summaries, the edit pairs' flip metrics, the donor swap's lift, comparisons against `normal`, and the printed
tables (eval.py's output).

    python eval.py --model DIR --compare     # prints summary.table of every arm
"""
from __future__ import annotations

import math

import numpy as np

import benchmarks
import data
import edits


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))



def paired(a: list[bool], b: list[bool], z: float = 1.96) -> dict:
    """Mean of b - a over the same questions, with a 95% normal-approximation interval."""
    d = np.array(b, dtype=float) - np.array(a, dtype=float)
    half = z * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return {"diff": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)], "n": len(d)}



T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # Student t, 0.975 quantile, 1-30 d.o.f.


def t975(dof: int) -> float:
    """Student t's 0.975 quantile: the table up to 30 degrees of freedom, a Cornish-Fisher expansion above
    (within 0.001 of the exact value there)."""
    if dof <= len(T975):
        return T975[dof - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)


def across_seeds(diffs: list[float]) -> list[float] | None:
    """95% t-interval of the mean of per-seed differences: training runs as the unit, so it holds how runs
    vary (wide with few seeds); None with fewer than 2 seeds."""
    if len(diffs) < 2:
        return None
    d = np.array(diffs, dtype=float)
    half = t975(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return [float(d.mean() - half), float(d.mean() + half)]


def n_options(sample) -> int:
    """Number of lettered options ("A. ...") in the question."""
    return len(sample.choices) or sum(line[1:3] == ". " and line[0] in data.OPTION_LETTERS
                                      for line in sample.question.splitlines()) or 1



def summarize(records: list[dict]) -> dict:
    def stats(rs):
        k, n = sum(r["correct"] for r in rs), len(rs)
        shares = [r["att_share"] for r in rs if r.get("att_share") is not None]
        grounds = [r["grounding"] for r in rs if r.get("grounding") is not None]
        fit = np.array([r["latent_fit"] for r in rs if r.get("latent_fit") is not None]).reshape(-1, 3)
        return {"acc": k / max(n, 1), "ci95": list(wilson(k, n)), "n": n,
                "latent_rate": sum(r["opened"] for r in rs) / max(n, 1),
                "att_share": float(np.mean(shares)) if shares else None,
                "grounding": {**{k: float(np.mean([g[k] for g in grounds])) for k in grounds[0]}, "n": len(grounds)}
                if grounds else None,
                "latent_cos": float(fit[:, 0].mean()) if len(fit) else None,
                "latent_r2": float(1 - fit[:, 1].sum() / fit[:, 2].sum()) if len(fit) else None,
                "chance": float(np.mean([r.get("chance", 0.0) for r in rs])) if rs else 0.0}
    types = sorted({r["qtype"] for r in records}, key=lambda t: (data.ALL_QTYPES.index(t) if t in data.ALL_QTYPES else 99, t))
    out = {"overall": stats(records), "per_type": {t: stats([r for r in records if r["qtype"] == t]) for t in types}}
    if any("donor" in r for r in records):
        out["donor"] = donor_lift(records)
    if records and all(r["id"].lower().startswith("mmvp-") for r in records):
        out["overall"]["pair_acc"] = benchmarks.mmvp_pair_accuracy({r["id"]: r["correct"] for r in records})
    return out



def rate(hits: list) -> dict:
    """A share with its 95% Wilson interval and count (rate None of nothing)."""
    k, n = int(sum(bool(h) for h in hits)), len(hits)
    return {"rate": k / n if n else None, "ci95": list(wilson(k, n)), "n": n}



def donor_lift(records: list[dict]) -> dict:
    """The latent swap: over questions given a donor's latents (a donor found and a span opened), how often
    the reply moved to the donor's answer (lift), how often it kept its own right answer, and chance."""
    rs = [r for r in records if r.get("to_donor") is not None]
    return {"lift": rate([r["to_donor"] for r in rs]), "kept": rate([r["pred"] == r["answer"] for r in rs]),
            "chance": float(np.mean([r["chance"] for r in rs])) if rs else 0.0,
            "per_type": {t: rate([r["to_donor"] for r in rs if r["qtype"] == t]) for t in sorted({r["qtype"] for r in rs})}}



def flip_metrics(base: list[dict], edited: list[dict]) -> dict:
    """ReaLVR's paired metrics over the counterfactual edit pairs (base: the original views' records, edited:
    the edit arm's, matched by id): edited-view accuracy; strict paired correct flip (changing pairs right on
    both views); the answer change rate on changing pairs; false flip (keeping pairs whose answer changed).
    Each a share with its 95% Wilson interval, also per edit type."""
    orig = {r["id"]: r for r in base}
    rows = [(orig[e["id"]], e) for e in edited if e["id"] in orig]

    def metrics(rs):
        ch, keep = [x for x in rs if x[1]["changes"]], [x for x in rs if not x[1]["changes"]]
        return {"edited_acc": rate([e["correct"] for _, e in rs]),
                "paired_flip": rate([o["correct"] and e["correct"] for o, e in ch]),
                "change_rate": rate([o["pred"] != e["pred"] for o, e in ch]),
                "false_flip": rate([o["pred"] != e["pred"] for o, e in keep])}
    return {**metrics(rows), "per_edit": {k: metrics([x for x in rows if x[1]["edit"] == k]) for k in edits.EDITS
                                          if any(x[1]["edit"] == k for x in rows)}}


PAIRED_BASE = {"edit": "normal", "blind+edit": "blind"}  # the arm whose records are an edit arm's original views



def compare(results: dict) -> dict:
    """Per mode: its summary, and its paired difference against 'normal' overall and per type; the edit arms
    also their flip metrics against their original views (PAIRED_BASE)."""
    base = {r["id"]: r for r in results["normal"]}
    out = {}
    for mode, recs in results.items():
        out[mode] = summarize(recs)
        if PAIRED_BASE.get(mode) in results:
            out[mode]["flip"] = flip_metrics(results[PAIRED_BASE[mode]], recs)
        if mode != "normal":
            out[mode]["vs_normal"] = {t: paired([base[r["id"]]["correct"] for r in rs], [r["correct"] for r in rs])
                                      for t, rs in [("overall", recs)] + [(t, [r for r in recs if r["qtype"] == t])
                                                                          for t in out[mode]["per_type"]]}
    return out



def table(summaries: dict) -> str:
    """Markdown: a row per mode; accuracy overall (95% CI) and per type, latent rate, attention share, grounding
    (all layers; the chance row: what attention spread evenly over the image scores), and with --compare the
    paired difference against normal."""
    types = list(next(iter(summaries.values()))["per_type"])
    diff = any("vs_normal" in s for s in summaries.values())
    head = "| mode | overall [95% CI] | " + " | ".join(types) + " | latent rate | att. share | grounding |" + (" vs normal [95% CI] |" if diff else "")
    rows = [head, "|" + "---|" * (len(types) + 5 + diff)]
    g = lambda o, k: "-" if o.get("grounding") is None else f"{o['grounding'][k]:.3f}"  # noqa: E731
    for mode, s in summaries.items():
        o = s["overall"]
        share = "-" if o["att_share"] is None else f"{o['att_share']:.3f}"
        cells = [f"{o['acc']:.3f} [{o['ci95'][0]:.2f}, {o['ci95'][1]:.2f}]"] + [f"{s['per_type'][t]['acc']:.3f}" for t in types]
        row = f"| {mode} | " + " | ".join(cells) + f" | {o['latent_rate']:.2f} | {share} | {g(o, 'all')} |"
        if diff:
            v = s.get("vs_normal", {}).get("overall")
            row += f" {v['diff']:+.3f} [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}] |" if v else " - |"
        rows.append(row)
    s = next(iter(summaries.values()))
    rows.append("| *chance* | " + " | ".join(f"{v['chance']:.3f}" for v in [s["overall"]] + [s["per_type"][t] for t in types])
                + f" | | | {g(s['overall'], 'uniform')} |" + (" |" if diff else ""))
    iv = lambda r: "-" if r["rate"] is None else f"{r['rate']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"  # noqa: E731
    for m, s in summaries.items():
        if "flip" in s:
            f = s["flip"]
            rows.append(f"\nEdit pairs ({m} vs {PAIRED_BASE[m]}): edited-view acc. {iv(f['edited_acc'])}; strict paired "
                        f"correct flip {iv(f['paired_flip'])} of {f['paired_flip']['n']} changing pairs (answer changed on "
                        f"{iv(f['change_rate'])}); false flip {iv(f['false_flip'])} of {f['false_flip']['n']} keeping pairs")
        if "donor" in s:
            d = s["donor"]
            rows.append(f"\nDonor swap ({m}): moved to the donor's answer {iv(d['lift'])} of {d['lift']['n']} "
                        f"(chance {d['chance']:.3f}); kept its own right answer {iv(d['kept'])}")
    fit = {m: s["overall"] for m, s in summaries.items() if s["overall"].get("latent_cos") is not None}
    if fit:
        rows.append("\nGenerated latents vs their stage-1 targets: "
                    + ", ".join(f"{m}: cosine {o['latent_cos']:.3f}, R2 {o['latent_r2']:.3f}" for m, o in fit.items()))
    return "\n".join(rows)



def bench_table(summaries: dict) -> str:
    """Markdown: a row per benchmark, accuracy [95% CI], n, latent rate, MMVP's pair accuracy; for the
    paper's seven also VLMEvalKit's headline metric, its rule-decided share (the rest would go to its API
    judge and scores 0 here) and how many replies the lenient and VLMEvalKit verdicts disagree on."""
    rows = ["| benchmark | accuracy [95% CI] | n | latent rate | pair acc. | VLMEvalKit metric | rule-decided | "
            "lenient acc. | verdicts disagree |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        o, v = s["overall"], s.get("vlmeval")
        pair = f"{o['pair_acc']:.3f}" if "pair_acc" in o else "-"
        vk = (f"{v['headline']} {v['metrics'][v['headline']]:.3f} | {v['decided']:.3f} ({v['n'] - v['judge']}/{v['n']}) | "
              f"{v['lenient_acc']:.3f} | {v['disagree']}/{o['n']}") if v else "- | - | - | -"
        rows.append(f"| {name} | {o['acc']:.3f} [{o['ci95'][0]:.2f}, {o['ci95'][1]:.2f}] | {o['n']} | {o['latent_rate']:.2f} "
                    f"| {pair} | {vk} |")
    return "\n".join(rows)



def vlmeval_lines(name: str, report: dict) -> str:
    """VLMEvalKit's metrics of one benchmark, one line."""
    cells = ", ".join(f"{k} {v:.3f}" for k, v in report["metrics"].items())
    return f"{name} (VLMEvalKit, judge-free; {report['judge']} of {report['n']} would need its API judge): {cells}"
