"""LVR / LLaVA-format data files, and where the training questions come from.

Reading LVR's SFT data as released: a JSON array or JSONL of {image: str | [str], conversations: [{from:
human, value: "<image>\n..."}, {from: gpt, value: "<lvr>\n... answer"}], bboxes: [[x0, y0, x1, y1], ...]}
(boxes normalised, or in pixels of the image); RL rows may instead give `question` and `answer` and no
boxes; answers may be letters or free-form text (benchmarks.is_correct scores them). Every image is
opened and checked when the data is read; a bad row names the file and line (JSON array: row).
Stream is the trainers' question source: the synthetic generator (data.py) or such a file.

    python data.py --check lvr_sft.json                  # read LVR's SFT data (or RL rows) and report
    python data.py --export out/ --split val --n 200     # write out/val.jsonl + out/images/*.png
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from data import DEFAULT_TASK, IMAGE_TAG, LVR_TAG, OPTION_LETTERS, Sample, make_sample, make_split

def to_record(s: Sample, image_rel: str) -> dict:
    return {"id": s.id, "image": image_rel, "question_type": s.qtype, "bboxes": s.bboxes,
            "conversations": [{"from": "human", "value": "<image>\n" + s.question},
                              {"from": "gpt", "value": f"{s.reason} <answer>{s.answer}</answer>".strip()}]}


def export_jsonl(samples: list[Sample], out_dir: str, name: str) -> str:
    """Write out_dir/<name>.jsonl and out_dir/images/<id>.png; returns the JSONL path."""
    from PIL import Image
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path + ".tmp", "w") as f:
        for s in samples:
            rel = f"images/{s.id}.png"
            Image.fromarray(s.load_image()).save(os.path.join(out_dir, rel))
            f.write(json.dumps(to_record(s, rel)) + "\n")
    os.replace(path + ".tmp", path)
    return path


ANSWER_RE = re.compile(r"<answer>\s*([A-Z])\s*</answer>|^\s*\(?([A-Z])\)?\s*$")
TAGGED_TEXT_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
OPTION_LINE_RE = re.compile(r"^\s*\(?([A-Z])[.):]\s", re.M)  # "A. x", "(A) x", "A: x" at a line start
MAX_IMAGE_PIXELS = 178956970  # PIL's own decompression-bomb threshold


def answer_of(reply: str) -> str:
    """The answer a reply states: a letter (<answer>B</answer>, a lone "B"), else the text inside
    <answer>...</answer> or the last \boxed{...}, else the whole reply without its <lvr> placeholder."""
    match = ANSWER_RE.search(reply)
    if match:
        return match.group(1) or match.group(2)
    tagged = TAGGED_TEXT_RE.findall(reply)
    if tagged and tagged[-1].strip():
        return tagged[-1].strip()
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", reply)
    if boxed and boxed[-1].strip():
        return boxed[-1].strip()
    text = reply.replace(LVR_TAG, "").strip()
    if not text:
        raise ValueError("the gpt turn holds no answer")
    return text


def check_letter(question: str, answer: str):
    """A letter answer must name one of the question's lettered options (when it lists any)."""
    letters = OPTION_LINE_RE.findall(question)
    if len(answer) == 1 and answer in OPTION_LETTERS and letters and answer not in letters:
        raise ValueError(f"answer {answer!r} is not one of the options {''.join(letters)}")


def image_size(src, name: str | None = None) -> tuple[int, int]:
    """(width, height) of an image file (or encoded bytes, called `name` in errors), after checking that
    it decodes as an image of sane size: not an image, truncated, or a decompression bomb is a ValueError."""
    import io
    import warnings
    from PIL import Image
    name = name or src
    if isinstance(src, str) and not os.path.isfile(src):
        raise ValueError(f"image not found: {src}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
                size = im.size
                if size[0] * size[1] > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{size[0]}x{size[1]}")
                im.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"image {name} has too many pixels to decode safely (a decompression bomb?)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for data that is not an image
        raise ValueError(f"image {name} is not a readable image ({type(e).__name__})") from None
    return size


def norm_boxes(boxes, size: tuple[int, int]) -> list[list[float]]:
    """Boxes as [x0, y0, x1, y1]: normalised (all values <= 1) or in pixels of the image (width, height)."""
    ok = isinstance(boxes, list) and all(isinstance(b, list) and len(b) == 4 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in b) and b[0] < b[2] and b[1] < b[3]
        for b in boxes)
    if not ok:
        raise ValueError(f"field 'bboxes' must be a list of [x0, y0, x1, y1] with x0 < x1, y0 < y1: {boxes!r}")
    if all(v <= 1 for b in boxes for v in b):
        return [[float(v) for v in b] for b in boxes]
    w, h = size
    if any(b[2] > w or b[3] > h for b in boxes):
        raise ValueError(f"field 'bboxes': pixel boxes must lie inside the {w}x{h} image: {boxes!r}")
    return [[round(b[0] / w, 6), round(b[1] / h, 6), round(b[2] / w, 6), round(b[3] / h, 6)] for b in boxes]


