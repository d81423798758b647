"""Real benchmarks in their released layouts, and the rule-based answer checker shared by eval and reward.

The paper's seven, in VLMEvalKit's TSV layout (one NAME.tsv each: index, base64 image, question, option
columns A, B, ..., answer, category, ...): MathVista_MINI, MathVerse_MINI, MMVP, MMBench_V11_MINI,
VStarBench, MME-RealWorld-Lite, HRBench4K. Also BLINK (parquet), CV-Bench (JSONL), MMVP (its CSV) and
V* (its JSONL) as their authors release them, and any other VLMEvalKit TSV ("tsv").
Every loader returns data.Samples; images stay lazy (paths or encoded bytes) but are checked when read.
A bad row raises ValueError("<file>:<line or row>: <problem>"); a missing file raises FileNotFoundError.

Two protocols for the paper's seven (prompt_text, is_correct, verdicts):
  vlmeval   VLMEvalKit's own: each dataset's prompt verbatim, its exact-matching verdict and its metrics
            (vlmeval_rules.py; eval.py --bench's default). Rows it would send to its API judge are counted.
  lenient   our checker, also the RL accuracy reward: for a multiple-choice question the option letter
            (tagged, lone, or leading "B." / "(B)") or else exactly one option's text in the reply;
            free-form answers as numbers (within the row's `precision` decimals, else a relative 1e-4)
            or as normalised short strings, after taking the last <answer>...</answer> or \\boxed{...}.

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
from dataclasses import dataclass, field

import data
import datafiles
import reward
import vlmeval_rules

PAPER = vlmeval_rules.PAPER
PROTOCOLS = ("vlmeval", "lenient")


@dataclass
class BenchSample(data.Sample):
    """A row of one of the paper's seven: `row` is the TSV row as VLMEvalKit reads it (image left out,
    MME-RealWorld's options and MMBench's g_index filled in), `prompts` the text each protocol sends."""
    bench: str = ""
    row: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------- loading
def bench_image(path: str) -> str:
    datafiles.image_size(path)
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
    """(line number where it starts, row) for each record of a CSV/TSV file whose header must name `columns`."""
    csv.field_size_limit(2**31 - 1)  # VLMEvalKit TSVs hold whole base64 images in one field
    with open(datafiles.benchmark_file(path), newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}:1: missing column {missing[0]!r}")
        out, start = [], reader.line_num + 1
        for row in reader:  # a quoted field may span lines: a record is named by its first line
            out.append((start, row))
            start = reader.line_num + 1
        return out


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
                datafiles.image_size(image["bytes"], f"image_{k}")
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
        samples += datafiles.parse_rows(path, enumerate(table.to_pylist()), lambda row: parse(row, task))
    return samples


def load_cvbench(root: str) -> list[data.Sample]:
    """CV-Bench: root/test.jsonl, images under root/img/; qtype is the row's task (Count, Depth, ...)."""
    path = os.path.join(root, "test.jsonl")

    def parse(line):
        row = datafiles.json_object(line)
        image = bench_image(os.path.join(root, str(need(row, "image"))))
        return mc_sample(f"cvbench-{need(row, 'idx')}", need(row, "task"), need(row, "question"),
                         need(row, "choices"), need(row, "answer"), [image])
    return datafiles.parse_rows(path, datafiles.records(path), parse)


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
    return datafiles.parse_rows(path, csv_rows(path, ("Index", "Question", "Options", "Correct Answer")), parse)


def load_vstar(root: str) -> list[data.Sample]:
    """V* Bench: root/test_questions.jsonl; the options are '(A) ...' inside the question text."""
    path = os.path.join(root, "test_questions.jsonl")

    def parse(line):
        row = datafiles.json_object(line)
        question, options = split_options(str(need(row, "text")), "text")
        if not question:
            raise ValueError("field 'text' has no question before its options")
        image = bench_image(os.path.join(root, str(need(row, "image"))))
        return mc_sample(f"vstar-{need(row, 'question_id')}", need(row, "category"), question, options,
                         need(row, "label"), [image])
    return datafiles.parse_rows(path, datafiles.records(path), parse)


