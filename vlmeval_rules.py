"""VLMEvalKit's judge-free protocol for the paper's seven benchmarks: the text each dataset sends, the
exact-matching verdict on a reply, and the metrics it reports. Re-expressed here from reading
VLMEvalKit's code (open-compass/VLMEvalKit, 2026-08; file and function named at each rule); no code of
it is copied, only the prompt strings the model must receive verbatim.

Prompts (the checkpoint is registered without a custom prompt, so each dataset's own build_prompt):
  MCQ (MMVP, MMBench_V11_MINI, VStarBench, HRBench4K; image_mcq.py ImageMCQDataset.build_prompt):
      "Hint: {hint}\\n" (when present) "Question: {question}\\nOptions:\\nA. ...\\n"
      "Please select the correct answer from the options above. \\n"
  MME-RealWorld-Lite (image_mcq.py MMERealWorld.build_prompt / load_data): "{question} The choices are
      listed below:\\n(A) ...\\n(E) ...\\nSelect the best answer ... The best answer is:"
  MathVista_MINI, MathVerse_MINI (image_base.py / image_vqa.py build_prompt): the question column as is.
Verdicts (no API judge):
  MCQ: utils/matching_util.py can_infer (can_infer_option, then can_infer_text); MMBench circularly
      (dataset/utils/multiple_choice.py mcq_circular_eval: a question counts only if every rotation does).
  MME-RealWorld: image_mcq.py MMERealWorld.evaluate + multiple_choice.py extract_characters_regex.
  MathVista: dataset/utils/mathvista.py post_check with prefetch (can_infer for multi_choice, int/float
      equality of the whole reply for free_form); every other row goes to the judge in VLMEvalKit.
  MathVerse: dataset/utils/mathverse.py sends every reply to a judge for extraction; offline the reply
      itself stands for the extraction and post_check_score's rule (stripped string equality) decides.
A row VLMEvalKit would send to its API judge is counted as "needs a judge" and scores 0 here (as
VLMEvalKit's exact_matching does for MCQ).
"""
from __future__ import annotations

import ast
import json
import re
import string
from collections import defaultdict

PAPER = ("MathVista_MINI", "MathVerse_MINI", "MMVP", "MMBench_V11_MINI", "VStarBench", "MME-RealWorld-Lite", "HRBench4K")
MCQ = ("MMVP", "MMBench_V11_MINI", "VStarBench", "HRBench4K")
MIN_PIXELS, MAX_PIXELS = 1280 * 28 * 28, 8192 * 28 * 28  # the paper's VLMEvalKit registration of Qwen2.5-VL
# pandas.read_csv's default missing-value strings: VLMEvalKit reads TSVs with it, so these cells are NaN there
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}

MCQ_TAIL = "Please select the correct answer from the options above. \n"
MME_CHOICES = "The choices are listed below:\n"
MME_SYS = ("Select the best answer to the above multiple-choice question based on the image. "
           "Respond with only the letter (A, B, C, D, or E) of the correct option. \nThe best answer is:")


def na(v) -> bool:
    """Missing as pandas reads a TSV cell (None, NaN, or one of its default NA strings)."""
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and v in PANDAS_NA)


def options(row: dict) -> dict:
    """{letter: text} of the option columns A..Z that are present and not missing, in letter order."""
    return {c: row[c] for c in string.ascii_uppercase if c in row and not na(row[c])}


def mme_options(cell: str) -> tuple[str, list[str]]:
    """MME-RealWorld's `multi-choice options`: a Python list "['(A) x', ...]" (the Lite TSV, which
    MMERealWorld.load_data turns into a block) or that block already -> (block, option texts without "(A) ")."""
    raw = str(cell)
    text = raw.strip()
    if text.startswith("["):
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            items = None
        if not isinstance(items, (list, tuple)) or len(items) < 2:
            raise ValueError(f"field 'multi-choice options' is not a list of options: {text[:80]!r}")
        items = [str(x) for x in items]
    elif text.startswith(MME_CHOICES.strip()):  # kept as it is: build_prompt sends the cell
        items = [x for x in text.split("\n")[1:] if x.strip()]
        if len(items) < 2:
            raise ValueError(f"field 'multi-choice options' lists fewer than 2 options: {text[:80]!r}")
        _check_letters(items)
        return raw, [x[4:] for x in items]
    else:
        raise ValueError(f"field 'multi-choice options' holds no options: {text[:80]!r}")
    _check_letters(items)
    return MME_CHOICES + "\n".join(items), [x[4:] for x in items]  # load_data: A = options[0][4:], ...


