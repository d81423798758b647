"""Real-benchmark loaders (BLINK, CV-Bench, MMVP, V*, VLMEvalKit TSV) on tiny fixtures in the released layouts."""
import base64
import csv
import io
import json
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

import benchmarks
import data

import pyarrow as pa
import pyarrow.parquet as pq


def encode(h, w, fmt="PNG", value=0):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path, h, w, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encode(h, w, fmt))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows)


def accuracy(samples, preds):
    return float(np.mean([preds[s.id] == s.answer for s in samples]))


def check_error(load, root, path, where, problem):
    with pytest.raises(ValueError) as e:
        load(root)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{where}: ") and problem in msg and "\n" not in msg, msg


def check_options(s, options):
    for letter, opt in zip(data.OPTION_LETTERS, options):
        assert f"\n{letter}. {opt}\n" in s.question
    assert s.question.endswith("Answer with the option's letter.") and s.choices == options and s.bboxes == []


def test_format_question_extends_past_d():
    six = data.format_question("Q?", list("uvwxyz"))
    assert six.splitlines() == ["Q?", "A. u", "B. v", "C. w", "D. x", "E. y", "F. z", "Answer with the option's letter."]
    assert [benchmarks.answer_letter(a, 4) for a in ("(A)", "(b)", "c", "D", " (a) ")] == ["A", "B", "C", "D", "A"]
    with pytest.raises(ValueError, match="unknown answer letter 'E'"):
        benchmarks.answer_letter("E", 4)


# ----------------------------------------------------------------------------------------- BLINK
def blink_rows(task):
    img = lambda h, w: {"bytes": encode(h, w), "path": f"{h}x{w}.png"}  # noqa: E731
    if task == "Counting":
        return [dict(idx="val_Counting_1", question="How many cats?", sub_task="Counting", image_1=img(8, 10),
                     choices=["1", "2", "3", "4"], answer="(B)"),
                dict(idx="val_Counting_2", question="How many dogs?", sub_task="Counting", image_1=img(6, 6),
                     choices=["0", "1", "2"], answer="(c)")]
    return [dict(idx="val_Relative_Depth_1", question="Which image is closer?", sub_task="Relative_Depth",
                 image_1=img(8, 8), image_2=img(4, 12), choices=["first", "second"], answer="(A)"),
            dict(idx="val_Relative_Depth_2", question="Which of the three?", sub_task="Relative_Depth",
                 image_1=img(5, 5), image_2=img(6, 6), image_3=img(7, 7), choices=["one", "two", "three", "four"],
                 answer="D")]