def tsv_image(row: dict, by_index: dict) -> bytes:
    """The row's base64 image (or the image of the row whose index it names), checked to decode."""
    image = str(need(row, "image"))
    image = by_index.get(image, image) if len(image) <= 64 else image
    try:
        raw = base64.b64decode(image, validate=True)
    except binascii.Error:
        raise ValueError("field 'image' is not a base64 image") from None
    datafiles.image_size(raw, "in field 'image'")
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


def paper_row(bench: str, row: dict) -> dict:
    """A row of one of the paper's seven as VLMEvalKit reads it (its image left out), checked for what
    VLMEvalKit needs from it: a multiple-choice row without options is an error, never a bare question."""
    row = {k: v for k, v in row.items() if k != "image"}
    if bench == "MME-RealWorld-Lite":  # image_mcq.py MMERealWorld.load_data
        row["multi-choice options"], texts = vlmeval_rules.mme_options(need(row, "multi-choice options"))
        row.update(zip(data.OPTION_LETTERS, texts))
        vlmeval_rules.mme_category(row)
    elif bench in vlmeval_rules.MCQ and len(vlmeval_rules.options(row)) < 2:
        raise ValueError("no options: columns A, B, ... hold fewer than 2")
    if bench == "MMBench_V11_MINI":  # multiple_choice.py mcq_circular_eval: g_index = index mod 1e6
        for key in ("index", "g_index"):
            if not blank(row.get(key)) and not re.fullmatch(r"\d+", str(row[key]).strip()):
                raise ValueError(f"field {key!r} must be an integer, got {row[key]!r}")
        row["g_index"] = int(row["g_index"]) if not blank(row.get("g_index")) else int(row["index"]) % 1_000_000
    elif bench == "HRBench4K":
        need(row, "cycle_category")
        need(row, "category")
    elif bench == "MathVista_MINI":
        kind = need(row, "question_type")
        if kind == "multi_choice":
            choices = list(vlmeval_rules.mathvista_choices({"choices": need(row, "choices")}).values())
            if blank(row.get("answer_option")):  # mathvista.py post_check compares with answer_option
                if row["answer"] not in choices:
                    raise ValueError(f"answer {row['answer']!r} is none of the choices and there is no 'answer_option'")
                row["answer_option"] = data.OPTION_LETTERS[choices.index(row["answer"])]
        elif kind == "free_form":
            need(row, "answer_type")
        else:
            raise ValueError(f"field 'question_type' must be multi_choice or free_form, got {kind!r}")
    elif bench == "MathVerse_MINI":
        need(row, "problem_version")
    return row


def load_vlmevalkit_tsv(path: str, bench: str | None = None) -> list[data.Sample]:
    """A VLMEvalKit TSV: base64 `image` (or another row's index: that row's image), `question`, options
    in columns A, B, ... (or a `choices` list; MME-RealWorld: the `multi-choice options` list), `answer`
    (a letter, an option's text, or free-form), optional `hint`, `category`, `precision`. The sample id
    is <file name>-<index>. `bench`, one of the paper's seven, also keeps each row as VLMEvalKit reads it
    and the prompt of each protocol (BenchSample)."""
    rows = csv_rows(path, ("index", "image", "question", "answer"), delimiter="\t")
    name = os.path.splitext(os.path.basename(path))[0]
    by_index = {row["index"]: row["image"] for _, row in rows if len(row.get("image") or "") > 64}

    def parse(raw):
        image = tsv_image(raw, by_index)
        row = paper_row(bench, raw) if bench else raw
        options = tsv_choices(row)
        question, answer = str(need(row, "question")).strip(), str(need(row, "answer")).strip()
        if not blank(row.get("hint")):
            question = f"Hint: {row['hint'].strip()}\n{question}"
        sid, qtype = f"{name}-{need(row, 'index')}", row.get("category") or name
        if options:
            if answer in options and not (len(answer) == 1 and answer in data.OPTION_LETTERS[:len(options)]):
                answer = data.OPTION_LETTERS[options.index(answer)]  # MathVista gives the option's text
            sample = mc_sample(sid, qtype, question, options, answer, [image])
        else:
            letters = datafiles.OPTION_LINE_RE.findall(question)
            if len(answer) == 1 and answer in data.OPTION_LETTERS and letters:
                datafiles.check_letter(question, answer)  # MathVerse: options inside the question, answer a letter
            precision = None if blank(row.get("precision")) else int(float(row["precision"]))
            sample = data.Sample(question=question, answer=answer, reason="", qtype=str(qtype), bboxes=[],
                                 image_path=image, id=sid, precision=precision)
        if not bench:
            return sample
        return BenchSample(**vars(sample), bench=bench, row=row,
                           prompts={"lenient": sample.question, "vlmeval": vlmeval_rules.prompt(bench, row)})
    return datafiles.parse_rows(path, rows, parse)


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
        samples = load_vlmevalkit_tsv(paper_file(name, root), name)
        if name == "MMVP":
            try:
                vlmeval_rules.mmvp_pairs([s.row for s in samples])
            except ValueError as e:
                raise ValueError(f"{paper_file(name, root)}: {e}") from None
        return samples
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


