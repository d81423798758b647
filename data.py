"""Synthetic spatial-reasoning scenes, the chat prompt format, and LLaVA-style JSONL import/export.

Every sample is one procedurally drawn scene (coloured shapes on a dark background) with one
multiple-choice question about it, the answer letter, the question type and the normalised xyxy
bounding boxes of the objects the question is about (the LVR latent targets). Generation is a pure
function of (seed, split, index), so data order is reproducible and a resumed run sees the same data.
Splits never share a scene: each sample's scene is drawn from its own (seed, split, index) stream.

Question types (each answer value and each letter equally likely, so the text alone gives chance):
  position   where is X relative to Y (left / right / above / below)
  count      how many <colour> objects (1-4)
  attribute  what shape is the <colour> object / what colour is the <shape>
  size       which object is the largest / smallest (4 candidates)
  distance   which of two named objects is closer to X (CV-Bench's relative distance; one within NEAR
             of X, the other beyond FAR)

    python data.py --show 5                              # print a few training samples
    python data.py --export out/ --split val --n 200     # write out/val.jsonl + out/images/*.png
"""
from __future__ import annotations

import argparse
import base64
import binascii
import csv
import glob
import json
import math
import os
import re
import string
from dataclasses import dataclass, field

import numpy as np

COLOURS = {"red": (230, 50, 50), "green": (50, 190, 70), "blue": (60, 100, 240),
           "yellow": (235, 215, 50), "purple": (170, 70, 220)}
SHAPES = ("circle", "square", "triangle", "cross")
RELATIONS = ("left", "right", "above", "below")
QTYPES = ("position", "count", "attribute", "size", "distance")
LETTERS = "ABCD"  # the synthetic questions' letters; benchmarks may use more (OPTION_LETTERS)
OPTION_LETTERS = string.ascii_uppercase
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
BACKGROUND = 25
IMAGE_SIZE = 96
RADIUS = (5.0, 13.0)  # object half-size range in pixels at IMAGE_SIZE
NEAR, FAR = 0.3, 0.6  # distance questions: centre distances, in image widths, of the near and the far candidate


@dataclass
class Obj:
    colour: str
    shape: str
    cx: float
    cy: float
    r: float

    @property
    def name(self) -> str:
        return f"the {self.colour} {self.shape}"

    def bbox(self, size: int) -> list[float]:
        box = [(self.cx - self.r) / size, (self.cy - self.r) / size, (self.cx + self.r) / size, (self.cy + self.r) / size]
        return [round(min(1.0, max(0.0, v)), 4) for v in box]


@dataclass
class Sample:
    """One question. `image` is an HxWx3 uint8 array, or None when `image_path` points at a file."""
    question: str            # the question with its lettered options, as the model sees it
    answer: str              # the correct letter
    reason: str              # the text before the answer tag (here: a short rationale)
    qtype: str
    bboxes: list             # normalised [x0, y0, x1, y1] of the objects the question is about
    image: np.ndarray | None = None
    image_path: str | None = None
    id: str = ""
    objects: list = field(default_factory=list)
    extra_images: list = field(default_factory=list)  # more images (arrays or paths) after the first, e.g. BLINK
    choices: list = field(default_factory=list)       # the option texts, for benchmarks scored on them

    def load_image(self) -> np.ndarray:
        return self.load_images()[0]

    def load_images(self) -> list[np.ndarray]:
        return [read_image(x) for x in [self.image if self.image is not None else self.image_path, *self.extra_images]]


def read_image(x) -> np.ndarray:
    """An HxWx3 uint8 array from an array, a file path or encoded bytes (PNG/JPEG)."""
    if isinstance(x, np.ndarray):
        return x
    from PIL import Image  # only needed for images stored on disk
    import io
    if isinstance(x, (bytes, bytearray)):
        return np.asarray(Image.open(io.BytesIO(x)).convert("RGB"))
    if not os.path.exists(x):
        raise FileNotFoundError(f"image not found: {x}")
    return np.asarray(Image.open(x).convert("RGB"))