def write_parquet(path, rows, drop=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = {"idx": pa.string(), "question": pa.string(), "sub_task": pa.string(),
            **{f"image_{k}": image for k in range(1, 5)}, "choices": pa.list_(pa.string()), "answer": pa.string()}
    cols = {c: t for c, t in cols.items() if c not in drop}
    table = pa.table({c: pa.array([r.get(c) for r in rows], type=t) for c, t in cols.items()})
    pq.write_table(table, path)
    return path


def write_blink(root, counting=None, depth=None, drop=()):
    write_parquet(root / "Counting" / "val-00000-of-00001.parquet", counting or blink_rows("Counting"), drop)
    write_parquet(root / "Relative_Depth" / "val-00000-of-00001.parquet", depth or blink_rows("Relative_Depth"))
    return root


def test_blink_loads_and_scores(tmp_path):
    root = write_blink(tmp_path / "BLINK")
    write_parquet(root / "Counting" / "test-00000-of-00001.parquet", blink_rows("Counting")[:1])  # another split
    ss = benchmarks.load_blink(str(root))
    assert [s.id for s in ss] == ["blink-val_Counting_1", "blink-val_Counting_2",
                                  "blink-val_Relative_Depth_1", "blink-val_Relative_Depth_2"]
    assert [s.answer for s in ss] == ["B", "C", "A", "D"]
    assert [s.qtype for s in ss] == ["Counting", "Counting", "Relative_Depth", "Relative_Depth"]
    check_options(ss[0], ["1", "2", "3", "4"])
    assert ss[0].question.startswith("How many cats?\nA. 1")
    assert isinstance(ss[0].image_path, bytes) and ss[0].image is None  # lazy: still encoded
    assert [im.shape for im in ss[0].load_images()] == [(8, 10, 3)]
    assert [im.shape for im in ss[2].load_images()] == [(8, 8, 3), (4, 12, 3)]
    assert [im.shape for im in ss[3].load_images()] == [(5, 5, 3), (6, 6, 3), (7, 7, 3)]
    assert accuracy(ss, {"blink-val_Counting_1": "B", "blink-val_Counting_2": "A",
                         "blink-val_Relative_Depth_1": "A", "blink-val_Relative_Depth_2": "C"}) == 0.5
    assert len(benchmarks.load_blink(str(root), split="test")) == 1
    assert benchmarks.load_benchmark("blink", str(root))[3].answer == "D"


def test_blink_errors(tmp_path):
    path = str(tmp_path / "B" / "Counting" / "val-00000-of-00001.parquet")
    bad = blink_rows("Counting")
    bad[1]["answer"] = "(E)"
    check_error(benchmarks.load_blink, str(write_blink(tmp_path / "B", counting=bad)), path, 1, "unknown answer letter '(E)'")
    bad = blink_rows("Counting")
    bad[0]["question"] = None
    check_error(benchmarks.load_blink, str(write_blink(tmp_path / "B", counting=bad)), path, 0, "missing field 'question'")
    bad = blink_rows("Counting")
    bad[1]["image_1"] = None
    check_error(benchmarks.load_blink, str(write_blink(tmp_path / "B", counting=bad)), path, 1, "missing field 'image_1'")
    bad[1]["image_1"] = {"bytes": None, "path": "x.png"}
    check_error(benchmarks.load_blink, str(write_blink(tmp_path / "B", counting=bad)), path, 1, "image_1 holds no image bytes")
    with pytest.raises(ValueError, match=f"^{re.escape(path)}: missing column 'question'$"):
        benchmarks.load_blink(str(write_blink(tmp_path / "B", drop=("question",))))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        benchmarks.load_blink(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no dev-"):
        benchmarks.load_blink(str(tmp_path / "B"), split="dev")


def test_blink_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="needs pyarrow: pip install pyarrow"):
        benchmarks.load_blink(str(tmp_path))


# -------------------------------------------------------------------------------------- CV-Bench
def cvbench_rows():
    return [{"idx": 0, "type": "2D", "task": "Count", "image": "img/2D/count/ade20k_1.png", "source": "ADE20K",
             "question": "How many chairs are in the image?", "choices": ["3", "2", "1", "0", "4", "5"], "answer": "(F)"},
            {"idx": 1, "type": "2D", "task": "Relation", "image": "img/2D/relation/coco_1.png", "source": "COCO",
             "question": "Is the cup left or right of the plate?", "choices": ["left", "right"], "answer": "(A)"},
            {"idx": 2, "type": "3D", "task": "Depth", "image": "img/3D/depth/omni3d_1.png", "source": "Omni3D",
             "question": "Which is closer?", "choices": ["lamp", "sofa"], "answer": "(b)"}]


def write_cvbench(root, rows=None):
    rows = rows or cvbench_rows()
    for r in rows:
        if isinstance(r, dict) and "image" in r:
            write_image(str(root / r["image"]), 9, 7)
    os.makedirs(root, exist_ok=True)
    write_jsonl(root / "test.jsonl", rows)
    return str(root)


def test_cvbench_loads_and_scores(tmp_path):
    ss = benchmarks.load_cvbench(write_cvbench(tmp_path / "CV-Bench"))
    assert [(s.id, s.answer, s.qtype) for s in ss] == [("cvbench-0", "F", "Count"), ("cvbench-1", "A", "Relation"),
                                                      ("cvbench-2", "B", "Depth")]
    check_options(ss[0], ["3", "2", "1", "0", "4", "5"])
    assert ss[0].image_path.endswith(os.path.join("img", "2D", "count", "ade20k_1.png"))
    assert [im.shape for im in ss[1].load_images()] == [(9, 7, 3)]
    assert accuracy(ss, {"cvbench-0": "F", "cvbench-1": "B", "cvbench-2": "A"}) == pytest.approx(1 / 3)


def test_cvbench_errors(tmp_path):
    path = str(tmp_path / "cv" / "test.jsonl")
    rows = cvbench_rows()
    rows[1]["answer"] = "(C)"
    check_error(benchmarks.load_cvbench, write_cvbench(tmp_path / "cv", rows), path, 2, "unknown answer letter '(C)'")
    del rows[2]["question"]
    rows[1]["answer"] = "(A)"
    check_error(benchmarks.load_cvbench, write_cvbench(tmp_path / "cv", rows), path, 3, "missing field 'question'")
    check_error(benchmarks.load_cvbench, write_cvbench(tmp_path / "cv", cvbench_rows()[:1] + ["{not json\n"]), path, 2,
                "malformed JSON")
    write_cvbench(tmp_path / "cv", cvbench_rows())
    os.remove(tmp_path / "cv" / "img" / "3D" / "depth" / "omni3d_1.png")
    check_error(benchmarks.load_cvbench, str(tmp_path / "cv"), path, 3, "image not found: ")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none" / "test.jsonl")):
        benchmarks.load_cvbench(str(tmp_path / "none"))


# ------------------------------------------------------------------------------------------ MMVP
MMVP_HEADER = ["Index", "Question", "Options", "Correct Answer"]


def mmvp_rows():
    return [[1, "Are the butterfly's wings open or closed?", "(a) Open (b) Closed", "(a)"],
            [2, "Are the butterfly's wings open or closed?", "(a) Open (b) Closed", "(b)"],
            [3, "Is the dog facing left or right?", "(a) Left (b) Right", "(b)"],
            [4, "Is the dog facing left or right?", "(a) Left (b) Right", "(a)"],
            [5, "How many eyes can you see?", "(a) One (b) Two (c) Three", "(c)"],
            [6, "How many eyes can you see?", "(a) One (b) Two (c) Three", "(a)"]]


def write_mmvp(root, rows=None, header=MMVP_HEADER, images=range(1, 7)):
    os.makedirs(root, exist_ok=True)
    with open(root / "Questions.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + (rows or mmvp_rows()))
    for i in images:
        write_image(str(root / "MMVP Images" / f"{i}.jpg"), 10, 12, fmt="JPEG")
    return str(root)


def test_mmvp_loads_and_scores(tmp_path):
    ss = benchmarks.load_mmvp(write_mmvp(tmp_path / "MMVP"))
    assert [s.id for s in ss] == [f"mmvp-{i}" for i in range(1, 7)]
    assert [s.answer for s in ss] == ["A", "B", "B", "A", "C", "A"]
    check_options(ss[4], ["One", "Two", "Three"])
    assert ss[0].question.startswith("Are the butterfly's wings open or closed?\nA. Open\nB. Closed\n")
    assert ss[0].image_path.endswith(os.path.join("MMVP Images", "1.jpg"))
    assert [im.shape for im in ss[5].load_images()] == [(10, 12, 3)]
    preds = dict(zip([s.id for s in ss], ["A", "B", "B", "B", "A", "B"]))  # pair 1 both right, pair 2 one, pair 3 none
    assert accuracy(ss, preds) == 0.5
    correct = {s.id: preds[s.id] == s.answer for s in ss}
    assert benchmarks.mmvp_pair_accuracy(correct) == pytest.approx(1 / 3)
    assert benchmarks.mmvp_pair_accuracy({"mmvp-3": True, "mmvp-4": True}) == 1.0
    with pytest.raises(ValueError, match="pair 2 needs both mmvp-3 and mmvp-4"):
        benchmarks.mmvp_pair_accuracy({"mmvp-1": True, "mmvp-2": True, "mmvp-4": True})
    with pytest.raises(ValueError, match="not an MMVP question id"):
        benchmarks.mmvp_pair_accuracy({"blink-1": True})
    assert [s.id for s in benchmarks.load_benchmark("mmvp", str(tmp_path / "MMVP"))] == [s.id for s in ss]


def test_mmvp_errors(tmp_path):
    root, path = tmp_path / "m", str(tmp_path / "m" / "Questions.csv")
    rows = mmvp_rows()
    rows[2][3] = "(c)"
    check_error(benchmarks.load_mmvp, write_mmvp(root, rows), path, 4, "unknown answer letter '(c)'")
    rows = mmvp_rows()
    rows[1][1] = ""
    check_error(benchmarks.load_mmvp, write_mmvp(root, rows), path, 3, "missing field 'Question'")
    rows = mmvp_rows()
    rows[0] = rows[0][:2]  # a short row: no options, no answer
    check_error(benchmarks.load_mmvp, write_mmvp(root, rows), path, 2, "missing field 'Options'")
    rows = mmvp_rows()
    rows[3][2] = "Left or Right"
    check_error(benchmarks.load_mmvp, write_mmvp(root, rows), path, 5, "malformed field 'Options'")
    check_error(benchmarks.load_mmvp, write_mmvp(tmp_path / "m2", images=range(1, 6)), str(tmp_path / "m2" / "Questions.csv"),
                7, "image not found: ")
    check_error(benchmarks.load_mmvp, write_mmvp(tmp_path / "m3", header=["Index", "Question", "Options", "Answer"]),
                str(tmp_path / "m3" / "Questions.csv"), 1, "missing column 'Correct Answer'")
    with pytest.raises(FileNotFoundError, match="Questions.csv"):
        benchmarks.load_mmvp(str(tmp_path / "none"))


# -------------------------------------------------------------------------------------------- V*
def vstar_rows():
    tail = "Answer with the option's letter from the given choices directly."
    return [{"image": "direct_attributes/sa_4690.jpg", "category": "direct_attributes", "question_id": 0, "label": "B",
             "text": f"What is the color of the clock?\n(A) green\n(B) red\n(C) white\n(D) black\n{tail}"},
            {"image": "relative_position/sa_10.jpg", "category": "relative_position", "question_id": 1, "label": "A",
             "text": f"Is the cup on the left or right side of the man?\n(A) left\n(B) right\n{tail}"}]


def write_vstar(root, rows=None):
    rows = rows or vstar_rows()
    for r in rows:
        write_image(str(root / r["image"]), 11, 5, fmt="JPEG")
    write_jsonl(root / "test_questions.jsonl", rows)
    return str(root)


def test_vstar_loads_and_scores(tmp_path):
    ss = benchmarks.load_vstar(write_vstar(tmp_path / "vstar_bench"))
    assert [(s.id, s.answer, s.qtype) for s in ss] == [("vstar-0", "B", "direct_attributes"),
                                                      ("vstar-1", "A", "relative_position")]
    assert ss[0].question == data.format_question("What is the color of the clock?", ["green", "red", "white", "black"])
    check_options(ss[1], ["left", "right"])
    assert [im.shape for im in ss[0].load_images()] == [(11, 5, 3)]
    assert accuracy(ss, {"vstar-0": "B", "vstar-1": "B"}) == 0.5
    assert benchmarks.split_options("How many object(s)? (A) 1 (B) 2", "text") == ("How many object(s)?", ["1", "2"])


def test_vstar_errors(tmp_path):
    root, path = tmp_path / "v", str(tmp_path / "v" / "test_questions.jsonl")
    rows = vstar_rows()
    rows[1]["label"] = "C"
    check_error(benchmarks.load_vstar, write_vstar(root, rows), path, 2, "unknown answer letter 'C'")
    rows = vstar_rows()
    rows[0]["text"] = "What is the color of the clock?"
    check_error(benchmarks.load_vstar, write_vstar(root, rows), path, 1, "malformed field 'text': no options")
    rows[0]["text"] = "(A) red\n(B) blue"
    check_error(benchmarks.load_vstar, write_vstar(root, rows), path, 1, "no question before its options")
    rows = vstar_rows()
    del rows[1]["text"]
    check_error(benchmarks.load_vstar, write_vstar(root, rows), path, 2, "missing field 'text'")
    write_vstar(root)
    os.remove(root / "relative_position" / "sa_10.jpg")
    check_error(benchmarks.load_vstar, str(root), path, 2, "image not found: ")
    with pytest.raises(FileNotFoundError, match="test_questions.jsonl"):
        benchmarks.load_vstar(str(tmp_path / "none"))


# ------------------------------------------------------------------------------------------- TSV
def tsv_rows():
    b64 = lambda h, w: base64.b64encode(encode(h, w, value=h)).decode()  # noqa: E731
    return [{"index": "10", "image": b64(6, 9), "question": "What is shown?", "hint": "", "A": "a cat", "B": "a dog",
             "C": "a car", "D": "a tree", "answer": "C", "category": "object_localization"},
            {"index": "11", "image": b64(7, 7), "question": "Is it day?", "hint": "Look at the sky.", "A": "yes",
             "B": "no", "C": "", "D": "", "answer": "B", "category": "attribute_recognition"},
            {"index": "12", "image": "10", "question": "Which colour?", "hint": "nan", "A": "red", "B": "blue",
             "C": "green", "D": "", "answer": "A", "category": ""}]


def write_tsv(path, rows=None, columns=("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image")):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows or tsv_rows())
    return str(path)


def test_tsv_loads_and_scores(tmp_path):
    ss = benchmarks.load_vlmevalkit_tsv(write_tsv(tmp_path / "MMBench_DEV_EN.tsv"))
    assert [(s.id, s.answer, s.qtype) for s in ss] == [("MMBench_DEV_EN-10", "C", "object_localization"),
                                                      ("MMBench_DEV_EN-11", "B", "attribute_recognition"),
                                                      ("MMBench_DEV_EN-12", "A", "MMBench_DEV_EN")]
    check_options(ss[0], ["a cat", "a dog", "a car", "a tree"])
    check_options(ss[1], ["yes", "no"])
    assert "C." not in ss[1].question and ss[1].question.startswith("Hint: Look at the sky.\nIs it day?\nA. yes")
    assert ss[2].question.startswith("Which colour?\nA. red") and ss[2].choices == ["red", "blue", "green"]
    assert isinstance(ss[0].image_path, bytes)
    assert [im.shape for im in ss[0].load_images()] == [(6, 9, 3)]
    assert [im.shape for im in ss[1].load_images()] == [(7, 7, 3)]
    assert (ss[2].load_image() == ss[0].load_image()).all()  # image "10" reuses row 10's image
    assert accuracy(ss, {"MMBench_DEV_EN-10": "C", "MMBench_DEV_EN-11": "B", "MMBench_DEV_EN-12": "D"}) \
        == pytest.approx(2 / 3)
    assert len(benchmarks.load_benchmark("tsv", str(tmp_path / "MMBench_DEV_EN.tsv"))) == 3


def test_tsv_errors(tmp_path):
    path = str(tmp_path / "x.tsv")
    rows = tsv_rows()
    rows[1]["answer"] = "C"  # option C is empty in this row
    check_error(benchmarks.load_vlmevalkit_tsv, write_tsv(path, rows), path, 3, "unknown answer letter 'C'")
    rows = tsv_rows()
    rows[0]["question"] = ""
    check_error(benchmarks.load_vlmevalkit_tsv, write_tsv(path, rows), path, 2, "missing field 'question'")
    rows = tsv_rows()
    rows[0]["image"] = "not base64!" * 10
    check_error(benchmarks.load_vlmevalkit_tsv, write_tsv(path, rows), path, 2, "field 'image' is not a base64 image")
    rows = tsv_rows()
    rows[2]["C"], rows[2]["D"] = "", "green"
    check_error(benchmarks.load_vlmevalkit_tsv, write_tsv(path, rows), path, 4, "without gaps")
    check_error(benchmarks.load_vlmevalkit_tsv, write_tsv(path, columns=("index", "question", "A", "B", "answer")), path, 1,
                "missing column 'image'")
    with pytest.raises(FileNotFoundError, match="none.tsv"):
        benchmarks.load_vlmevalkit_tsv(str(tmp_path / "none.tsv"))


def test_load_benchmark_unknown_name():
    with pytest.raises(ValueError, match="unknown benchmark 'mmmu'"):
        benchmarks.load_benchmark("mmmu", "/tmp")
