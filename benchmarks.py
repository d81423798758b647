"""Real benchmarks in their released layouts, and the rule-based answer checker shared by eval and reward.

The paper's seven, in VLMEvalKit's TSV layout (one NAME.tsv each: index, base64 image, question, option
columns A, B, ..., answer, category, ...): MathVista_MINI, MathVerse_MINI, MMVP, MMBench_V11_MINI,
VStarBench, MME-RealWorld-Lite, HRBench4K. Also BLINK (parquet), CV-Bench (JSONL), MMVP (its CSV) and
V* (its JSONL) as their authors release them, and any other VLMEvalKit TSV ("tsv").
Every loader returns data.Samples; images stay lazy (paths or encoded bytes) but are checked when read.
A bad row raises ValueError("<file>:<line or row>: <problem>"); a missing file raises FileNotFoundError.

Scoring (is_correct) follows the rules VLMEvalKit applies when no API judge is configured: for a
multiple-choice question the option letter (tagged, lone, or leading "B." / "(B)") or else exactly one
option's text in the reply; free-form answers (MathVista / MathVerse free-form, RL data) are compared as
numbers (within the row's `precision` decimals, else a relative 1e-4) or as normalised short strings,
after taking the last <answer>...</answer> or \\boxed{...} of the reply. The paper scored MathVista,
MathVerse (and MME-RealWorld's extraction) with a GPT judge: expect our numbers there to differ.

    python benchmarks.py MMVP data/vlmeval           # load DIR/MMVP.tsv (or the .tsv itself) and report it
    python benchmarks.py all data/vlmeval            # the seven paper benchmarks
    python eval.py --model DIR --bench all --bench-root data/vlmeval     # evaluate: one table row each
"""
from __future__ import annotations

import argparse
import ast
import base64
import binascii
import csv
import glob
import math
import os
import re
import sys

import data
import reward

PAPER = ("MathVista_MINI", "MathVerse_MINI", "MMVP", "MMBench_V11_MINI", "VStarBench", "MME-RealWorld-Lite", "HRBench4K")


# --------------------------------------------------------------------------------------- loading
def bench_image(path: str) -> str:
    data.image_size(path)
    return path


def answer_letter(answer, n_options: int) -> str:
    """'(A)', '(a)', 'a' or 'A' -> 'A'; anything but one of the first n_options letters is an error."""
    letter = str(answer).strip().strip("()").strip().upper()
    if len(letter) != 1 or letter not in data.OPTION_LETTERS[:n_options]:
        raise ValueError(f"unknown answer letter {answer!r}")
    return letter


def blank(v) -> bool:
    """None, NaN and empty text (pandas writes NaN to a TSV as '' or 'nan') count as missing."""
    if isinstance(v, str):
        return v.strip().lower() in ("", "nan")
    return v is None or (isinstance(v, float) and math.isnan(v))


def need(row: dict, key: str):
    """row[key], or a ValueError naming the missing field (see blank)."""
    if blank(row.get(key)):
        raise ValueError(f"missing field {key!r}")
    return row[key]


def mc_sample(sid: str, qtype, question, options, answer, images: list) -> data.Sample:
    if not isinstance(options, (list, tuple)) or len(options) < 2:
        raise ValueError(f"need a list of at least 2 options, got {options!r}")
    options = [str(o).strip() for o in options]
    # image_path may hold encoded bytes (BLINK, TSV): read_image decodes paths and bytes alike.
    return data.Sample(question=data.format_question(str(question).strip(), options), answer=answer_letter(answer, len(options)),
                  reason="", qtype=str(qtype), bboxes=[], image_path=images[0], id=sid,
                  extra_images=list(images[1:]), choices=options)


def split_options(text: str, field: str) -> tuple[str, list[str]]:
    """'Q? (a) x (b) y' or 'Q?\n(A) x\n(B) y\nAnswer with ...' -> ('Q?', ['x', 'y']); letters must run A, B, ..."""
    parts = re.split(r"(?:^|\s)\(([A-Za-z])\)\s*", text.strip())
    letters, options = "".join(parts[1::2]).upper(), [p.strip() for p in parts[2::2]]
    options[-1:] = [o.split("\n")[0].strip() for o in options[-1:]]  # drop an instruction after the last option
    if len(options) < 2 or letters != data.OPTION_LETTERS[:len(letters)] or not all(options):
        raise ValueError(f"malformed field {field!r}: no options '(A) ...', '(B) ...' in {text!r}")
    return parts[0].strip(), options


