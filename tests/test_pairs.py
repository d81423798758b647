"""Counterfactual edit pairs (ReaLVR's protocol): the solver re-derives every generated answer; each edit
changes exactly what it says (objects and pixels); a pair's answer changes exactly when the pair says so."""
import math

import numpy as np
import pytest

import data
import edits

N = 400


@pytest.fixture(scope="module", params=["easy", "hard"])
def pairs(request):
    samples = data.make_split("test", N, task=request.param)
    return [edits.counterfactual(s, i) for i, s in enumerate(samples)]


def right_text(s):
    return data.options_of(s.question)[data.LETTERS.index(s.answer)]


@pytest.mark.parametrize("task", ["easy", "hard"])
def test_solver_rederives_every_generated_answer(task):
    for split in ("train", "test"):
        for s in data.make_split(split, 300, task=task):
            got = edits.solve(s.question, s.objects)
            assert got is not None and got[0] == right_text(s), s.question
            assert sorted(o.bbox(data.IMAGE_SIZE) for o in got[1]) == sorted(s.bboxes) or s.qtype == "count"


def same(a, b, skip=()):
    return all(getattr(a, k) == getattr(b, k) for k in ("colour", "shape", "cx", "cy", "r") if k not in skip)


def test_each_edit_changes_exactly_what_it_says(pairs):
    size = data.IMAGE_SIZE
    for p in pairs:
        o, e, ed = p.original.objects, p.edited.objects, p.edit
        if ed.kind in ("colour", "shape"):
            i = ed.objects[0]
            assert len(e) == len(o) and all(same(a, b) for j, (a, b) in enumerate(zip(o, e)) if j != i)
            attr = "colour" if ed.kind == "colour" else "shape"
            assert getattr(e[i], attr) == ed.value != getattr(o[i], attr) and same(o[i], e[i], skip=(attr,))
        elif ed.kind == "remove":
            i = ed.objects[0]
            assert len(e) == len(o) - 1 and all(same(a, b) for a, b in zip(o[:i] + o[i + 1:], e))
        elif ed.kind == "swap":
            i, j = ed.objects
            assert all(same(a, b) for k, (a, b) in enumerate(zip(o, e)) if k not in (i, j))
            assert (e[i].cx, e[i].cy, e[j].cx, e[j].cy) == (o[j].cx, o[j].cy, o[i].cx, o[i].cy)
            assert same(o[i], e[i], skip=("cx", "cy")) and same(o[j], e[j], skip=("cx", "cy"))
        else:
            axis = "cx" if ed.value == "x" else "cy"
            assert all(getattr(b, axis) == size - getattr(a, axis) and same(a, b, skip=(axis,)) for a, b in zip(o, e))
        assert edits.valid_scene(e, size)
        # pixels: outside the touched objects' boxes (before and after) the two images are the same
        if ed.kind != "mirror":
            touched = [o[i] for i in ed.objects] + ([e[i] for i in ed.objects] if ed.kind != "remove" else [])
            outside = np.ones((size, size), dtype=bool)
            for t in touched:
                outside[max(0, math.floor(t.cy - t.r) - 1):math.ceil(t.cy + t.r) + 1,
                        max(0, math.floor(t.cx - t.r) - 1):math.ceil(t.cx + t.r) + 1] = False
            diff = (p.original.image != p.edited.image).any(-1)
            assert diff.any() and not (diff & outside).any()
        assert np.array_equal(p.edited.image, data.render(e, size))
        assert p.edited.question == p.original.question and p.edited.id == p.original.id


def test_the_answer_changes_exactly_when_the_pair_says(pairs):
    for p in pairs:
        assert p.changes == (p.edited.answer != p.original.answer)
        assert edits.solve(p.edited.question, p.edited.objects)[0] == right_text(p.edited)
    # checked by hand for two question types: counts, and where one object is relative to another
    for p in pairs:
        first = p.original.question.splitlines()[0]
        if p.original.qtype == "count":
            colour = first.split()[2]
            assert right_text(p.edited) == str(sum(o.colour == colour for o in p.edited.objects))
        if p.original.qtype == "position" and p.edit.kind == "swap":
            a, b = first.removeprefix("Where is ").removesuffix("?").split(" relative to ")
            find = lambda name: next(o for o in p.edited.objects if o.name == name)  # noqa: E731
            assert right_text(p.edited) == data.relation(find(a), find(b))


def test_pairs_cover_every_edit_and_both_outcomes(pairs):
    kinds = {(p.edit.kind, p.changes) for p in pairs}
    assert {("colour", True), ("colour", False), ("remove", True), ("remove", False), ("shape", True),
            ("shape", False), ("swap", True), ("swap", False)} <= kinds
    changing = [p.changes for p in pairs if p.original.qtype != "size"]
    assert 0.35 < np.mean(changing) < 0.65
    assert not any(p.changes for p in pairs if p.original.qtype == "size")
    again = [edits.counterfactual(p.original, i) for i, p in enumerate(pairs[:20])]
    assert all(a.edit == p.edit for a, p in zip(again, pairs))  # a pure function of (sample, index, seed)
