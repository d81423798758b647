"""Synthetic spatial-reasoning scenes and the chat prompt format.

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

Those five are the `easy` task (`--task easy`; today's stage-1 models master it, so RL has nothing to move). The
`hard` task (`--task hard`, the scripts' default) gives the latents and RL room: clutter (up to 12 objects, colours repeat) and
questions that need more than one look. Each answer value is drawn first, uniformly, and the scene is
then built around it (so each value is exactly equally likely per type, whatever the retries):
  count      how many <colour> objects (1-8), among 6-12 objects; options: the answer and 3 other counts
  nearest    what colour / shape is the object nearest to the <colour> <shape> (two hops: find the named
             object, then its nearest neighbour, at most 0.75 of the next one's distance)
  relation   what colour / shape is the object left of / right of / above / below the <colour> <shape>
             (two hops; the only object clearly on that side, none other even roughly there)
  search     what shape is the <colour> object / what colour is the <shape>: one small object (about half
             the clutter's size) among 4-7 of other colours or shapes (V*-like search)
The two-hop scenes hold 5-8 objects. Sizes and counts were chosen by measurement (results/hard/README.md):
smaller or more objects left the shape questions at chance for the text-only model.

    python data.py --show 5                              # print a few training samples
    python data.py --show 8 --task hard                  # the hard task's
    python data.py --export out/ --split val --n 200     # write out/val.jsonl + out/images/*.png
    python data.py --check lvr_sft.json                  # read LVR's SFT data (or RL rows) and report

LVR / LLaVA-format data files (reading, checking, exporting) and the training-question stream are
datafiles.py's; real benchmarks (VLMEvalKit TSV, MMVP, V*, CV-Bench, BLINK) are benchmarks.py's.
"""
from __future__ import annotations

import argparse
import math
import os
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
HARD_RADIUS, SMALL_RADIUS = (6.0, 10.0), (4.0, 5.0)  # the hard task's clutter and its search targets
TWO_HOP_OBJECTS, SEARCH_OBJECTS = (5, 8), (5, 8)  # objects in the scene of a two-hop / search question
DEFAULT_TASK = "hard"  # the scripts' task when neither --task nor a checkpoint (its config.json) says one
COUNTS = tuple(str(n) for n in range(1, 9))  # the hard task's count answers (easy: 1-4)
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
    precision: int | None = None  # free-form numeric answers: decimals that count (MathVista)
    response: str = ""       # a free-form target reply as given (LVR data), `<lvr>` marking the latent span

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


# ---------------------------------------------------------------------------------- the hard task
# Each generator draws its answer first (uniformly), then retries scenes until one fits that answer, so
# retries never skew the answers. Reasons name the objects in the order the question visits them: the
# named object's colour and shape, then the answer ("red cross blue"); the boxes follow the same order.
def scatter(rng, radii: list[float], size: int) -> list[Obj]:
    """Objects of these radii at non-overlapping random spots (attributes set by the caller)."""
    while (objs := place(rng, [("red", "circle", r) for r in radii], size)) is None:
        pass
    return objs


def clutter_radius(rng, size, lo_hi=HARD_RADIUS):
    return float(rng.uniform(*lo_hi)) * size / IMAGE_SIZE


def paint(rng, o: Obj, avoid: tuple[str, str] | None = None, colour: str | None = None, shape: str | None = None):
    """Give o a colour and a shape (the given ones, else random), never the pair `avoid`: the named object
    stays the only one of its kind."""
    o.colour = colour or str(rng.choice(list(COLOURS)))
    o.shape = shape or str(rng.choice(SHAPES))
    if avoid and (o.colour, o.shape) == avoid:
        if shape is None:
            o.shape = str(rng.choice([s for s in SHAPES if s != avoid[1]]))
        else:
            o.colour = str(rng.choice([c for c in COLOURS if c != avoid[0]]))