def csv_rows(path: str, columns: tuple, delimiter: str = ",") -> list[tuple[int, dict]]:
    """(line number, row) for each record of a CSV/TSV file whose header must name `columns`."""
    csv.field_size_limit(2**31 - 1)  # VLMEvalKit TSVs hold whole base64 images in one field
    with open(data.benchmark_file(path), newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}:1: missing column {missing[0]!r}")
        return [(reader.line_num, row) for row in reader]


def load_blink(root: str, split: str = "val") -> list[data.Sample]:
    """BLINK: root/<Sub_Task>/<split>-*.parquet; up to four images per question (image_1..image_4)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading BLINK's parquet files needs pyarrow: pip install pyarrow") from None
    if not os.path.isdir(root):
        raise FileNotFoundError(f"benchmark directory not found: {root}")
    files = sorted(glob.glob(os.path.join(root, "*", f"{split}-*.parquet")))
    if not files:
        raise FileNotFoundError(f"no {split}-*.parquet files in the sub-task folders of {root}")

    def parse(row, task):
        images = []
        for k in range(1, 5):
            if (image := row.get(f"image_{k}")) is not None:
                if not image.get("bytes"):
                    raise ValueError(f"image_{k} holds no image bytes")
                data.image_size(image["bytes"], f"image_{k}")
                images.append(image["bytes"])
        if not images:
            raise ValueError("missing field 'image_1'")
        return mc_sample(f"blink-{need(row, 'idx')}", row.get("sub_task") or task, need(row, "question"),
                         need(row, "choices"), need(row, "answer"), images)
    samples = []
    for path in files:  # rows are numbered from 0 in the errors
        table, task = pq.read_table(path), os.path.basename(os.path.dirname(path))
        missing = [c for c in ("idx", "question", "choices", "answer", "image_1") if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: missing column {missing[0]!r}")
        samples += data.parse_rows(path, enumerate(table.to_pylist()), lambda row: parse(row, task))
    return samples


def load_cvbench(root: str) -> list[data.Sample]:
    """CV-Bench: root/test.jsonl, images under root/img/; qtype is the row's task (Count, Depth, ...)."""
    path = os.path.join(root, "test.jsonl")

    def parse(line):
        row = data.json_object(line)
        image = bench_image(os.path.join(root, str(need(row, "image"))))
        return mc_sample(f"cvbench-{need(row, 'idx')}", need(row, "task"), need(row, "question"),
                         need(row, "choices"), need(row, "answer"), [image])
    return data.parse_rows(path, data.records(path), parse)


def load_mmvp(root: str) -> list[data.Sample]:
    """MMVP: root/Questions.csv ("(a) Open (b) Closed" options), images at root/MMVP Images/<Index>.jpg."""
    path = os.path.join(root, "Questions.csv")

    def parse(row):
        index = str(need(row, "Index")).strip()
        if not re.fullmatch(r"[1-9]\d*", index):
            raise ValueError(f"field 'Index' must be a positive integer, got {index!r}")
        head, options = split_options(str(need(row, "Options")), "Options")
        if head:
            raise ValueError(f"malformed field 'Options': text before '(a)': {head!r}")
        image = bench_image(os.path.join(root, "MMVP Images", f"{index}.jpg"))
        return mc_sample(f"mmvp-{index}", "mmvp", need(row, "Question"), options, need(row, "Correct Answer"), [image])
    return data.parse_rows(path, csv_rows(path, ("Index", "Question", "Options", "Correct Answer")), parse)


def load_vstar(root: str) -> list[data.Sample]:
    """V* Bench: root/test_questions.jsonl; the options are '(A) ...' inside the question text."""
    path = os.path.join(root, "test_questions.jsonl")

    def parse(line):
        row = data.json_object(line)
        question, options = split_options(str(need(row, "text")), "text")
        if not question:
            raise ValueError("field 'text' has no question before its options")
        image = bench_image(os.path.join(root, str(need(row, "image"))))
        return mc_sample(f"vstar-{need(row, 'question_id')}", need(row, "category"), question, options,
                         need(row, "label"), [image])
    return data.parse_rows(path, data.records(path), parse)


