"""The paper's seven benchmarks in the TSV layouts VLMEvalKit reads: fixtures written here (a few rows,
base64 images, known answers), the two protocols (prompt, verdict), errors naming file and row, and
eval.py --bench NAME / --bench all."""
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
import summary
import model as M
import vlmeval_rules

WORDS = ["red", "green", "blue", "yellow", "black"]  # the options A..E of every multiple-choice fixture row
MCQ = ["index", "image", "question", "hint", "A", "B", "C", "D", "E", "answer", "category", "l2-category"]
MV_HINT = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"


def b64(seed, h=28, w=28):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def mcq(index, answer, n=4, image=None, question=None, **kw):
    return {"index": index, "image": image or b64(index % 1000), "question": question or f"Question {index}?",
            **dict(zip("ABCDE"[:n], WORDS)), "answer": answer, **kw}


def mme(index, answer, category):
    opts = str([f"({c}) {w}" for c, w in zip("ABCDE", WORDS)])
    return {"index": index, "image": b64(index), "question": f"What colour is sign {index}?",
            "multi-choice options": opts, "answer": answer, "category": category, "l2-category": "color"}


# name -> (columns, rows, {index: (reply, lenient verdict, VLMEvalKit verdict)})
FIXTURES = {
    "MathVista_MINI": (["index", "image", "question", "choices", "answer", "answer_option", "question_type",
                        "answer_type", "precision", "task", "skills"], [
        {"index": 1, "image": b64(1), "question": MV_HINT + "Question: How many balls?\nChoices:\n(A) 3\n(B) 4\n(C) 5",
         "choices": "['3', '4', '5']", "answer": "4", "answer_option": "B", "question_type": "multi_choice",
         "answer_type": "text", "task": "figure question answering", "skills": "['arithmetic reasoning']"},
        {"index": 2, "image": b64(2), "question": "What is the area?", "answer": "12", "question_type": "free_form",
         "answer_type": "integer", "task": "geometry problem solving", "skills": "['geometry reasoning']"},
        {"index": 3, "image": b64(3), "question": "What is x?", "answer": "1.5", "question_type": "free_form",
         "answer_type": "float", "precision": "1", "task": "geometry problem solving",
         "skills": "['geometry reasoning', 'algebraic reasoning']"},
        {"index": 4, "image": b64(4), "question": "Which one?\nChoices:\n(A) cat\n(B) dog", "choices": "['cat', 'dog']",
         "answer": "dog", "question_type": "multi_choice", "answer_type": "text", "task": "figure question answering",
         "skills": "['scientific reasoning']"}],  # no answer_option: the letter of the answer among the choices
        {1: ("<answer>B</answer>", True, False), 2: ("The area is \\boxed{12}", True, False), 3: ("1.5", True, True),
         4: ("B", True, True)}),
    "MathVerse_MINI": (["index", "image", "question", "answer", "question_type", "problem_version", "metadata"], [
        {"index": 1, "image": b64(4), "question": "Find the angle.\nChoices:\nA:30\nB:60", "answer": "B",
         "question_type": "multi-choice", "problem_version": "Vision Only",
         "metadata": "{'subject': 'plane geometry', 'subfield': 'angle'}"},
        {"index": 2, "image": b64(5), "question": "Find the length.", "answer": "5", "question_type": "free-form",
         "problem_version": "Text Lite", "metadata": "{'subject': 'plane geometry', 'subfield': 'length'}"}],
        {1: ("B", True, True), 2: ("<answer>5</answer>", True, False)}),
    "MMVP": (MCQ, [mcq(i, "AB"[i % 2], n=2, question=f"Pair {(i + 1) // 2}?") for i in range(1, 5)],
             {1: ("<answer>B</answer>", True, False), 2: ("(A)", True, True), 3: ("red", False, False),
              4: ("A", True, True)}),
    "MMBench_V11_MINI": (MCQ, [  # question 1 and two rotations (index + k * 1e6, image by reference), question 2 alone
        mcq(1, "C", hint="A hint.", category="ocr", **{"l2-category": "perception"}),
        {**mcq(1000001, "B", image="1", hint="A hint.", category="ocr", **{"l2-category": "perception"}),
         **dict(zip("ABCD", ["blue", "yellow", "red", "green"]))},
        {**mcq(2000001, "A", image="1", hint="A hint.", category="ocr", **{"l2-category": "perception"}),
         **dict(zip("ABCD", ["yellow", "red", "green", "blue"]))},
        mcq(2, "A", category="counting", **{"l2-category": "reasoning"})],
        {1: ("C. blue", True, True), 1000001: ("C", False, False), 2000001: ("The answer is A", True, True),
         2: ("red", True, True)}),
    "VStarBench": (MCQ, [mcq(1, "A", category="direct_attributes"), mcq(2, "B", n=2, category="relative_position")],
                   {1: ("The answer is A.", True, True), 2: ("**B**", False, True)}),
    "MME-RealWorld-Lite": (["index", "image", "question", "multi-choice options", "answer", "category", "l2-category"],
                           [mme(1, "E", "Perception/Autonomous_Driving"), mme(2, "D", "Reasoning/Monitoring")],
                           {1: ("(E) black", True, True), 2: ("Based on the image: D", True, False)}),
    "HRBench4K": (MCQ + ["cycle_category"], [mcq(1, "D", category="single", cycle_category="cycle1"),
                                             mcq(2, "A", category="cross", cycle_category="cycle1"),
                                             mcq(3, "B", category="single", cycle_category="cycle2")],
                  {1: ("yellow", True, True), 2: ("<answer>A</answer>", True, False), 3: ("B", True, True)}),
}