def turns(rec: dict) -> tuple[str, str]:
    """(question, reply) of a record: LLaVA `conversations` (human, gpt), or RL-style `question` + `answer`."""
    if "conversations" in rec:
        conv = rec["conversations"]
        if not (isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, dict) and "value" in t for t in conv[:2])):
            raise ValueError("field 'conversations' must hold a human turn and a gpt turn with 'value'")
        return str(conv[0]["value"]), str(conv[1]["value"])
    for key in ("question", "answer"):
        if key not in rec:
            raise ValueError(f"missing field {key!r} (or 'conversations')")
    return str(rec["question"]), str(rec["answer"])


def from_record(rec: dict, base_dir: str) -> Sample:
    """One record of LVR's SFT format (or RL data: question, image, answer) -> Sample; its images are
    checked here. Raises ValueError naming the bad field."""
    if "image" not in rec:
        raise ValueError("missing field 'image'")
    images = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
    if not images or not all(isinstance(x, str) and x for x in images):
        raise ValueError(f"field 'image' must be a path or a non-empty list of paths: {rec['image']!r}")
    paths = [os.path.join(base_dir, x) for x in images]
    sizes = [image_size(p) for p in paths]
    question, reply = turns(rec)
    if question.count(IMAGE_TAG) not in (0, len(paths)):
        raise ValueError(f"the question has {question.count(IMAGE_TAG)} <image> placeholders for {len(paths)} images")
    if question.count(IMAGE_TAG) == 1 and question.startswith(IMAGE_TAG):
        question = question[len(IMAGE_TAG):].lstrip("\n")  # the usual leading placeholder: images first anyway
    answer = answer_of(reply)
    check_letter(question, answer)
    letter = ANSWER_RE.search(reply)
    reason = ANSWER_RE.sub("", reply).strip() if letter else ""
    return Sample(question=question.strip(), answer=answer, reason=reason, qtype=str(rec.get("question_type", "custom")),
                  bboxes=norm_boxes(rec.get("bboxes") or [], sizes[0]), image_path=paths[0], extra_images=paths[1:],
                  id=str(rec.get("id", "")), response="" if letter else reply.strip())


def records(path: str) -> list[tuple[str, object]]:
    """(where, record) of a JSON array file ("row N", from 0) or a JSONL file (line number); bytes that are
    not UTF-8 and malformed JSON are named with their line."""
    with open(benchmark_file(path), "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    for n, line in enumerate(lines, 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1})") from None
    text = raw.decode("utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        return [(f"row {i}", row) for i, row in enumerate(rows)]
    return [(str(n), line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def load_jsonl(path: str) -> list[Sample]:
    """Read LVR's SFT data (a JSON array or JSONL; LLaVA-style records) or RL rows (question, image,
    answer); a bad row raises ValueError naming the file and line (or row)."""
    base = os.path.dirname(os.path.abspath(path))
    return parse_rows(path, records(path), lambda row: from_record(json_object(row), base))


def parse_rows(path: str, rows, parse) -> list[Sample]:
    """parse(row) for each (line_or_row, row); a bad row raises ValueError naming the file and row."""
    samples = []
    for where, row in rows:
        try:
            samples.append(parse(row))
        except ValueError as e:
            raise ValueError(f"{path}:{where}: {e}") from None
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def benchmark_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    return path


def json_object(line) -> dict:
    """A JSONL line, or a JSON array's element, as a record (a dict); anything else is a ValueError."""
    try:
        row = json.loads(line) if isinstance(line, (str, bytes)) else line
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON: {e}") from None
    if not isinstance(row, dict):
        raise ValueError("row is not a JSON object")
    return row


class Stream:
    """The training questions in a fixed order given the seed: sample i of step s is index s*B+i."""

    def __init__(self, args):
        self.seed, self.rows, self.held, self.task = args.seed, None, None, getattr(args, "task", None) or DEFAULT_TASK
        if args.data and getattr(args, "val_fraction", None) is None:  # train_rl.py: every row trains
            self.rows = load_jsonl(args.data)
        elif args.data:  # a seeded share of the rows is held out: validation never sees a training row
            rows = load_jsonl(args.data)
            if len(rows) < 2:
                raise ValueError(f"{args.data}: need at least 2 rows (one is held out for validation)")
            order = np.random.default_rng([args.seed, 7]).permutation(len(rows))
            n_held = min(args.n_val, max(1, round(args.val_fraction * len(rows))), len(rows) - 1)
            self.held, self.rows = [rows[i] for i in order[:n_held]], [rows[i] for i in order[n_held:]]

    def __getitem__(self, index: int) -> Sample:
        if self.rows is None:
            return make_sample(self.seed, "train", index, task=self.task)
        epoch, i = divmod(index, len(self.rows))
        return self.rows[np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))[i]]

    def val(self, n: int) -> list[Sample]:
        return self.held[:n] if self.held is not None else make_split("val", n, self.seed, task=self.task)