def _check_letters(items: list[str]):
    for letter, item in zip(string.ascii_uppercase, items):
        if not item.startswith(f"({letter}) "):
            raise ValueError(f"field 'multi-choice options': option {letter} must start '({letter}) ', got {item[:40]!r}")


def prompt(bench: str, row: dict) -> str:
    """The text VLMEvalKit sends for this row (its images go before it)."""
    if bench in ("MathVista_MINI", "MathVerse_MINI"):
        return str(row["question"])
    if bench == "MME-RealWorld-Lite":
        return f"{row['question']} {row['multi-choice options']}\n{MME_SYS}"
    text = "" if na(row.get("hint")) else f"Hint: {row['hint']}\n"
    text += f"Question: {row['question']}\n"
    opts = options(row)
    if opts:
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in opts.items()) + MCQ_TAIL
    return text


# ------------------------------------------------------------------------------ matching (no judge)
SPECIAL_RE = re.compile(r"<\|[^<>|]*\|>")
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
PUNCT = ".()[],:;!*#{}"
# "(correct) answer is X", any case, X in A-D: in can_infer_option since 2026-06 (VLMEvalKit PR #1552); the
# releases before it lack this rule. Its VERBOSE-only "A might be a quantifier" branch is off by default.
VERBOSE_RE = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def reply_text(text: str) -> str:
    """The reply as VLMEvalKit keeps it: decoded with skip_special_tokens, so a latent span (all special
    tokens) and end tokens vanish without leaving a space."""
    return SPECIAL_RE.sub("", text)


def infer_option(reply: str, letters) -> str | None:
    """matching_util.py can_infer_option: the one option letter standing as a word (after .()[],:;!*#{}
    become spaces) among the last four words; "Z" for a refusal or a lone Z; else "answer is X" (A-D,
    any case); else None."""
    if "Failed to obtain answer via API" in reply:
        return None
    if any(r in reply for r in REFUSALS):
        return "Z"
    words = reply.translate(str.maketrans(PUNCT, " " * len(PUNCT))).split()
    named = [c for c in letters if c in words]
    if len(named) == 1:
        if words.index(named[0]) > len(words) - 5:
            return named[0]
    elif not named and "Z" in words:
        return "Z"
    m = VERBOSE_RE.search(reply)
    return m.group(1).upper() if m and m.group(1).upper() in letters else None


def infer_text(reply: str, opts: dict) -> str | None:
    """matching_util.py can_infer_text: exactly one option's text inside the lower-cased reply, and the
    reply at most twice as long as all option texts together."""
    low = reply.lower()
    if len(low) > 2 * sum(len(str(v)) for v in opts.values()):
        return None
    hits = [k for k, v in opts.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def can_infer(reply: str, opts: dict) -> str | None:
    """matching_util.py can_infer: the option letter, else the option text; None when neither decides."""
    return infer_option(reply, list(opts)) or infer_text(reply, opts)


MME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
                "The correct option is", "Best answer:", "Best option:")


def mme_letter(reply: str) -> str:
    """MMERealWorld.evaluate + extract_characters_regex: the <answer> content upper-cased if tagged; answer
    prefixes removed; the first capital A-E anywhere (none in more than 10 words: ''); else the option
    "(A)".."(E)" containing the whole (lower-cased) reply, so an empty reply reads as A."""
    m = re.search(r"<answer>(.*?)</answer>", reply, re.S)
    s = (m.group(1).strip().upper() if m else reply).strip()
    for p in MME_PREFIXES:
        s = s.replace(p, "")
    first = re.search("[ABCDE]", s)
    if first:
        return first.group(0)
    if len(s.split()) > 10:
        return ""
    return next((c for c in "ABCDE" if s.lower() in f"({c.lower()})"), "")


def mathvista_choices(row: dict) -> dict:
    return {string.ascii_uppercase[i]: v for i, v in enumerate(ast.literal_eval(str(row["choices"])))}


