"""Synthetic data: determinism, disjoint splits, balance, boxes, the JSONL layout and its errors."""
import collections
import hashlib
import json
import math
import re

import numpy as np
import pytest

import data
import datafiles
import model as M


def digest(s):
    return hashlib.sha1(s.image.tobytes()).hexdigest()


def test_deterministic_by_seed():
    a, b = data.make_sample(0, "train", 17), data.make_sample(0, "train", 17)
    assert (a.image == b.image).all() and a.question == b.question and a.answer == b.answer and a.bboxes == b.bboxes
    c = data.make_sample(1, "train", 17)
    assert not (a.image == c.image).all()


def test_splits_never_share_a_scene():
    seen = {split: {digest(data.make_sample(0, split, i)) for i in range(600)} for split in ("train", "val", "test")}
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]
    with pytest.raises(ValueError, match="unknown split"):
        data.make_sample(0, "dev", 0)


def chi2(counter, keys):
    n = sum(counter.values())
    return sum((counter.get(k, 0) - n / len(keys)) ** 2 / (n / len(keys)) for k in keys)


def test_answers_balanced_across_letters_and_values():
    """Chi-square against uniform, p > 0.001 (df 1: 10.8, df 3: 16.3) over 1600 questions of each type."""
    for qtype in data.QTYPES:
        ss = [data.make_sample(0, "train", i, qtypes=(qtype,)) for i in range(1600)]
        letters = collections.Counter(s.answer for s in ss)
        (k,) = {sum(line[1:3] == ". " for line in s.question.splitlines()) for s in ss}
        assert chi2(letters, "ABCD"[:k]) < {2: 10.8, 4: 16.3}[k], (qtype, letters)
        if qtype in ("position", "count"):
            values = collections.Counter(s.reason.split()[-1] for s in ss)
            keys = data.RELATIONS if qtype == "position" else "1234"
            assert chi2(values, keys) < 16.3, (qtype, values)


def test_text_alone_gives_chance():
    """Questions that read the same get every answer: the text carries no shortcut."""
    samples = data.make_split("train", 3000)
    answers = collections.defaultdict(collections.Counter)
    for s in samples:
        answers[s.question.splitlines()[0]][s.answer] += 1
    frequent = [c for c in answers.values() if sum(c.values()) >= 40]
    assert frequent
    for c in frequent:
        assert max(c.values()) / sum(c.values()) < 0.45


def test_boxes_cover_the_objects_they_name():
    for i in range(50):
        s = data.make_sample(0, "test", i)
        for box in s.bboxes:
            o = next(o for o in s.objects if o.bbox(data.IMAGE_SIZE) == box)
            x0, y0, x1, y1 = (np.array(box) * data.IMAGE_SIZE).round().astype(int)
            crop = s.image[y0:y1, x0:x1].reshape(-1, 3)
            assert (crop == data.COLOURS[o.colour]).all(1).any(), (s.id, o)
        assert 1 <= len(s.bboxes) <= len(s.objects)
        assert all(0 <= v <= 1 for b in s.bboxes for v in b)


def test_reason_names_the_answer():
    for i in range(40):
        s = data.make_sample(0, "val", i)
        option = s.question.splitlines()[1 + "ABCD".index(s.answer)][3:]
        if s.qtype == "distance":  # "ref first near|far": near means the first option is the answer
            assert s.reason.split()[-1] == ("near" if s.answer == "A" else "far"), (s.reason, s.answer)
            continue
        last = option.split()[-2] if s.qtype == "size" else option  # "the red circle" -> red
        assert s.reason.split()[-1] == last, (s.qtype, s.reason, option)


def test_distance_rationale_matches_the_geometry():
    for i in range(4, 400, 5):  # the distance questions (every fifth sample)
        s = data.make_sample(0, "train", i)
        ref, first, rel = s.reason.split()
        pos = {o.colour: np.array([o.cx, o.cy]) / data.IMAGE_SIZE for o in s.objects}
        d = {c: np.linalg.norm(pos[c] - pos[ref]) for c in pos}
        lines = s.question.splitlines()
        assert lines[1] == f"A. the {first} " + lines[1].split()[-1] and ref in lines[0]
        second = lines[2].split()[2]
        near, far = (first, second) if rel == "near" else (second, first)
        assert d[near] <= data.NEAR and d[far] >= data.FAR, s.id
        assert lines["AB".index(s.answer) + 1].split()[2] == near


def test_every_word_the_generator_writes_is_in_the_vocabulary():
    tok = M.build_tokenizer()
    unk = tok.convert_tokens_to_ids("<unk>")
    for i in range(100):
        s = data.make_sample(0, "train", i)
        text = data.chat_prompt(s.question, 4) + data.chat_response(s.answer, s.reason, 8)
        assert unk not in tok(text)["input_ids"], (s.qtype, s.question, s.reason)