def h_count(rng, size):
    n = int(rng.integers(1, len(COUNTS) + 1))
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    target, others = colours[0], colours[1:]
    objs = scatter(rng, [clutter_radius(rng, size) for _ in range(int(rng.integers(max(6, n), 13)))], size)
    counted = set(rng.permutation(len(objs))[:n].tolist())
    for i, o in enumerate(objs):
        paint(rng, o, colour=target if i in counted else str(rng.choice(others)))
    about = sorted((o for i, o in enumerate(objs) if i in counted), key=lambda o: (o.cy, o.cx))  # raster order
    return objs, f"How many {target} objects are there?", list(COUNTS), str(n), about, f"{target} {n}"


def ask_attribute(rng):
    """('colour' | 'shape', the answer value), the value uniform over its set."""
    ask = "colour" if rng.random() < 0.5 else "shape"
    values = list(COLOURS) if ask == "colour" else list(SHAPES)
    return ask, values[rng.integers(len(values))], values


def two_hop(rng, size, find) -> tuple:
    """Scenes of TWO_HOP_OBJECTS objects until `find(objs)` gives (reference, target); then the reference
    gets a random colour and shape that no other object shares, the target the drawn answer."""
    ask, value, values = ask_attribute(rng)
    ref_kind = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
    n = int(rng.integers(TWO_HOP_OBJECTS[0], TWO_HOP_OBJECTS[1] + 1))
    while (found := find(objs := scatter(rng, [clutter_radius(rng, size) for _ in range(n)], size))) is None:
        pass
    ref, target = found
    for o in objs:
        if o is ref:
            o.colour, o.shape = ref_kind
        else:
            paint(rng, o, ref_kind, **({ask: value} if o is target else {}))
    return objs, ask, value, values, ref, target


def attribute_question(ask: str, phrase: str) -> str:
    return f"What {ask} is the object {phrase}?"


def nearest_of(ref: Obj, objs: list[Obj]) -> Obj | None:
    """The object nearest to ref, when it is clearly so (by centres with a margin, and by edges); else None."""
    d = sorted((math.hypot(o.cx - ref.cx, o.cy - ref.cy), o.r, i, o) for i, o in enumerate(objs) if o is not ref)
    if len(d) < 2:
        return d[0][3] if d else None
    (d0, r0, _, near), (d1, r1, _, _) = d[0], d[1]
    return near if d0 <= 0.75 * d1 and d0 - r0 < d1 - r1 else None


def h_nearest(rng, size):
    def find(objs):
        refs = [(ref, near) for ref in objs if (near := nearest_of(ref, objs)) is not None]
        return refs[rng.integers(len(refs))] if refs else None
    objs, ask, value, values, ref, target = two_hop(rng, size, find)
    question = attribute_question(ask, f"nearest to {ref.name}")
    return objs, question, values, value, [ref, target], f"{ref.colour} {ref.shape} {value}"


def roughly(a: Obj, b: Obj, rel: str) -> bool:
    """a lies on the `rel` side of b within 45 degrees (a looser test than relation())."""
    along, across = {"left": (b.cx - a.cx, a.cy - b.cy), "right": (a.cx - b.cx, a.cy - b.cy),
                     "above": (b.cy - a.cy, a.cx - b.cx), "below": (a.cy - b.cy, a.cx - b.cx)}[rel]
    return along > 0 and along >= abs(across)


def h_relation(rng, size):
    rel = RELATIONS[rng.integers(4)]

    def find(objs):
        refs = []
        for ref in objs:
            side = [o for o in objs if o is not ref and roughly(o, ref, rel)]
            if len(side) == 1 and relation(side[0], ref) == rel:  # the only one there, and clearly there
                refs.append((ref, side[0]))
        return refs[rng.integers(len(refs))] if refs else None
    objs, ask, value, values, ref, target = two_hop(rng, size, find)
    question = attribute_question(ask, f"{rel}{' of' if rel in ('left', 'right') else ''} {ref.name}")
    return objs, question, values, value, [ref, target], f"{ref.colour} {ref.shape} {value}"


