"""The paper's seven benchmarks in VLMEvalKit's TSV layout: fixtures written here (a few rows, base64
images, known answers), the rule-based scoring, and eval.py --bench NAME / --bench all."""
import base64
import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import benchmarks
import eval as ev

WORDS = ["red", "green", "blue", "yellow", "black"]  # the options A..E of every multiple-choice fixture row
MCQ = ["index", "image", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "l2-category"]


def b64(seed, h=28, w=28):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def mcq(index, answer, n=4, **kw):
    return {"index": index, "image": b64(index), "question": f"Question {index}?", **dict(zip("ABCDE"[:n], WORDS)),
            "answer": answer, **kw}


# name -> (columns, rows, {index: (reply, correct?)})
FIXTURES = {
    "MathVista_MINI": (["index", "image", "question", "choices", "answer", "question_type", "answer_type", "precision"], [
        {"index": 1, "image": b64(1), "question": "How many balls?", "choices": "['3', '4', '5']", "answer": "4",
         "question_type": "multi_choice", "answer_type": "text", "precision": ""},
        {"index": 2, "image": b64(2), "question": "What is the area?", "choices": "", "answer": "12",
         "question_type": "free_form", "answer_type": "integer", "precision": ""},
        {"index": 3, "image": b64(3), "question": "What is x?", "choices": "", "answer": "1.5",
         "question_type": "free_form", "answer_type": "float", "precision": "1"}],
        {1: ("<answer>B</answer>", True), 2: ("The area is \\boxed{12}", True), 3: ("x = 1.54", True)}),
    "MathVerse_MINI": (["index", "image", "question", "answer", "question_type", "problem_version"], [
        {"index": 1, "image": b64(4), "question": "Find the angle.\nChoices:\nA: 30\nB: 60", "answer": "B",
         "question_type": "multi-choice", "problem_version": "Vision Only"},
        {"index": 2, "image": b64(5), "question": "Find the length.", "answer": "5", "question_type": "free-form",
         "problem_version": "Text Lite"}],
        {1: ("B", True), 2: ("<answer>6</answer>", False)}),
    "MMVP": (MCQ, [mcq(i, "AB"[i % 2], n=2) for i in range(1, 5)],
             {1: ("<answer>B</answer>", True), 2: ("(A)", True), 3: ("red", False), 4: ("<answer>A</answer>", True)}),
    "MMBench_V11_MINI": (MCQ, [mcq(1, "C", hint="A hint.", category="ocr", **{"l2-category": "perception"}), mcq(2, "A")],
                         {1: ("C. blue", True), 2: ("green", False)}),
    "VStarBench": (MCQ, [mcq(1, "A", category="direct_attributes"), mcq(2, "B", n=2, category="relative_position")],
                   {1: ("The answer is A.", True), 2: ("<answer>B</answer>", True)}),
    "MME-RealWorld-Lite": (MCQ, [mcq(1, "E", n=5, category="Perception"), mcq(2, "D", n=5, category="Reasoning")],
                           {1: ("(E) black", True), 2: ("<answer>C</answer>", False)}),
    "HRBench4K": (MCQ + ["cycle_category"], [mcq(1, "D", category="single"), mcq(2, "A", category="cross")],
                  {1: ("yellow", True), 2: ("<answer>A</answer>", True)}),
}


def write_benchmarks(root):
    os.makedirs(root, exist_ok=True)
    for name, (columns, rows, _) in FIXTURES.items():
        with open(os.path.join(root, f"{name}.tsv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return str(root)


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    return write_benchmarks(tmp_path_factory.mktemp("vlmeval"))


@pytest.mark.parametrize("name", benchmarks.PAPER)
def test_each_paper_benchmark_loads_and_scores_known_answers(bench_root, name):
    samples = benchmarks.load_benchmark(name, bench_root)
    replies = FIXTURES[name][2]
    assert [s.id for s in samples] == [f"{name}-{i}" for i in replies]
    assert all(s.load_image().shape == (28, 28, 3) for s in samples)
    for s, (reply, want) in zip(samples, replies.values()):
        assert benchmarks.is_correct(reply, s) is want, (s.id, reply)


def test_mathvista_option_text_answers_become_letters(bench_root):
    s = benchmarks.load_benchmark("MathVista_MINI", bench_root)
    assert (s[0].answer, s[0].choices) == ("B", ["3", "4", "5"]) and s[0].question.endswith("C. 5\nAnswer with the option's letter.")
    assert (s[2].answer, s[2].precision, s[2].choices) == ("1.5", 1, [])
    assert benchmarks.is_correct("4", s[0]) and not benchmarks.is_correct("1.6", s[2])


def test_mmvp_is_scored_per_pair_too(bench_root):
    records = [{"id": f"MMVP-{i}", "qtype": "MMVP", "correct": ok, "opened": False} for i, (_, ok) in FIXTURES["MMVP"][2].items()]
    out = ev.summarize(records)
    assert out["overall"]["acc"] == 0.75 and out["overall"]["pair_acc"] == 0.5


def test_eval_one_benchmark_and_all(qwen_dir, bench_root, tmp_path, capsys):
    out = str(tmp_path / "one.json")
    ev.main(["--model", qwen_dir, "--bench", "HRBench4K", "--bench-root", bench_root, "--max-new-tokens", "3", "--out", out])
    res = json.load(open(out))
    assert [r["id"] for r in res["records"]["normal"]] == ["HRBench4K-1", "HRBench4K-2"]
    out = str(tmp_path / "all.json")
    ev.main(["--model", qwen_dir, "--bench", "all", "--bench-root", bench_root, "--max-new-tokens", "3", "--out", out])
    res = json.load(open(out))["benchmarks"]
    assert list(res) == list(benchmarks.PAPER)
    assert "pair_acc" in res["MMVP"]["summaries"]["normal"]["overall"]
    table = capsys.readouterr().out.split("| benchmark |")[1]
    assert all(f"| {name} |" in table for name in benchmarks.PAPER)


def test_bench_all_names_a_missing_file(qwen_dir, tmp_path, capsys):
    root = write_benchmarks(tmp_path / "some")
    os.remove(os.path.join(root, "VStarBench.tsv"))
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", qwen_dir, "--bench", "all", "--bench-root", root])
    assert str(e.value).startswith("error: file not found") and "VStarBench.tsv" in str(e.value)