def write_tsv(path, columns, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return str(path)


def write_benchmarks(root):
    os.makedirs(root, exist_ok=True)
    for name, (columns, rows, _) in FIXTURES.items():
        write_tsv(os.path.join(root, f"{name}.tsv"), columns, rows)
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
    for s, (reply, lenient, vk) in zip(samples, replies.values()):
        assert benchmarks.is_correct(reply, s) is lenient, (s.id, reply)
        assert benchmarks.is_correct(reply, s, protocol="lenient") is lenient, (s.id, reply)
        assert benchmarks.is_correct(reply, s, protocol="vlmeval") is vk, (s.id, reply)


def test_prompts_are_vlmevalkits(bench_root):
    """The text of each dataset's build_prompt (image_mcq.py ImageMCQDataset / MMERealWorld, image_base.py)."""
    load = lambda name: benchmarks.load_benchmark(name, bench_root)  # noqa: E731
    mmb = load("MMBench_V11_MINI")
    assert benchmarks.prompt_text(mmb[0], "vlmeval") == (
        "Hint: A hint.\nQuestion: Question 1?\nOptions:\nA. red\nB. green\nC. blue\nD. yellow\n"
        "Please select the correct answer from the options above. \n")
    assert benchmarks.prompt_text(mmb[1], "vlmeval").endswith("Options:\nA. blue\nB. yellow\nC. red\nD. green\n"
                                                            "Please select the correct answer from the options above. \n")
    assert benchmarks.prompt_text(mmb[3], "vlmeval").startswith("Question: Question 2?\nOptions:\nA. red\n")
    assert benchmarks.prompt_text(mmb[0], "lenient") == mmb[0].question  # today's prompt stays the lenient one
    assert mmb[0].question.endswith("Answer with the option's letter.")
    mme = load("MME-RealWorld-Lite")[0]
    assert benchmarks.prompt_text(mme, "vlmeval") == (
        "What colour is sign 1? The choices are listed below:\n(A) red\n(B) green\n(C) blue\n(D) yellow\n(E) black\n"
        "Select the best answer to the above multiple-choice question based on the image. Respond with only the "
        "letter (A, B, C, D, or E) of the correct option. \nThe best answer is:")
    assert mme.choices == WORDS and mme.answer == "E"  # the list column gives the options for both protocols
    mv = load("MathVista_MINI")
    assert benchmarks.prompt_text(mv[0], "vlmeval") == FIXTURES["MathVista_MINI"][1][0]["question"]  # as is, once
    assert benchmarks.prompt_text(mv[0], "lenient").endswith("Choices:\n(A) 3\n(B) 4\n(C) 5\nA. 3\nB. 4\nC. 5\n"
                                                             "Answer with the option's letter.")
    assert mv[3].row["answer_option"] == "B"
    verse = load("MathVerse_MINI")[1]
    assert benchmarks.prompt_text(verse, "vlmeval") == "Find the length."
    assert benchmarks.prompt_text(load("HRBench4K")[0], "vlmeval").startswith("Question: Question 1?\nOptions:\nA. red")


def test_protocol_errors(bench_root, samples):
    s = benchmarks.load_benchmark("VStarBench", bench_root)[0]
    with pytest.raises(ValueError, match="unknown protocol 'gpt'"):
        benchmarks.is_correct("A", s, protocol="gpt")
    with pytest.raises(ValueError, match="protocol vlmeval is for the paper's seven"):
        benchmarks.prompt_text(samples[0], "vlmeval")  # a synthetic question
    assert benchmarks.prompt_text(samples[0], "lenient") == samples[0].question


def check_error(name, root, columns, rows, where, problem):
    path = write_tsv(os.path.join(root, f"{name}.tsv"), columns, rows)
    with pytest.raises(ValueError) as e:
        benchmarks.load_benchmark(name, str(root))
    msg = str(e.value)
    assert msg.startswith(f"{path}:{where}: " if where else f"{path}: ") and problem in msg and "\n" not in msg, msg


def test_rows_without_options_name_file_and_row(tmp_path):
    cols = ["index", "image", "question", "multi-choice options", "answer", "category", "l2-category"]
    rows = [mme(1, "A", "Perception/OCR"), {**mme(2, "B", "Perception/OCR"), "multi-choice options": ""}]
    check_error("MME-RealWorld-Lite", tmp_path, cols, rows, 3, "missing field 'multi-choice options'")
    rows[1]["multi-choice options"] = "(A) red (B) blue"
    check_error("MME-RealWorld-Lite", tmp_path, cols, rows, 3, "holds no options")
    rows[1]["multi-choice options"] = "['(A) red', '(C) blue']"
    check_error("MME-RealWorld-Lite", tmp_path, cols, rows, 3, "option B must start '(B) '")
    rows[1] = mme(2, "B", "Perception")
    check_error("MME-RealWorld-Lite", tmp_path, cols, rows, 3, "field 'category' must be 'Perception/<subtask>'")
    for name in vlmeval_rules.MCQ:
        bare = {"index": 1, "image": b64(1), "question": "Q?", "answer": "A", "cycle_category": "c"}
        check_error(name, tmp_path, MCQ + ["cycle_category"], [mcq(2, "A", category="single", cycle_category="c"), bare], 3,
                    "no options: columns A, B, ... hold fewer than 2")
    check_error("HRBench4K", tmp_path, MCQ, [mcq(1, "A", category="single")], 2, "missing field 'cycle_category'")
    mv = dict(FIXTURES["MathVista_MINI"][1][0], choices="")
    check_error("MathVista_MINI", tmp_path, FIXTURES["MathVista_MINI"][0], [mv], 2, "missing field 'choices'")
    mv = dict(FIXTURES["MathVista_MINI"][1][3], answer="cow")
    check_error("MathVista_MINI", tmp_path, FIXTURES["MathVista_MINI"][0], [mv], 2, "answer 'cow' is none of the choices")
    check_error("MMBench_V11_MINI", tmp_path, MCQ, [mcq("1x", "A", image=b64(1))], 2, "field 'index' must be an integer")
    check_error("MMVP", tmp_path, MCQ, [mcq(1, "A", question="P?"), mcq(2, "B", question="Q?")], None,
                "MMVP rows 1 and 2 are a pair but ask different questions")


def test_mmvp_is_scored_per_pair_too(bench_root):
    records = [{"id": f"MMVP-{i}", "qtype": "MMVP", "correct": ok, "opened": False}
               for i, (_, ok, _) in FIXTURES["MMVP"][2].items()]
    out = summary.summarize(records)
    assert out["overall"]["acc"] == 0.75 and out["overall"]["pair_acc"] == 0.5


def test_eval_one_benchmark_and_all(qwen_dir, bench_root, tmp_path, capsys):
    out = str(tmp_path / "one.json")
    ev.main(["--model", qwen_dir, "--bench", "HRBench4K", "--bench-root", bench_root, "--max-new-tokens", "3", "--out", out])
    res = json.load(open(out))
    assert res["protocol"] == "vlmeval"
    recs = res["records"]["normal"]
    assert [r["id"] for r in recs] == ["HRBench4K-1", "HRBench4K-2", "HRBench4K-3"]
    assert all({"lenient", "vlmeval", "judge", "vlmeval_pred"} <= set(r) and r["correct"] == r["vlmeval"] for r in recs)
    vk = res["summaries"]["normal"]["vlmeval"]
    assert vk["headline"] == "Average/all" and set(vk["metrics"]) >= {"cycle1/all", "cycle2/all", "Average/single"}
    assert vk["disagree"] == sum(r["lenient"] != r["vlmeval"] for r in recs)
    out = str(tmp_path / "all.json")
    ev.main(["--model", qwen_dir, "--bench", "all", "--bench-root", bench_root, "--max-new-tokens", "3", "--out", out])
    res = json.load(open(out))["benchmarks"]
    assert list(res) == list(benchmarks.PAPER)
    assert "pair_acc" in res["MMVP"]["summaries"]["normal"]["overall"]
    assert res["MMBench_V11_MINI"]["summaries"]["normal"]["vlmeval"]["n"] == 2  # two questions, four rows
    printed = capsys.readouterr().out
    table = printed.split("| benchmark |")[-1]
    assert "rule-decided" in table and all(f"| {name} |" in table for name in benchmarks.PAPER)
    assert "MathVerse_MINI (VLMEvalKit, judge-free; 2 of 2 would need its API judge)" in printed


def test_eval_lenient_protocol_and_pixels(qwen_dir, bench_root, tmp_path, monkeypatch):
    """--protocol lenient sends today's prompt at the checkpoint's own pixel bounds; vlmeval sends
    VLMEvalKit's text at min_pixels 1280*28*28 (a 28x28 image gets 36x36 merged tokens)."""
    seen = {}

    def fake(model, tok, samples, **kw):
        seen[kw["protocol"]] = ([s.question for s in samples], M.merged_grid((28, 28, 3), model), kw["max_new_tokens"])
        return [{"id": s.id, "qtype": s.qtype, "correct": False, "opened": False, "lenient": False, "vlmeval": False,
                 "vlmeval_pred": None, "judge": True} for s in samples]
    monkeypatch.setattr(ev, "evaluate", fake)
    for protocol in benchmarks.PROTOCOLS:
        ev.main(["--model", qwen_dir, "--bench", "VStarBench", "--bench-root", bench_root, "--protocol", protocol,
                 "--out", str(tmp_path / f"{protocol}.json")])
    s = benchmarks.load_benchmark("VStarBench", bench_root)
    assert seen["vlmeval"] == ([benchmarks.prompt_text(x, "vlmeval") for x in s], (36, 36), 2048)
    assert seen["lenient"] == ([x.question for x in s], (2, 2), 2048)  # min_pixels 3136: 56x56
    with pytest.raises(SystemExit, match="--protocol vlmeval is for the paper's seven"):
        ev.main(["--model", qwen_dir, "--bench", "tsv", "--bench-root", bench_root, "--protocol", "vlmeval"])


def test_bench_all_names_a_missing_file(qwen_dir, tmp_path, capsys):
    root = write_benchmarks(tmp_path / "some")
    os.remove(os.path.join(root, "VStarBench.tsv"))
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", qwen_dir, "--bench", "all", "--bench-root", root])
    assert str(e.value).startswith("error: file not found") and "VStarBench.tsv" in str(e.value)