def verdict(bench: str, reply: str, row: dict) -> dict:
    """{"pred": what the rules read (a letter, or None), "correct": bool, "judge": True when VLMEvalKit
    would send this reply to its API judge (then it counts as wrong here)}."""
    reply = reply_text(reply)
    if bench == "MME-RealWorld-Lite":
        pred = mme_letter(reply)
        return {"pred": pred or None, "correct": pred == row["answer"], "judge": False}
    if bench == "MathVerse_MINI":
        return {"pred": reply.strip(), "correct": reply.strip() == str(row["answer"]).strip(), "judge": True}
    if bench == "MathVista_MINI":
        if row["question_type"] == "multi_choice":
            pred = can_infer(reply, mathvista_choices(row))
            return {"pred": pred, "correct": pred == row["answer_option"], "judge": pred is None}
        cast = {"integer": int, "float": float}.get(row["answer_type"])
        try:
            ok = cast(reply) == cast(row["answer"]) if cast else str(row["answer"]) == "None"
        except ValueError:
            ok = False
        return {"pred": reply.strip() if ok else None, "correct": ok, "judge": not ok}
    pred = can_infer(reply, options(row))
    return {"pred": pred, "correct": pred == row["answer"], "judge": pred is None}


# ------------------------------------------------------------------------------------ aggregation
def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def by_key(rows, hits, key) -> dict:
    """{value of row[key]: mean hit} over the rows that have the key."""
    groups = defaultdict(list)
    for row, hit in zip(rows, hits):
        if not na(row.get(key)):
            groups[str(row[key])].append(hit)
    return {k: mean(v) for k, v in sorted(groups.items())}


def report_acc(rows, hits) -> dict:
    """multiple_choice.py report_acc: Overall, then each l2-category and category (per split if any)."""
    splits = sorted({str(r.get("split")) for r in rows if not na(r.get("split"))}) or [None]
    out = {}
    for sp in splits:
        sub = [(r, h) for r, h in zip(rows, hits) if sp is None or str(r.get("split")) == sp]
        pre = "" if len(splits) == 1 else f"{sp}/"
        out[pre + "Overall"] = mean(h for _, h in sub)
        for key in ("l2-category", "category"):
            out.update({pre + k: v for k, v in by_key([r for r, _ in sub], [h for _, h in sub], key).items()})
    return out


def circular(rows, verdicts) -> tuple[list, list, int]:
    """multiple_choice.py mcq_circular_eval: rows grouped by g_index (index mod 1e6); a group counts for its
    main row (index == g_index) when every rotation's pred is its answer; with exact matching a group
    none of whose rotations is read wrongly but some not at all is 0 and would go to the judge.
    -> (main rows, hits, groups needing the judge)."""
    groups = defaultdict(list)
    for row, v in zip(rows, verdicts):
        groups[int(row["g_index"])].append((row, v))
    mains, hits, judge = [], [], 0
    for row in rows:
        if int(row["index"]) != int(row["g_index"]):
            continue
        group = groups[int(row["index"])]
        wrong = any(v["pred"] is not None and v["pred"] != r["answer"] for r, v in group)
        right = all(v["pred"] == r["answer"] for r, v in group)
        mains.append(row)
        hits.append(right)
        judge += not wrong and not right
    return mains, hits, judge


def mmvp_pairs(rows) -> list[tuple[int, int]]:
    """report_acc_MMVP: rows sorted by index pair up as (0, 1), (2, 3), ...; each pair asks one question."""
    order = sorted(range(len(rows)), key=lambda i: int(rows[i]["index"]))
    if len(order) % 2:
        raise ValueError(f"MMVP needs its questions in pairs, got {len(order)} rows")
    pairs = list(zip(order[::2], order[1::2]))
    for a, b in pairs:
        if str(rows[a]["question"]) != str(rows[b]["question"]):
            raise ValueError(f"MMVP rows {rows[a]['index']} and {rows[b]['index']} are a pair but ask different questions")
    return pairs


def mme_category(row) -> tuple[str, str]:
    """MME-RealWorld's category "Task/Subtask" (get_dimension_rating), Task Perception or Reasoning."""
    parts = str(row.get("category")).split("/")
    if len(parts) < 2 or parts[0] not in ("Perception", "Reasoning"):
        raise ValueError(f"field 'category' must be 'Perception/<subtask>' or 'Reasoning/<subtask>', got {row.get('category')!r}")
    return parts[0], parts[1]