def tsv_image(row: dict, by_index: dict) -> bytes:
    """The row's base64 image (or the image of the row whose index it names), checked to decode."""
    image = str(need(row, "image"))
    image = by_index.get(image, image) if len(image) <= 64 else image
    try:
        raw = base64.b64decode(image, validate=True)
    except binascii.Error:
        raise ValueError("field 'image' is not a base64 image") from None
    data.image_size(raw, "in field 'image'")
    return raw


def tsv_choices(row: dict) -> list[str]:
    """Options: columns A, B, ... (without gaps), else a `choices` column holding a list (MathVista)."""
    letters = [c for c in data.OPTION_LETTERS if not blank(row.get(c))]
    if "".join(letters) != data.OPTION_LETTERS[:len(letters)]:
        raise ValueError(f"options must fill columns A, B, ... without gaps, got {letters}")
    if letters:
        return [str(row[c]).strip() for c in letters]
    if blank(row.get("choices")):
        return []
    try:
        choices = ast.literal_eval(str(row["choices"]))
    except (ValueError, SyntaxError):
        raise ValueError(f"field 'choices' is not a list: {row['choices']!r}") from None
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        raise ValueError(f"field 'choices' must list at least 2 options: {row['choices']!r}")
    return [str(c).strip() for c in choices]


def load_vlmevalkit_tsv(path: str) -> list[data.Sample]:
    """A VLMEvalKit TSV: base64 `image` (or another row's index: that row's image), `question`, options
    in columns A, B, ... (or a `choices` list), `answer` (a letter, an option's text, or free-form),
    optional `hint`, `category`, `precision`. The sample id is <file name>-<index>."""
    rows = csv_rows(path, ("index", "image", "question", "answer"), delimiter="\t")
    name = os.path.splitext(os.path.basename(path))[0]
    by_index = {row["index"]: row["image"] for _, row in rows if len(row.get("image") or "") > 64}

    def parse(row):
        image, options = tsv_image(row, by_index), tsv_choices(row)
        question, answer = str(need(row, "question")).strip(), str(need(row, "answer")).strip()
        if not blank(row.get("hint")):
            question = f"Hint: {row['hint'].strip()}\n{question}"
        sid, qtype = f"{name}-{need(row, 'index')}", row.get("category") or name
        if options:
            if answer in options and not (len(answer) == 1 and answer in data.OPTION_LETTERS[:len(options)]):
                answer = data.OPTION_LETTERS[options.index(answer)]  # MathVista gives the option's text
            return mc_sample(sid, qtype, question, options, answer, [image])
        letters = data.OPTION_LINE_RE.findall(question)
        if len(answer) == 1 and answer in data.OPTION_LETTERS and letters:
            data.check_letter(question, answer)  # MathVerse: options inside the question, answer a letter
        precision = None if blank(row.get("precision")) else int(float(row["precision"]))
        return data.Sample(question=question, answer=answer, reason="", qtype=str(qtype), bboxes=[], image_path=image,
                           id=sid, precision=precision)
    return data.parse_rows(path, rows, parse)