# ----------------------------------------------------------------------------------------- drawing
def render(objects: list[Obj], size: int = IMAGE_SIZE) -> np.ndarray:
    img = np.full((size, size, 3), BACKGROUND, dtype=np.uint8)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for o in objects:
        dx, dy = xs - o.cx, ys - o.cy
        if o.shape == "circle":
            mask = dx * dx + dy * dy <= o.r * o.r
        elif o.shape == "square":
            mask = (np.abs(dx) <= 0.85 * o.r) & (np.abs(dy) <= 0.85 * o.r)
        elif o.shape == "triangle":  # apex up, base at cy + r
            mask = (dy <= o.r) & (np.abs(dx) <= (dy + o.r) / 2)
        else:  # cross
            arm = max(1.5, o.r / 3)
            box = (np.abs(dx) <= o.r) & (np.abs(dy) <= o.r)
            mask = box & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
        img[mask] = COLOURS[o.colour]
    return img


def place(rng: np.random.Generator, specs: list[tuple[str, str, float]], size: int) -> list[Obj] | None:
    """Place (colour, shape, radius) objects at random non-overlapping spots; None if it fails."""
    objs: list[Obj] = []
    for colour, shape, r in specs:
        for _ in range(100):
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(math.hypot(cx - o.cx, cy - o.cy) > (r + o.r) * 1.15 + 2 for o in objs):
                objs.append(Obj(colour, shape, float(cx), float(cy), float(r)))
                break
        else:
            return None
    return objs


def radius(rng, size):
    return float(rng.uniform(*RADIUS)) * size / IMAGE_SIZE


def distinct_specs(rng, n: int, size: int, unique_shapes: bool = False):
    """n objects with distinct colours (so 'the red square' names one object)."""
    colours = rng.permutation(list(COLOURS))[:n]
    shapes = rng.permutation(SHAPES)[:n] if unique_shapes else rng.choice(SHAPES, size=n)
    return [(str(c), str(s), radius(rng, size)) for c, s in zip(colours, shapes)]