def skills(row) -> list[str]:
    """MathVista's `skills` cell: a list literal, else the cell itself (MathVista_acc)."""
    try:
        value = ast.literal_eval(str(row["skills"]))
    except (ValueError, SyntaxError):
        return [str(row["skills"])]
    return [str(s) for s in value] if isinstance(value, (list, tuple)) else [str(value)]


def metadata(row) -> dict:
    """MathVerse's `metadata` cell (MathVerse_acc: single quotes read as double, then JSON)."""
    if na(row.get("metadata")):
        return {}
    try:
        value = json.loads(str(row["metadata"]).replace("'", '"'))
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def report(bench: str, rows: list[dict], verdicts: list[dict]) -> dict:
    """VLMEvalKit's metrics for one benchmark from its rows and verdicts (fractions, not percents):
    {"metrics": {name: value}, "headline": the name to quote, "n": units scored, "judge": how many of them
    would go to the API judge, "decided": the rule-decided share}."""
    hits = [bool(v["correct"]) for v in verdicts]
    n, judge = len(rows), sum(bool(v["judge"]) for v in verdicts)
    if bench == "MMBench_V11_MINI":
        mains, group_hits, judge = circular(rows, verdicts)
        metrics, headline, n = report_acc(mains, group_hits), "Overall", len(mains)
    elif bench == "MMVP":
        pairs = mmvp_pairs(rows)
        metrics = {"Overall": mean(hits[a] and hits[b] for a, b in pairs), "Average": mean(hits)}
        headline = "Overall"
    elif bench == "HRBench4K":
        cycles = defaultdict(list)
        for row, hit in zip(rows, hits):
            cycles[str(row["cycle_category"])].append((row, hit))
        metrics, total = {}, defaultdict(float)
        for cycle, sub in sorted(cycles.items()):  # report_acc_hrbench / hrbench_score
            accs = {"all": mean(h for _, h in sub), **by_key([r for r, _ in sub], [h for _, h in sub], "category")}
            for kind, acc in accs.items():
                metrics[f"{cycle}/{kind}"] = acc
                total[kind] += acc
        metrics.update({f"Average/{kind}": v / len(cycles) for kind, v in total.items()})
        headline = "Average/all"
    elif bench == "MME-RealWorld-Lite":
        tasks = [mme_category(r) for r in rows]  # get_dimension_rating
        metrics = {"Overall": mean(hits)}
        for task in ("Perception", "Reasoning"):
            metrics[task] = mean(h for (t, _), h in zip(tasks, hits) if t == task)
            for sub in sorted({s for t, s in tasks if t == task}):
                metrics[f"{task}/{sub}"] = mean(h for (t, s), h in zip(tasks, hits) if (t, s) == (task, sub))
        headline = "Overall"
    elif bench == "MathVista_MINI":
        groups = defaultdict(list)  # mathvista.py MathVista_acc: Overall, each task, each skill
        for row, hit in zip(rows, hits):
            for key in ["Overall", str(row.get("task"))] + skills(row):
                groups[key].append(hit)
        metrics, headline = {k: mean(v) for k, v in groups.items()}, "Overall"
    elif bench == "MathVerse_MINI":
        metrics = {"all versions": mean(hits)}  # ours: VLMEvalKit reports each problem version apart
        for version in sorted({str(r["problem_version"]) for r in rows}):  # mathverse.py MathVerse_acc
            sub = [(r, h) for r, h in zip(rows, hits) if str(r["problem_version"]) == version]
            metrics[f"{version}/Overall"] = mean(h for _, h in sub)
            for key in ("subject", "subfield"):
                values = defaultdict(list)
                for r, h in sub:
                    if key in metadata(r):
                        values[str(metadata(r)[key])].append(h)
                metrics.update({f"{version}/{k}": mean(v) for k, v in sorted(values.items())})
        headline = "all versions"
    elif bench == "VStarBench":
        metrics, headline = report_acc(rows, hits), "Overall"
    else:
        raise ValueError(f"not one of the paper's seven benchmarks: {bench!r}")
    return {"metrics": metrics, "headline": headline, "n": n, "judge": judge, "decided": 1 - judge / max(n, 1)}