def mmvp_pair_accuracy(ids_correct: dict[str, bool]) -> float:
    """MMVP's pair accuracy: questions 2k and 2k+1 (counting from the first index, 0 or 1) ask about the
    two images of one pair; a pair counts only if both answers are right."""
    index = {}
    for sid, ok in ids_correct.items():
        m = re.fullmatch(r"mmvp-(\d+)", sid, re.I)
        if m is None:
            raise ValueError(f"not an MMVP question id: {sid!r}")
        index[int(m.group(1))] = bool(ok)
    if not index:
        raise ValueError("no MMVP answers to score")
    base = 0 if 0 in index else 1
    pairs: dict[int, list[bool]] = {}
    for i, ok in index.items():
        pairs.setdefault((i - base) // 2, []).append(ok)
    for k in sorted(pairs):
        if len(pairs[k]) != 2:
            raise ValueError(f"MMVP pair {k + 1} needs both mmvp-{2 * k + base} and mmvp-{2 * k + base + 1}")
    return sum(all(v) for v in pairs.values()) / len(pairs)


BENCHMARKS = {"blink": load_blink, "cvbench": load_cvbench, "mmvp": load_mmvp, "vstar": load_vstar,
              "tsv": load_vlmevalkit_tsv, **{n: None for n in PAPER}}


def paper_file(name: str, root: str) -> str:
    """root/NAME.tsv, or root itself when it is a .tsv file."""
    return root if root.endswith(".tsv") else os.path.join(root, f"{name}.tsv")


def load_benchmark(name: str, root: str) -> list[data.Sample]:
    """Load benchmark `name` from `root` (a directory; for "tsv" the .tsv file; for the paper's seven the
    directory holding NAME.tsv, or that file)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARKS)}")
    if name in PAPER:
        return load_vlmevalkit_tsv(paper_file(name, root))
    return BENCHMARKS[name](root)


# ------------------------------------------------------------------------------ answer checking
NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
LEAD_LETTER_RE = re.compile(r"^\s*\(?([A-Z])\)?(?:[.):]|\s*$)")


def final_text(text: str) -> str:
    """The part of a reply that states the answer: the last <answer>...</answer>, else the last
    \\boxed{...}, else the whole reply; latent spans and end tokens removed."""
    t = reward.END_TOKENS.sub(" ", reward.strip_latent_spans(text)).strip()
    for pattern in (r"<answer>(.*?)</answer>", r"\\boxed\{([^{}]*)\}"):
        found = re.findall(pattern, t, re.S)
        if found and found[-1].strip():
            return found[-1].strip()
    return t


def normalise(s: str) -> str:
    s = re.sub(r"[^\w\s.-]", " ", s.lower())
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.replace(" .", " ").split()).strip(" .")


def numbers(s: str) -> list[float]:
    return [float(x.replace(",", "")) for x in NUMBER_RE.findall(s)]


def same_number(pred: float, answer: float, precision: int | None) -> bool:
    if precision is not None:
        return round(pred, precision) == round(answer, precision)
    return math.isclose(pred, answer, rel_tol=1e-4, abs_tol=1e-9)


def option_letter(text: str, choices: list[str]) -> str | None:
    """The option a reply picks: its letter (reward.parse_answer, or a leading "B." / "(B)"), else the
    one option whose normalised text the reply's answer part contains (none or several: None)."""
    letter = reward.parse_answer(text)
    final = final_text(text)
    if letter is None and (m := LEAD_LETTER_RE.match(final)):
        letter = m.group(1)
    if letter is not None:
        return letter if letter in data.OPTION_LETTERS[:len(choices)] else None
    pred = f" {normalise(final)} "
    hits = [i for i, c in enumerate(choices) if normalise(c) and f" {normalise(c)} " in pred]
    return data.OPTION_LETTERS[hits[0]] if len(hits) == 1 else None


def is_correct(text: str, sample) -> bool:
    """Does reply `text` answer `sample` correctly? Letters for multiple choice (data.Sample.choices, or
    a letter answer); numbers with tolerance; else normalised strings."""
    answer = str(sample.answer).strip()
    if sample.choices:
        return option_letter(text, sample.choices) == answer
    if len(answer) == 1 and answer in data.OPTION_LETTERS:  # synthetic / JSONL letters: reward.parse_answer's rule
        return reward.parse_answer(text) == answer
    final, want = final_text(text), numbers(answer)
    if len(want) == 1 and len(normalise(answer).split()) <= 6:  # a number, or a short phrase around one
        got = numbers(final)
        return bool(got) and same_number(got[-1], want[0], getattr(sample, "precision", None))
    return normalise(final) == normalise(answer)


# -------------------------------------------------------------------------------------------- CLI
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(BENCHMARKS) + ["all"], help="benchmark (all: the paper's seven)")
    p.add_argument("root", help="its directory (the paper's seven: the folder with NAME.tsv, or the .tsv)")
    a = p.parse_args(argv)
    try:
        for name in PAPER if a.name == "all" else [a.name]:
            samples = load_benchmark(name, a.root)
            types = sorted({s.qtype for s in samples})
            print(f"{name}: {len(samples)} questions, {sum(bool(s.choices) for s in samples)} multiple choice, "
                  f"{len(types)} categories ({', '.join(types[:6])}{' ...' if len(types) > 6 else ''})")
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