def test_jsonl_roundtrip(tmp_path):
    samples = data.make_split("val", 6)
    path = datafiles.export_jsonl(samples, str(tmp_path), "val")
    back = datafiles.load_jsonl(path)
    for a, b in zip(samples, back):
        assert (a.question, a.answer, a.reason, a.qtype, a.bboxes) == (b.question, b.answer, b.reason, b.qtype, b.bboxes)
        assert (a.image == b.load_image()).all()
    rec = json.loads(open(path).readline())
    assert rec["conversations"][0]["value"].startswith("<image>\n") and rec["conversations"][0]["from"] == "human"
    assert rec["image"] == f"images/{samples[0].id}.png"


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("image"), "missing field 'image'"),
    (lambda r: r.update(bboxes=[[0.5, 0.5, 0.2, 0.9]]), "field 'bboxes'"),
    (lambda r: r.update(bboxes=[[0, 0, 1, 200]]), "field 'bboxes'"),  # pixels, outside the 96 x 96 image
    (lambda r: r["conversations"][1].update(value="<lvr>"), "holds no answer"),
    (lambda r: r.update(conversations=[]), "field 'conversations'"),
    (lambda r: r.update(image="images/missing.png"), "image not found"),
])
def test_bad_rows_name_file_and_line(tmp_path, mutate, message):
    path = datafiles.export_jsonl(data.make_split("val", 3), str(tmp_path), "val")
    rows = [json.loads(line) for line in open(path)]
    mutate(rows[1])
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as e:
        datafiles.load_jsonl(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


def test_not_json_and_missing_file(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"x.jsonl:1: "):
        datafiles.load_jsonl(str(p))
    with pytest.raises(FileNotFoundError, match="file not found"):
        datafiles.load_jsonl(str(tmp_path / "none.jsonl"))


# ------------------------------------------------------------------------------------ the tasks
def task_digest(split, n, seed=0, task="easy"):
    h = hashlib.sha256()
    for i in range(n):
        s = data.make_sample(seed, split, i, task=task)
        h.update(s.image.tobytes())
        h.update(repr((s.question, s.answer, s.reason, s.qtype, s.bboxes)).encode())
    return h.hexdigest()


def test_easy_task_reproduces_the_samples_from_before_tasks():
    """Digests of images, questions, answers, reasons, types and boxes, computed with the generator as it was
    before --task existed (main at ecdc771), and of the tokenizer it built: the easy task is that generator."""
    want = {("train", 200, 0): "2b60dcb2b5e8161eee5f51687eda0d5d97eb4fb19d7019505bcc81b0eca1dcdd",
            ("val", 100, 0): "251bd2a117a97d98d5309408bff9df99843ccc38ff19cc65a0a6f6c6446fe0d6",
            ("test", 500, 0): "78126cbf56a8492ccb2e10d9d46c54b287f05d51eea6caf39af8e4c442922369",
            ("train", 100, 1): "9538ac4c8f23830482fcd7fd93246e97b29f332ed0d8d658f0c24a450bdac8df"}
    for (split, n, seed), digest_ in want.items():
        assert task_digest(split, n, seed) == digest_, (split, n, seed)
        assert data.make_sample(seed, split, 3).id == data.make_sample(seed, split, 3, task="easy").id == f"{split}-{seed}-3"
    vocab = sorted(M.build_tokenizer().get_vocab().items())
    assert hashlib.sha256(repr(vocab).encode()).hexdigest() == "5d81283b19f2c180e06d8df81660cc26075b34f4b55dec275422124694ee946e"
    assert task_digest("train", 20, task="hard") != task_digest("train", 20)
    with pytest.raises(ValueError, match="unknown task"):
        data.make_sample(0, "train", 0, task="medium")


HARD = [data.make_sample(0, "train", i, task="hard") for i in range(4000)]  # 1000 of each type


def by_type(samples):
    out = collections.defaultdict(list)
    for s in samples:
        out[s.qtype].append(s)
    return out


def options(s):
    return [line[3:] for line in s.question.splitlines()[1:-1]]


def answer_value(s):
    return options(s)["ABCD".index(s.answer)]


def test_hard_answers_are_uniform_per_type_and_letter():
    """Every answer value and every letter of each type against uniform: chi-square, p > 0.001 (df 3: 16.3,
    df 4: 18.5, df 7: 24.3) over 1000 questions a type. Answers are drawn first, so retries cannot skew them."""
    groups = by_type(HARD)
    assert set(groups) == set(data.qtypes_of("hard")) and all(len(g) == 1000 for g in groups.values())
    bound = {3: 16.3, 4: 18.5, 7: 24.3}
    for qtype, ss in groups.items():
        assert chi2(collections.Counter(s.answer for s in ss), "ABCD") < 16.3, qtype
        for ask in ("colour", "shape", "How many"):
            sub = [s for s in ss if ask in s.question.splitlines()[0]]
            if not sub:
                continue
            keys = list(data.COLOURS) if ask == "colour" else list(data.SHAPES) if ask == "shape" else list(data.COUNTS)
            values = collections.Counter(answer_value(s) for s in sub)
            assert set(values) <= set(keys) and chi2(values, keys) < bound[len(keys) - 1], (qtype, ask, values)


def test_hard_text_alone_predicts_no_better_than_chance():
    """The best text-only guess, the majority answer of each question text (options included) over 4000
    training questions, scores chance on 2000 test questions (within 0.05), for each type."""
    majority = collections.defaultdict(collections.Counter)
    for s in HARD:
        majority[s.question][s.answer] += 1
    overall = collections.Counter(s.answer for s in HARD).most_common(1)[0][0]
    test = by_type([data.make_sample(0, "test", i, task="hard") for i in range(2000)])
    for qtype, ss in test.items():
        hits = [(majority[s.question].most_common(1)[0][0] if s.question in majority else overall) == s.answer for s in ss]
        assert np.mean(hits) < 0.25 + 0.05, (qtype, np.mean(hits))


def side(a, b, rel):
    """a on the `rel` side of b: along the axis, as far out as across it (a 90-degree cone)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    along, across = {"left": (-dx, dy), "right": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[rel]
    return along > 0 and along >= abs(across)


def solve(s):
    """The answer from the scene's objects alone, found the way the question reads (written apart from the
    generator), with the boxes the reasoning visits, in order; asserts the question has one answer."""
    q = s.question.splitlines()[0]
    objs = s.objects
    dist = lambda a, b: math.hypot(a.cx - b.cx, a.cy - b.cy)  # noqa: E731
    if q.startswith("How many"):
        colour = q.split()[2]
        hit = [o for o in objs if o.colour == colour]
        return str(len(hit)), sorted(hit, key=lambda o: (o.cy, o.cx))
    m = re.fullmatch(r"What (colour|shape) is the object (nearest to|left of|right of|above|below) the (\w+) (\w+)\?", q)
    if m:
        ask, how, colour, shape = m.groups()
        (ref,) = [o for o in objs if (o.colour, o.shape) == (colour, shape)]  # the named object is unique
        others = [o for o in objs if o is not ref]
        if how == "nearest to":
            first, second = sorted(others, key=lambda o: dist(o, ref))[:2]
            assert dist(first, ref) <= 0.75 * dist(second, ref) and dist(first, ref) - first.r < dist(second, ref) - second.r
            target = first
        else:
            (target,) = [o for o in others if side(o, ref, how.split()[0])]
        return getattr(target, ask), [ref, target]
    m = re.fullmatch(r"What shape is the (\w+) object\?|What colour is the (\w+)\?", q)
    colour, shape = m.groups()
    (target,) = [o for o in objs if o.colour == colour or o.shape == shape]
    assert all(target.r < o.r for o in objs if o is not target)  # the smallest object in the scene
    return (target.shape if colour else target.colour), [target]


def test_hard_questions_are_answerable_from_the_scene():
    """An independent solver reads each answer off the scene objects; the boxes are the objects it visits,
    in order, and every object is drawn (its colour shows inside its box)."""
    for s in HARD[:800] + [data.make_sample(0, "test", i, task="hard") for i in range(200)]:
        value, visited = solve(s)
        assert answer_value(s) == value, (s.id, s.question, s.answer)
        assert s.bboxes == [o.bbox(data.IMAGE_SIZE) for o in visited], s.id
        lo, hi = {"count": (6, 12), "search": data.SEARCH_OBJECTS}.get(s.qtype, data.TWO_HOP_OBJECTS)
        assert s.reason.split()[-1] == value and lo <= len(s.objects) <= hi, s.id
        for o in s.objects:
            x0, y0, x1, y1 = (np.array(o.bbox(data.IMAGE_SIZE)) * data.IMAGE_SIZE).round().astype(int)
            assert (s.image[y0:y1, x0:x1].reshape(-1, 3) == data.COLOURS[o.colour]).all(1).any(), (s.id, o)


def test_hard_words_extend_the_easy_vocabulary():
    easy, hard = M.build_tokenizer().get_vocab(), M.build_tokenizer("hard").get_vocab()
    assert all(hard[t] == i for t, i in easy.items()) and len(hard) == len(easy) + len(data.HARD_WORDS)
    tok, unk = M.build_tokenizer("hard"), M.build_tokenizer("hard").convert_tokens_to_ids("<unk>")
    for s in HARD[:200]:
        text = data.chat_prompt(s.question, 4) + data.chat_response(s.answer, s.reason, 8)
        assert unk not in tok(text)["input_ids"], (s.qtype, s.question, s.reason)