def h_search(rng, size):
    ask, value, values = ask_attribute(rng)
    key = str(rng.choice(SHAPES if ask == "colour" else list(COLOURS)))  # what the question names
    small = Obj("", "", 0, 0, clutter_radius(rng, size, SMALL_RADIUS))
    others = int(rng.integers(SEARCH_OBJECTS[0] - 1, SEARCH_OBJECTS[1]))
    objs = scatter(rng, [small.r] + [clutter_radius(rng, size) for _ in range(others)], size)
    target = objs[0]
    for o in objs[1:]:  # the others never match what the question names
        if ask == "shape":
            paint(rng, o, colour=str(rng.choice([c for c in COLOURS if c != key])))
        else:
            paint(rng, o, shape=str(rng.choice([s for s in SHAPES if s != key])))
    if ask == "shape":
        target.colour, target.shape = key, value
        return objs, f"What shape is the {key} object?", values, value, [target], f"{key} {value}"
    target.colour, target.shape = value, key
    return objs, f"What colour is the {key}?", values, value, [target], f"{key} {value}"


HARD_GENERATORS = {"count": h_count, "nearest": h_nearest, "relation": h_relation, "search": h_search}
TASKS = {"easy": GENERATORS, "hard": HARD_GENERATORS}
ALL_QTYPES = QTYPES + tuple(t for t in HARD_GENERATORS if t not in QTYPES)  # the order tables list types in


def qtypes_of(task: str) -> tuple[str, ...]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    return tuple(TASKS[task])


CANONICAL = {v: i for i, v in enumerate(RELATIONS + ("1", "2", "3", "4") + SHAPES + tuple(COLOURS) + COUNTS[4:])}


def option_rank(option: str) -> int:
    """Options are listed in a fixed order (relations, counts, shapes as listed above; colours and objects
    by colour). The answer is a uniformly random member of its option set, so letters stay balanced and
    the option set says nothing about the answer; the letter is then a simple function of the option."""
    return CANONICAL[option.split()[1] if option.startswith("the ") else option]


