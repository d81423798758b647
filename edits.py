"""Counterfactual edit pairs (ReaLVR's protocol, single-turn) of the synthetic questions, both tasks.

A pair is the same question about a scene and about the scene after one edit (recolour, remove or reshape one
object, swap two objects' places; mirror when nothing else is valid). `solve` works out a question's right
answer from the objects, so a pair knows whether its answer changes; eval.py's `edit` arms score the pairs
(edited-view accuracy, strict paired correct flip, false flip).

    python -c "import data, edits; print(edits.counterfactual(data.make_sample(0, 'test', 0), 0))"
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

import data

# ReaLVR's protocol, single-turn: the same question about a scene and about the scene after one edit. The
# right answer of the edited view is worked out from its objects by `solve` (which also re-derives every
# generated question's own answer: tests/test_pairs.py), so a pair knows whether its answer changes.
EDITS = ("colour", "remove", "shape", "swap", "mirror")  # mirror: the fallback when no other edit is valid


@dataclass
class Edit:
    kind: str             # one of EDITS
    objects: list         # indices (in the original scene) of the objects it touches; mirror: all
    value: str = ""       # colour / shape: the new value; mirror: "x" (left-right) or "y" (up-down)


@dataclass
class Pair:
    original: data.Sample
    edited: data.Sample        # same question and options; its own image, answer and boxes
    edit: Edit
    changes: bool         # the right answer differs between the two views


QUESTION_RES = {
    "position": re.compile(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?"),
    "count": re.compile(r"How many (\w+) objects are there\?"),
    "shape": re.compile(r"What shape is the (\w+) object\?"),
    "colour": re.compile(r"What colour is the (\w+)\?"),
    "size": re.compile(r"Which object is the (largest|smallest)\?"),
    "distance": re.compile(r"Which is closer to the (\w+) (\w+): the (\w+) (\w+) or the (\w+) (\w+)\?"),
    "nearest": re.compile(r"What (colour|shape) is the object nearest to the (\w+) (\w+)\?"),  # the hard task's
    "relation": re.compile(r"What (colour|shape) is the object (left of|right of|above|below) the (\w+) (\w+)\?"),
}


def valid_scene(objs: list[data.Obj], size: int) -> bool:
    """Every object inside the image and apart from the others, as `data.place` puts them."""
    inside = all(o.r + 1 <= c <= size - o.r - 1 for o in objs for c in (o.cx, o.cy))
    apart = all(math.hypot(a.cx - b.cx, a.cy - b.cy) > (a.r + b.r) * 1.15 + 2 for i, a in enumerate(objs) for b in objs[i + 1:])
    return inside and apart


def solve(question: str, objs: list[data.Obj], size: int = data.IMAGE_SIZE) -> tuple[str, list[data.Obj]] | None:
    """(the right option's text, the objects the question is about) of a synthetic question about a scene,
    or None when the question is ill-posed there (a named object missing or not unique, an ambiguous
    data.relation or size order, a distance pair no longer near / far, or the answer not among the options)."""
    first, options = question.splitlines()[0], data.options_of(question)
    named = lambda c, s: [o for o in objs if o.colour == c and o.shape == s]  # noqa: E731
    one = lambda c, s: named(c, s)[0] if len(named(c, s)) == 1 else None  # noqa: E731
    out = None
    if m := QUESTION_RES["position"].fullmatch(first):
        a, b = one(*m.group(1, 2)), one(*m.group(3, 4))
        rel = data.relation(a, b) if a and b else None
        out = (rel, [a, b]) if rel else None
    elif m := QUESTION_RES["count"].fullmatch(first):
        counted = [o for o in objs if o.colour == m.group(1)]
        out = (str(len(counted)), counted) if counted else None
    elif m := QUESTION_RES["shape"].fullmatch(first):
        found = [o for o in objs if o.colour == m.group(1)]
        out = (found[0].shape, found) if len(found) == 1 else None
    elif m := QUESTION_RES["colour"].fullmatch(first):
        found = [o for o in objs if o.shape == m.group(1)]
        out = (found[0].colour, found) if len(found) == 1 else None
    elif m := QUESTION_RES["size"].fullmatch(first):
        largest = m.group(1) == "largest"
        ranked = sorted(objs, key=lambda o: -o.r if largest else o.r)
        unique = all(len([o for o in objs if o.name == opt]) == 1 for opt in options)
        if unique and len(ranked) >= 2:
            ratio = ranked[0].r / ranked[1].r if largest else ranked[1].r / ranked[0].r
            out = (ranked[0].name, list(objs)) if ratio >= 1.25 else None
    elif m := QUESTION_RES["distance"].fullmatch(first):
        ref, x, y = one(*m.group(1, 2)), one(*m.group(3, 4)), one(*m.group(5, 6))
        if ref and x and y:
            d = lambda o: math.hypot(o.cx - ref.cx, o.cy - ref.cy) / size  # noqa: E731
            near, far = (x, y) if d(x) <= d(y) else (y, x)
            out = (near.name, [ref, x, y]) if d(near) <= data.NEAR and d(far) >= data.FAR else None
    elif m := QUESTION_RES["nearest"].fullmatch(first):
        ref = one(*m.group(2, 3))
        near = data.nearest_of(ref, objs) if ref else None
        out = (getattr(near, m.group(1)), [ref, near]) if near else None
    elif m := QUESTION_RES["relation"].fullmatch(first):
        ref, rel = one(*m.group(3, 4)), m.group(2).split()[0]
        side = [o for o in objs if ref and o is not ref and data.roughly(o, ref, rel)]
        out = (getattr(side[0], m.group(1)), [ref, side[0]]) if len(side) == 1 and data.relation(side[0], ref) == rel else None
    else:
        raise ValueError(f"not a synthetic question: {first!r}")
    return out if out is not None and out[0] in options else None


def apply_edit(objs: list[data.Obj], edit: Edit, size: int = data.IMAGE_SIZE) -> list[data.Obj]:
    """The scene after `edit` (new objects; the input is not changed)."""
    out = [data.Obj(o.colour, o.shape, o.cx, o.cy, o.r) for o in objs]
    i = edit.objects[0] if edit.objects else None
    if edit.kind == "colour":
        out[i].colour = edit.value
    elif edit.kind == "shape":
        out[i].shape = edit.value
    elif edit.kind == "remove":
        del out[i]
    elif edit.kind == "swap":
        a, b = (out[j] for j in edit.objects)
        a.cx, a.cy, b.cx, b.cy = b.cx, b.cy, a.cx, a.cy
    elif edit.kind == "mirror":
        for o in out:
            if edit.value == "x":
                o.cx = size - o.cx
            else:
                o.cy = size - o.cy
    else:
        raise ValueError(f"unknown edit {edit.kind!r}; expected one of {EDITS}")
    return out


def candidate_edits(objs: list[data.Obj]) -> list[Edit]:
    """Every single edit of a scene: recolour or reshape one object, remove one, swap two objects' places."""
    out = [Edit("colour", [i], c) for i, o in enumerate(objs) for c in data.COLOURS if c != o.colour]
    out += [Edit("shape", [i], s) for i, o in enumerate(objs) for s in data.SHAPES if s != o.shape]
    out += [Edit("remove", [i]) for i in range(len(objs))] if len(objs) > 1 else []
    out += [Edit("swap", [i, j]) for i in range(len(objs)) for j in range(i + 1, len(objs))]
    return out


def counterfactual(sample: data.Sample, index: int, seed: int = 0) -> Pair:
    """The edit pair of a synthetic question (`index`: its data.place in the evaluated list). Even cycles of the
    question types ask for an edit that changes the right answer, odd ones for one that keeps it (size
    questions always keep it: every edit that could change the largest object renames or removes an
    option). Among the valid edits of the wanted kind an edit type is drawn, then one of its edits; with
    none, one of the other kind; with none at all, the scene mirrored (left-right or up-down)."""
    size = sample.image.shape[0]
    rng = np.random.default_rng([seed, 5, index])
    want = (index // len(data.QTYPES)) % 2 == 0
    right = data.options_of(sample.question)[data.LETTERS.index(sample.answer)]
    found = {True: {}, False: {}}
    for e in candidate_edits(sample.objects) + [Edit("mirror", list(range(len(sample.objects))), v) for v in "xy"]:
        objs = apply_edit(sample.objects, e, size)
        got = solve(sample.question, objs, size) if valid_scene(objs, size) else None
        if got is not None:
            found[got[0] != right].setdefault(e.kind, []).append((e, objs, got))
    pool = None
    for change in (want, not want):
        kinds = sorted(k for k in found[change] if k != "mirror")
        if kinds:
            pool = found[change][kinds[rng.integers(len(kinds))]]
            break
    pool = pool or found[want].get("mirror") or found[not want]["mirror"]
    edit, objs, (answer, about) = pool[rng.integers(len(pool))]
    options = data.options_of(sample.question)
    edited = data.Sample(question=sample.question, answer=data.LETTERS[options.index(answer)], reason="", qtype=sample.qtype,
                    bboxes=[o.bbox(size) for o in about], image=data.render(objs, size), id=sample.id, objects=objs)
    return Pair(sample, edited, edit, edited.answer != sample.answer)
