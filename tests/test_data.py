"""Synthetic data: determinism, disjoint splits, balance, boxes, the JSONL layout and its errors."""
import collections
import hashlib
import json

import numpy as np
import pytest

import data
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
    path = data.export_jsonl(samples, str(tmp_path), "val")
    back = data.load_jsonl(path)
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
    path = data.export_jsonl(data.make_split("val", 3), str(tmp_path), "val")
    rows = [json.loads(line) for line in open(path)]
    mutate(rows[1])
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as e:
        data.load_jsonl(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


def test_not_json_and_missing_file(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"x.jsonl:1: "):
        data.load_jsonl(str(p))
    with pytest.raises(FileNotFoundError, match="file not found"):
        data.load_jsonl(str(tmp_path / "none.jsonl"))