# --------------------------------------------------------------------------------------- questions
# Each generator returns (objects, question, options, answer option, objects asked about, reason).
# The reason is a short rationale: the colours of the objects the question names (copied from the
# question), then the answer in words, e.g. "yellow purple below" (distance: whether the first option is
# near or far, "red blue far"). Each word is one step for a tiny decoder; the letter then follows from
# the last word (options are listed in a fixed order).
def relation(a: Obj, b: Obj) -> str | None:
    """Where a is relative to b, only when one axis clearly dominates (else ambiguous: None)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= 2 * abs(dy) and abs(dx) >= a.r + b.r:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx) and abs(dy) >= a.r + b.r:
        return "above" if dy < 0 else "below"
    return None


def q_position(rng, size):
    want = RELATIONS[rng.integers(4)]
    objs = place(rng, distinct_specs(rng, int(rng.integers(2, 5)), size), size)
    if objs is None:
        return None
    pairs = [(a, b) for a in objs for b in objs if a is not b and relation(a, b) == want]
    if not pairs:
        return None
    a, b = pairs[rng.integers(len(pairs))]
    return objs, f"Where is {a.name} relative to {b.name}?", list(RELATIONS), want, [a, b], f"{a.colour} {b.colour} {want}"


def q_count(rng, size):
    n = int(rng.integers(1, 5))
    colours = list(rng.permutation(list(COLOURS)))
    target, others = colours[0], colours[1:]
    specs = [(target, str(rng.choice(SHAPES)), radius(rng, size)) for _ in range(n)]
    specs += [(str(rng.choice(others)), str(rng.choice(SHAPES)), radius(rng, size)) for _ in range(rng.integers(0, 3))]
    objs = place(rng, [specs[i] for i in rng.permutation(len(specs))], size)
    if objs is None:
        return None
    counted = [o for o in objs if o.colour == target]
    return objs, f"How many {target} objects are there?", ["1", "2", "3", "4"], str(n), counted, f"{target} {n}"


def q_attribute(rng, size):
    objs = place(rng, distinct_specs(rng, int(rng.integers(2, 5)), size, unique_shapes=True), size)
    if objs is None:
        return None
    o = objs[rng.integers(len(objs))]
    if rng.random() < 0.5:
        return objs, f"What shape is the {o.colour} object?", list(SHAPES), o.shape, [o], f"{o.colour} {o.shape}"
    return objs, f"What colour is the {o.shape}?", list(COLOURS), o.colour, [o], f"{o.shape} {o.colour}"


def q_size(rng, size):
    objs = place(rng, distinct_specs(rng, 4, size), size)
    if objs is None:
        return None
    largest = rng.random() < 0.5
    ranked = sorted(objs, key=lambda o: -o.r if largest else o.r)
    ratio = ranked[0].r / ranked[1].r if largest else ranked[1].r / ranked[0].r
    if ratio < 1.25:
        return None
    word = "largest" if largest else "smallest"
    return objs, f"Which object is the {word}?", [o.name for o in objs], ranked[0].name, objs, f"{word} {ranked[0].colour}"


def q_distance(rng, size):
    """Which of two objects is closer to a reference, as CV-Bench asks it. One candidate lies within NEAR
    of the reference and the other beyond FAR (image widths), so the reply can say of the first option
    alone whether it is near or far (a relation of two objects, like position's), and the letter follows
    from that word as it follows from position's relation word."""
    objs = place(rng, distinct_specs(rng, int(rng.integers(3, 6)), size), size)
    if objs is None:
        return None
    dist = lambda a, b: math.hypot(a.cx - b.cx, a.cy - b.cy) / size
    triples = [(r, n, f) for r in objs for n in objs for f in objs
               if len({id(r), id(n), id(f)}) == 3 and dist(r, n) <= NEAR and dist(r, f) >= FAR]
    if not triples:
        return None
    ref, near, far = triples[rng.integers(len(triples))]
    first, second = sorted([near, far], key=lambda o: option_rank(o.name))  # the order of the options
    question = f"Which is closer to {ref.name}: {first.name} or {second.name}?"
    reason = f"{ref.colour} {first.colour} {'near' if first is near else 'far'}"
    return objs, question, [first.name, second.name], near.name, [ref, first, second], reason


GENERATORS = {"position": q_position, "count": q_count, "attribute": q_attribute, "size": q_size, "distance": q_distance}


CANONICAL = {v: i for i, v in enumerate(RELATIONS + ("1", "2", "3", "4") + SHAPES + tuple(COLOURS))}


def option_rank(option: str) -> int:
    """Options are listed in a fixed order (relations, counts, shapes as listed above; colours and objects
    by colour). The answer is a uniformly random member of its option set, so letters stay balanced and
    the option set says nothing about the answer; the letter is then a simple function of the option."""
    return CANONICAL[option.split()[1] if option.startswith("the ") else option]


def format_question(question: str, options: list[str]) -> str:
    lines = [question] + [f"{OPTION_LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines + ["Answer with the option's letter."])


def make_sample(seed: int, split: str, index: int, qtypes=QTYPES, size: int = IMAGE_SIZE) -> Sample:
    """The sample at `index` of `split`: a pure function of its arguments."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLIT_IDS)}")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    qtype = qtypes[index % len(qtypes)]
    while (made := GENERATORS[qtype](rng, size)) is None:
        pass
    objs, question, options, answer, about, reason = made
    if len(options) > 4:  # keep the answer and three random distractors
        others = [o for o in options if o != answer]
        options = [answer] + [others[i] for i in rng.permutation(len(others))[:3]]
    options = sorted(options, key=option_rank)
    return Sample(question=format_question(question, options), answer=LETTERS[options.index(answer)], reason=reason,
                  qtype=qtype,
                  bboxes=[o.bbox(size) for o in about], image=render(objs, size),
                  id=f"{split}-{seed}-{index}", objects=objs)


def make_split(split: str, n: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[Sample]:
    return [make_sample(seed, split, i, size=size) for i in range(n)]


# ------------------------------------------------------------------------------------ chat format
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
LVR_START, LVR, LVR_LATENT_END, LVR_END = "<|lvr_start|>", "<|lvr|>", "<|lvr_latent_end|>", "<|lvr_end|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chat_prompt(question: str, n_image_tokens) -> str:
    """The Qwen chat turn with the image placeholders (one block per image; `n_image_tokens` an int or
    a list) already expanded, ending where the reply starts."""
    counts = [n_image_tokens] if isinstance(n_image_tokens, int) else n_image_tokens
    images = "".join(VISION_START + IMAGE_PAD * n + VISION_END for n in counts)
    return f"{IM_START}user\n{images}{question}{IM_END}\n{IM_START}assistant\n"


def chat_response(answer: str, reason: str = "", latent_slots: int = 0) -> str:
    """The target reply: an optional latent span of `latent_slots` slots, the reason, the tagged answer."""
    span = LVR_START + LVR * latent_slots + LVR_END if latent_slots > 0 else ""
    return f"{span}{reason + ' ' if reason else ''}<answer>{answer}</answer>{IM_END}"


def vocabulary() -> list[str]:
    """Every word the generator can write (the small-vl tokenizer's vocabulary)."""
    words = set(LETTERS) | set(COLOURS) | set(SHAPES) | set(RELATIONS) | {"1", "2", "3", "4"}
    words |= set("Where is the relative to How many objects are there What shape object colour Which "
                 "largest smallest closer to or near far Answer with option s letter user assistant".split())
    return sorted(words) + [".", "?", "'", ",", ":"]


# ----------------------------------------------------------------------------- LLaVA-style JSONL
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


def from_record(rec: dict, base_dir: str) -> Sample:
    """One JSONL row -> Sample; raises ValueError naming the bad field."""
    for key in ("image", "conversations", "bboxes"):
        if key not in rec:
            raise ValueError(f"missing field {key!r}")
    conv = rec["conversations"]
    if not (isinstance(conv, list) and len(conv) >= 2 and all(isinstance(t, dict) and "value" in t for t in conv[:2])):
        raise ValueError("field 'conversations' must hold a human turn and a gpt turn with 'value'")
    match = ANSWER_RE.search(str(conv[1]["value"]))
    if match is None:
        raise ValueError(f"gpt turn has no answer letter: {conv[1]['value']!r}")
    boxes = rec["bboxes"]
    ok = isinstance(boxes, list) and boxes and all(
        isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in b)
        and b[0] < b[2] and b[1] < b[3] for b in boxes)
    if not ok:
        raise ValueError(f"field 'bboxes' must be a non-empty list of normalised [x0, y0, x1, y1]: {boxes!r}")
    question = str(conv[0]["value"]).replace("<image>", "").strip()
    reason = ANSWER_RE.sub("", str(conv[1]["value"])).strip()
    return Sample(question=question, answer=match.group(1) or match.group(2), reason=reason, qtype=str(rec.get("question_type", "custom")),
                  bboxes=[[float(v) for v in b] for b in boxes], image_path=os.path.join(base_dir, str(rec["image"])),
                  id=str(rec.get("id", "")))


def load_jsonl(path: str) -> list[Sample]:
    """Read a LLaVA-style JSONL file; a bad row raises ValueError naming the file and line."""
    base = os.path.dirname(os.path.abspath(path))

    def parse(line):
        s = from_record(json_object(line), base)
        image_file(s.image_path)
        return s
    return parse_rows(path, jsonl_lines(path), parse)


# ------------------------------------------------------------------------------- real benchmarks
# Public multiple-choice benchmarks in their released layouts. Every loader returns Samples whose question
# lists lettered options, whose answer is the letter and whose qtype is the category / sub-task; images
# stay lazy (paths or encoded bytes, decoded by Sample.load_images). A bad row raises
# ValueError("<file>:<line or row>: <problem>"); a missing file or directory raises FileNotFoundError.
def answer_letter(answer, n_options: int) -> str:
    """'(A)', '(a)', 'a' or 'A' -> 'A'; anything but one of the first n_options letters is an error."""
    letter = str(answer).strip().strip("()").strip().upper()
    if len(letter) != 1 or letter not in OPTION_LETTERS[:n_options]:
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


def image_file(path: str) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"image not found: {path}")
    return path


def mc_sample(sid: str, qtype, question, options, answer, images: list) -> Sample:
    if not isinstance(options, (list, tuple)) or len(options) < 2:
        raise ValueError(f"need a list of at least 2 options, got {options!r}")
    options = [str(o).strip() for o in options]
    # image_path may hold encoded bytes (BLINK, TSV): read_image decodes paths and bytes alike.
    return Sample(question=format_question(str(question).strip(), options), answer=answer_letter(answer, len(options)),
                  reason="", qtype=str(qtype), bboxes=[], image_path=images[0], id=sid,
                  extra_images=list(images[1:]), choices=options)


def split_options(text: str, field: str) -> tuple[str, list[str]]:
    """'Q? (a) x (b) y' or 'Q?\n(A) x\n(B) y\nAnswer with ...' -> ('Q?', ['x', 'y']); letters must run A, B, ..."""
    parts = re.split(r"(?:^|\s)\(([A-Za-z])\)\s*", text.strip())
    letters, options = "".join(parts[1::2]).upper(), [p.strip() for p in parts[2::2]]
    options[-1:] = [o.split("\n")[0].strip() for o in options[-1:]]  # drop an instruction after the last option
    if len(options) < 2 or letters != OPTION_LETTERS[:len(letters)] or not all(options):
        raise ValueError(f"malformed field {field!r}: no options '(A) ...', '(B) ...' in {text!r}")
    return parts[0].strip(), options


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


def jsonl_lines(path: str) -> list[tuple[int, str]]:
    with open(benchmark_file(path)) as f:
        return [(n, line) for n, line in enumerate(f, 1) if line.strip()]


def json_object(line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON: {e}") from None
    if not isinstance(row, dict):
        raise ValueError("row is not a JSON object")
    return row


def csv_rows(path: str, columns: tuple, delimiter: str = ",") -> list[tuple[int, dict]]:
    """(line number, row) for each record of a CSV/TSV file whose header must name `columns`."""
    csv.field_size_limit(2**31 - 1)  # VLMEvalKit TSVs hold whole base64 images in one field
    with open(benchmark_file(path), newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}:1: missing column {missing[0]!r}")
        return [(reader.line_num, row) for row in reader]


def load_blink(root: str, split: str = "val") -> list[Sample]:
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
        samples += parse_rows(path, enumerate(table.to_pylist()), lambda row: parse(row, task))
    return samples


def load_cvbench(root: str) -> list[Sample]:
    """CV-Bench: root/test.jsonl, images under root/img/; qtype is the row's task (Count, Depth, ...)."""
    path = os.path.join(root, "test.jsonl")

    def parse(line):
        row = json_object(line)
        image = image_file(os.path.join(root, str(need(row, "image"))))
        return mc_sample(f"cvbench-{need(row, 'idx')}", need(row, "task"), need(row, "question"),
                         need(row, "choices"), need(row, "answer"), [image])
    return parse_rows(path, jsonl_lines(path), parse)


def load_mmvp(root: str) -> list[Sample]:
    """MMVP: root/Questions.csv ("(a) Open (b) Closed" options), images at root/MMVP Images/<Index>.jpg."""
    path = os.path.join(root, "Questions.csv")

    def parse(row):
        index = str(need(row, "Index")).strip()
        if not re.fullmatch(r"[1-9]\d*", index):
            raise ValueError(f"field 'Index' must be a positive integer, got {index!r}")
        head, options = split_options(str(need(row, "Options")), "Options")
        if head:
            raise ValueError(f"malformed field 'Options': text before '(a)': {head!r}")
        image = image_file(os.path.join(root, "MMVP Images", f"{index}.jpg"))
        return mc_sample(f"mmvp-{index}", "mmvp", need(row, "Question"), options, need(row, "Correct Answer"), [image])
    return parse_rows(path, csv_rows(path, ("Index", "Question", "Options", "Correct Answer")), parse)


def mmvp_pair_accuracy(ids_correct: dict[str, bool]) -> float:
    """MMVP's pair accuracy: pair k (ids mmvp-<2k-1> and mmvp-<2k>) counts only if both answers are right."""
    pairs: dict[int, list[bool]] = {}
    for sid, ok in ids_correct.items():
        m = re.fullmatch(r"mmvp-([1-9]\d*)", sid)
        if m is None:
            raise ValueError(f"not an MMVP question id: {sid!r}")
        pairs.setdefault((int(m.group(1)) + 1) // 2, []).append(bool(ok))
    if not pairs:
        raise ValueError("no MMVP answers to score")
    for k in sorted(pairs):
        if len(pairs[k]) != 2:
            raise ValueError(f"MMVP pair {k} needs both mmvp-{2 * k - 1} and mmvp-{2 * k}")
    return sum(all(v) for v in pairs.values()) / len(pairs)


def load_vstar(root: str) -> list[Sample]:
    """V* Bench: root/test_questions.jsonl; the options are '(A) ...' inside the question text."""
    path = os.path.join(root, "test_questions.jsonl")

    def parse(line):
        row = json_object(line)
        question, options = split_options(str(need(row, "text")), "text")
        if not question:
            raise ValueError("field 'text' has no question before its options")
        image = image_file(os.path.join(root, str(need(row, "image"))))
        return mc_sample(f"vstar-{need(row, 'question_id')}", need(row, "category"), question, options,
                         need(row, "label"), [image])
    return parse_rows(path, jsonl_lines(path), parse)


def load_vlmevalkit_tsv(path: str) -> list[Sample]:
    """A VLMEvalKit TSV (MMBench, MMStar, ...): base64 `image`, option columns A, B, ..., `answer`, optional
    `category` and `hint`. An `image` field holding another row's index reuses that row's image."""
    rows = csv_rows(path, ("index", "image", "question", "answer"), delimiter="\t")
    name = os.path.splitext(os.path.basename(path))[0]
    by_index = {row["index"]: row["image"] for _, row in rows if len(row.get("image") or "") > 64}

    def parse(row):
        image = str(need(row, "image"))
        image = by_index.get(image, image) if len(image) <= 64 else image
        try:
            image = base64.b64decode(image, validate=True)
        except binascii.Error:
            raise ValueError("field 'image' is not a base64 image") from None
        letters = [c for c in OPTION_LETTERS if not blank(row.get(c))]
        if "".join(letters) != OPTION_LETTERS[:len(letters)]:
            raise ValueError(f"options must fill columns A, B, ... without gaps, got {letters}")
        question = str(need(row, "question")).strip()
        if not blank(row.get("hint")):
            question = f"Hint: {row['hint'].strip()}\n{question}"
        return mc_sample(f"{name}-{need(row, 'index')}", row.get("category") or name, question,
                         [row[c] for c in letters], need(row, "answer"), [image])
    return parse_rows(path, rows, parse)


BENCHMARKS = {"blink": load_blink, "cvbench": load_cvbench, "mmvp": load_mmvp, "vstar": load_vstar,
              "tsv": load_vlmevalkit_tsv}


def load_benchmark(name: str, root: str) -> list[Sample]:
    """Load benchmark `name` from `root` (a directory; for "tsv", the .tsv file)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARKS)}")
    return BENCHMARKS[name](root)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="train", choices=list(SPLIT_IDS), help="which split to draw from")
    p.add_argument("--n", type=int, default=100, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--show", type=int, default=0, help="print this many samples and exit")
    p.add_argument("--export", metavar="DIR", help="write DIR/<split>.jsonl and DIR/images/")
    a = p.parse_args()
    if a.show:
        for s in make_split(a.split, a.show, a.seed):
            print(f"[{s.qtype}] {s.question}\n  -> {s.answer}   bboxes={s.bboxes}\n")
    if a.export:
        print("wrote", export_jsonl(make_split(a.split, a.n, a.seed), a.export, a.split))


if __name__ == "__main__":
    main()