def format_question(question: str, options: list[str]) -> str:
    lines = [question] + [f"{OPTION_LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines + ["Answer with the option's letter."])


def options_of(question: str) -> list[str]:
    """The option texts of a formatted question, in letter order."""
    return [line[3:] for line in question.splitlines()[1:] if line[1:3] == ". " and line[0] in OPTION_LETTERS]


def make_sample(seed: int, split: str, index: int, qtypes=None, size: int = IMAGE_SIZE, task: str = "easy") -> Sample:
    """The sample at `index` of `split` of `task`: a pure function of its arguments."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLIT_IDS)}")
    qtypes = qtypes or qtypes_of(task)
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    qtype = qtypes[index % len(qtypes)]
    while (made := TASKS[task][qtype](rng, size)) is None:
        pass
    objs, question, options, answer, about, reason = made
    if len(options) > 4:  # keep the answer and three random distractors
        others = [o for o in options if o != answer]
        options = [answer] + [others[i] for i in rng.permutation(len(others))[:3]]
    options = sorted(options, key=option_rank)
    return Sample(question=format_question(question, options), answer=LETTERS[options.index(answer)], reason=reason,
                  qtype=qtype,
                  bboxes=[o.bbox(size) for o in about], image=render(objs, size),
                  id=f"{'' if task == 'easy' else task + '-'}{split}-{seed}-{index}", objects=objs)


def make_split(split: str, n: int, seed: int = 0, size: int = IMAGE_SIZE, task: str = "easy") -> list[Sample]:
    return [make_sample(seed, split, i, size=size, task=task) for i in range(n)]


# ------------------------------------------------------------------------------------ chat format
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
LVR_START, LVR, LVR_LATENT_END, LVR_END = "<|lvr_start|>", "<|lvr|>", "<|lvr_latent_end|>", "<|lvr_end|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMAGE_TAG, LVR_TAG = "<image>", "<lvr>"  # placeholders of LLaVA / LVR data: an image, the latent span


def chat_prompt(question: str, n_image_tokens) -> str:
    """small-vl's chat turn (no system message) with the image placeholders (one block per image;
    `n_image_tokens` an int or a list) expanded where the question's `<image>`s are (none: first),
    ending where the reply starts. Real checkpoints use their own template (model.prompt_text)."""
    counts = [n_image_tokens] if isinstance(n_image_tokens, int) else n_image_tokens
    blocks = [VISION_START + IMAGE_PAD * n + VISION_END for n in counts]
    parts = question.split(IMAGE_TAG)
    if len(parts) == 1:
        body = "".join(blocks) + question
    elif len(parts) == len(blocks) + 1:
        body = parts[0] + "".join(b + p for b, p in zip(blocks, parts[1:]))
    else:
        raise ValueError(f"question has {len(parts) - 1} <image> placeholders for {len(blocks)} images")
    return f"{IM_START}user\n{body}{IM_END}\n{IM_START}assistant\n"


def chat_response(answer: str, reason: str = "", latent_slots: int = 0, response: str = "") -> str:
    """The target reply: an optional latent span of `latent_slots` slots, the reason, the tagged answer;
    or a free-form `response` as given, its `<lvr>` replaced by the span (by nothing without one; a span
    without a placeholder goes first)."""
    span = LVR_START + LVR * latent_slots + LVR_END if latent_slots > 0 else ""
    if response:
        text = response.replace(LVR_TAG, span, 1) if LVR_TAG in response else span + response
        return text.replace(LVR_TAG, "").strip() + IM_END
    return f"{span}{reason + ' ' if reason else ''}<answer>{answer}</answer>{IM_END}"


HARD_WORDS = [*COUNTS[4:], "nearest", "of"]  # the hard task's words beyond the easy task's


def vocabulary(task: str = "easy") -> list[str]:
    """Every word the generator can write (the small-vl tokenizer's vocabulary). The hard task's extra
    words come last, so an easy-task tokenizer is a prefix of the hard one (same ids)."""
    words = set(LETTERS) | set(COLOURS) | set(SHAPES) | set(RELATIONS) | {"1", "2", "3", "4"}
    words |= set("Where is the relative to How many objects are there What shape object colour Which "
                 "largest smallest closer to or near far Answer with option s letter user assistant".split())
    qtypes_of(task)  # an unknown task is an error
    return sorted(words) + [".", "?", "'", ",", ":"] + (HARD_WORDS if task == "hard" else [])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="train", choices=list(SPLIT_IDS), help="which split to draw from")
    p.add_argument("--n", type=int, default=100, help="number of samples")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--task", default=DEFAULT_TASK, choices=list(TASKS), help="question mix (module docstring)")
    p.add_argument("--show", type=int, default=0, help="print this many samples and exit")
    p.add_argument("--export", metavar="DIR", help="write DIR/<split>.jsonl and DIR/images/")
    p.add_argument("--check", metavar="FILE", help="read LVR-format data (JSON array or JSONL) and report what it holds")
    a = p.parse_args()
    import datafiles  # the file formats (datafiles.py imports this module)
    if a.check:
        try:
            rows = datafiles.load_jsonl(a.check)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
        boxed = sum(bool(s.bboxes) for s in rows)
        print(f"{a.check}: {len(rows)} samples, {boxed} with boxes, {sum(bool(s.response) for s in rows)} free-form replies")
    if a.show:
        for s in make_split(a.split, a.show, a.seed, task=a.task):
            print(f"[{s.qtype}] {s.question}\n  -> {s.answer}   bboxes={s.bboxes}\n")
    if a.export:
        print("wrote", datafiles.export_jsonl(make_split(a.split, a.n, a.seed, task=a.task), a.export, a.split))


if __name__ == "__main__":
    main()