def is_correct(text: str, sample, protocol: str = "lenient") -> bool:
    """Does reply `text` answer `sample` correctly? protocol "lenient" (the RL accuracy reward): letters
    for multiple choice (data.Sample.choices, or a letter answer); numbers with tolerance; else normalised
    strings. "vlmeval": VLMEvalKit's judge-free verdict (vlmeval_rules.verdict; the paper's seven only)."""
    if protocol == "vlmeval":
        return vlmeval_verdict(text, sample)["correct"]
    if protocol != "lenient":
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
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


def check_protocol(sample, protocol: str):
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if protocol == "vlmeval" and getattr(sample, "bench", None) not in PAPER:
        raise ValueError(f"protocol vlmeval is for the paper's seven benchmarks ({', '.join(PAPER)}), "
                         f"not {sample.id or 'this sample'}")


def prompt_text(sample, protocol: str) -> str:
    """The text the model is sent for `sample` under `protocol` (its images go before it)."""
    check_protocol(sample, protocol)
    return sample.prompts[protocol] if isinstance(sample, BenchSample) else sample.question


def vlmeval_verdict(text: str, sample) -> dict:
    """vlmeval_rules.verdict on a decoded reply (latent spans and special tokens dropped, as VLMEvalKit decodes)."""
    check_protocol(sample, "vlmeval")
    return vlmeval_rules.verdict(sample.bench, reward.SPAN_RE.sub("", text), sample.row)


def verdicts(text: str, sample, protocol: str = "lenient") -> dict:
    """An eval record's verdict fields: "correct" under `protocol`; for the paper's seven also both
    verdicts ("lenient", "vlmeval"), what VLMEvalKit's rules read ("vlmeval_pred") and "judge" (VLMEvalKit
    would ask its API judge)."""
    if getattr(sample, "bench", None) not in PAPER:
        return {"correct": is_correct(text, sample, protocol)}
    v, lenient = vlmeval_verdict(text, sample), is_correct(text, sample)
    return {"correct": v["correct"] if protocol == "vlmeval" else lenient, "lenient": lenient,
            "vlmeval": v["correct"], "vlmeval_pred": v["pred"], "judge": v["judge"]}


def report(name: str, samples, records) -> dict:
    """VLMEvalKit's metrics (vlmeval_rules.report) of eval records (benchmarks.verdicts' fields, in the order of
    `samples`), and "disagree": how many replies the two verdicts differ on."""
    rows = [s.row for s in samples]
    out = vlmeval_rules.report(name, rows, [{"pred": r["vlmeval_pred"], "correct": r["vlmeval"], "judge": r["judge"]}
                                      for r in records])
    out["disagree"] = sum(r["lenient"] != r["vlmeval"] for r in records)
    out["lenient_acc"] = sum(r["lenient"] for r in records) / max(len(records), 1)
    return out


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
