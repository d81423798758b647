"""VLMEvalKit's judge-free verdicts and metrics (vlmeval_rules.py), pure Python. Every expected verdict below
was derived by reading VLMEvalKit (open-compass/VLMEvalKit, 2026-08), not by running vlmeval_rules.py:
  MCQ: vlmeval/utils/matching_util.py can_infer -> can_infer_option (the letter as a word after
       .()[],:;!*#{} become spaces, exactly one, among the last four words; a refusal or lone Z -> Z;
       else "(correct) answer is X", X in A-D, any case) -> can_infer_text (exactly one option text in
       the lower-cased reply, reply at most twice the options' total length);
       vlmeval/dataset/utils/multiple_choice.py mcq_vanilla_eval / mcq_circular_eval, report_acc,
       report_acc_MMVP.
  MME-RealWorld: vlmeval/dataset/image_mcq.py MMERealWorld.evaluate (the <answer> content upper-cased)
       + multiple_choice.py extract_characters_regex (prefixes removed, first capital A-E, else the
       "(A)".."(E)" containing the reply) and get_dimension_rating.
  MathVista: vlmeval/dataset/utils/mathvista.py post_check(prefetch=True) and MathVista_acc.
  MathVerse: vlmeval/dataset/utils/mathverse.py post_check_score and MathVerse_acc.
  HRBench: vlmeval/dataset/utils/hrbench.py report_acc_hrbench / hrbench_score.
The "lenient" column is today's checker (benchmarks.is_correct, the RL reward), read from benchmarks.py."""
import pytest

import benchmarks
import vlmeval_rules

T, F = True, False


def sample(bench, row, choices=(), answer=None):
    return benchmarks.BenchSample(question="Q?", answer=answer or row["answer"], reason="", qtype="x", bboxes=[],
                                  choices=list(choices), bench=bench, row=row)


# ---------------------------------------------------------------------------- multiple choice
# (reply template, letter can_infer reads, letter the lenient checker reads); {L} the letter, {l} it in
# lower case, {T} its option's text, {M} / {U} the next option's letter / text. None: no answer read.
MCQ_FORMS = [
    ("{L}", "L", "L"),                          # a lone letter
    ("({L})", "L", "L"),
    ("{L}.", "L", "L"),
    ("**{L}**", "L", None),                     # '*' is one of can_infer_option's separators; lenient: no letter
    ("$\\text{{{L}}}$", "L", None),             # '{' '}' are separators: "$\text", "L", "$"
    ("The answer is {L}.", "L", "L"),
    ("{L}. {T}", "L", "L"),
    ("{T}", "L", "L"),                          # can_infer_text: one option's text
    ("{L} or {M}", None, "M"),                  # two letters: can_infer_option gives up; lenient takes the last
    ("<answer>{L}</answer>", None, "L"),        # '<' '>' '/' are no separators: one word, no letter
    ("The correct answer is {L}, not {M}.", "L", "M"),  # two letters, then the verbose "answer is X" rule
    ("{T} or {U}", None, None),                 # two option texts
    ("Answer: {L}", "L", "L"),
    ("A {T} car.", "A", "L"),                   # the article "A" is a lone letter word near the end
    ("Z", "Z", None),                           # can_infer_option's "Z" (never an answer)
    ("Cannot determine the answer", "Z", None),  # a refusal string
    ("{L} is my choice because the picture clearly shows it in the whole scene", None, None),  # letter too early
    ("The answer is {l}", "L", None),           # the verbose rule ignores case; lenient wants a capital
]


def fill(template, letters, texts, i):
    j = (i + 1) % len(letters)
    return template.format(L=letters[i], l=letters[i].lower(), T=texts[i], M=letters[j], U=texts[j])


def pick(rule, letters, i):
    return {"L": letters[i], "M": letters[(i + 1) % len(letters)], None: None}.get(rule, rule)


def mcq_table(bench, option_sets):
    """(reply, sample, vlmeval verdict, lenient verdict): every form x every option's letter x two
    answers (that letter, the next)."""
    table = []
    for texts in option_sets:
        letters = "ABCDE"[:len(texts)]
        for template, vk, lenient in MCQ_FORMS:
            for i in range(len(letters)):
                for answer in (letters[i], letters[(i + 1) % len(letters)]):
                    row = {"question": "Q?", **dict(zip(letters, texts)), "answer": answer, "index": 1, "g_index": 1}
                    table.append((fill(template, letters, texts, i), sample(bench, row, texts),
                                  pick(vk, letters, i) == answer, pick(lenient, letters, i) == answer))
    return table


# MME-RealWorld: (template, letter extract_characters_regex reads, lenient letter)
MME_FORMS = [
    ("{L}", "L", "L"),
    ("({L}) {T}", "L", "L"),
    ("The best answer is {L}", "L", "L"),       # the prefix is removed first
    ("Because {T} fits, {L}", "B", "L"),        # the first capital A-E anywhere: "Because"
    ("<answer>{L}</answer>", "L", "L"),
    ("<answer>{T}</answer>", "first capital of {T} upper-cased", "L"),  # the tag's content is upper-cased
    ("{T}", None, "L"),                         # no capital A-E, and "red" is in no "(a)".."(e)"
    ("", "A", None),                            # an empty reply is inside "(a)"
    ("{l}", "L", None),                         # "b" is inside "(b)"
    ("I choose {L}", "L", "L"),
    ("Definitely {L}", "D", "L"),
    ("{L} or {M}", "L", "M"),
    ("None of the options is right, it looks like something else entirely to me honestly", None, None),
    ("The answer is ({L})", "L", "L"),
    ("Option {L}.", "L", "L"),
]


def mme_table():
    texts, letters, table = ["red", "green", "blue", "yellow", "black"], "ABCDE", []
    for template, vk, lenient in MME_FORMS:
        for i in range(5):
            for answer in (letters[i], letters[(i + 1) % 5]):
                row = {"question": "Q?", **dict(zip(letters, texts)), "answer": answer}
                got = next(c for c in texts[i].upper() if c in "ABCDE") if vk and vk.startswith("first") else pick(vk, letters, i)
                table.append((fill(template, letters, texts, i), sample("MME-RealWorld-Lite", row, texts),
                              got == answer, pick(lenient, letters, i) == answer))
    return table


# MathVista free-form: (answer_type, answer, precision, reply, VLMEvalKit verdict, lenient verdict)
MATHVISTA_FREE = [
    ("integer", "12", None, "12", T, T), ("integer", "12", None, " 12\n", T, T),
    ("integer", "12", None, "12.0", F, T),          # int("12.0") fails: to the judge
    ("integer", "12", None, "The answer is 12", F, T), ("integer", "12", None, "\\boxed{12}", F, T),
    ("integer", "12", None, "13", F, F), ("integer", "12", None, "+12", T, T),
    ("integer", "12", None, "1_2", T, F),           # Python's int() reads "1_2" as 12
    ("integer", "12", None, "012", T, T), ("integer", "12", None, "twelve", F, F), ("integer", "12", None, "12 cm", F, T),
    ("float", "1.5", 1, "1.5", T, T), ("float", "1.5", 1, "1.50", T, T),
    ("float", "1.5", 1, "1.54", F, T),              # exact equality; the precision column is unused
    ("float", "1.5", 1, "1.5e0", T, F), ("float", "1.5", 1, "x = 1.5", F, T), ("float", "1.5", 1, "3/2", F, F),
    ("float", "1.5", 1, " 1.5 ", T, T), ("float", "1.5", 1, "1.6", F, F), ("float", "1.5", 1, "inf", F, F),
    ("float", "0.25", None, "0.25", T, T), ("float", "0.25", None, ".25", T, T), ("float", "0.25", None, "1/4", F, F),
    ("text", "Yes", None, "Yes", F, T),             # text answers always go to the judge
    ("text", "Yes", None, "yes", F, T), ("text", "Yes", None, "No", F, F),
    ("text", "None", None, "anything", T, F),       # str(None) == "None": post_check's quirk
    ("list", "[2007, 2008]", None, "[2007, 2008]", F, T), ("list", "[2007, 2008]", None, "2007", F, F),
]


def mathvista_table():
    texts = ["cat", "dog", "cow", "pig"]
    table = [(reply, sample("MathVista_MINI", {**row, "question_type": "multi_choice", "choices": str(texts),
                                                "answer_option": row["answer"], "answer": texts["ABCD".index(row["answer"])]},
                            texts, row["answer"]), vk, lenient)
             for reply, s, vk, lenient in mcq_table("MathVista_MINI", [texts]) for row in [s.row]]
    for kind, answer, precision, reply, vk, lenient in MATHVISTA_FREE:
        row = {"question": "Q?", "answer": answer, "question_type": "free_form", "answer_type": kind}
        s = sample("MathVista_MINI", row)
        s.precision = precision
        table.append((reply, s, vk, lenient))
    return table


# MathVerse: the reply itself stands for the judge's extraction; post_check_score: stripped equality
MATHVERSE_LETTER = [("{L}", T, T), (" {L}\n", T, T), ("({L})", F, T), ("{L}.", F, T), ("<answer>{L}</answer>", F, T),
                    ("{L}:60", F, F), ("{l}", F, F), ("The answer is {L}", F, T), ("{M}", F, F), ("**{L}**", F, F)]
MATHVERSE_NUMBER = [("{x}", T, T), ("{x}.0", F, T), ("x = {x}", F, T), ("\\boxed{{{x}}}", F, T), ("{y}", F, F),
                    (" {x} ", T, T), ("about {x} units", F, T), ("{x} cm", F, T)]
MATHVERSE_TEXT = [("2\\sqrt{3}", "2\\sqrt{3}", T, T), ("2√3", "2\\sqrt{3}", F, F), ("y = 2x + 1", "y=2x+1", F, T),
                  ("(-2, 1]", "(-2, 1]", T, T), ("(-2,1]", "(-2, 1]", F, T)]


def mathverse_table():
    table = []
    for template, vk, lenient in MATHVERSE_LETTER:
        for i, letter in enumerate("ABCDE"):
            reply = template.format(L=letter, l=letter.lower(), M="ABCDE"[(i + 1) % 5])
            table.append((reply, sample("MathVerse_MINI", {"question": "Q?", "answer": letter}), vk, lenient))
    for template, vk, lenient in MATHVERSE_NUMBER:
        for x in (5, 12, 30, 100, 64, 7):
            row = {"question": "Q?", "answer": str(x)}
            table.append((template.format(x=x, y=x + 1), sample("MathVerse_MINI", row), vk, lenient))
    table += [(reply, sample("MathVerse_MINI", {"question": "Q?", "answer": answer}), vk, lenient)
              for reply, answer, vk, lenient in MATHVERSE_TEXT]
    return table


FOUR = [["red", "green", "blue", "yellow"]]
TABLES = {
    "MMVP": lambda: mcq_table("MMVP", [["red", "green"], ["blue", "yellow"]]),  # MMVP rows have two options
    "MMBench_V11_MINI": lambda: mcq_table("MMBench_V11_MINI", FOUR),
    "VStarBench": lambda: mcq_table("VStarBench", FOUR),
    "HRBench4K": lambda: mcq_table("HRBench4K", FOUR),
    "MME-RealWorld-Lite": mme_table,
    "MathVista_MINI": mathvista_table,
    "MathVerse_MINI": mathverse_table,
}


@pytest.mark.parametrize("bench", vlmeval_rules.PAPER)
def test_verdict_tables(bench):
    table = TABLES[bench]()
    assert len(table) >= 100
    for reply, s, vk, lenient in table:
        assert benchmarks.is_correct(reply, s, protocol="vlmeval") is vk, (bench, reply, s.row)
        assert benchmarks.is_correct(reply, s) is lenient, (bench, reply, s.row)
    assert sum(vk != lenient for _, _, vk, lenient in table) > 0  # the two checkers do differ on every benchmark


def disagreements() -> dict:
    """{benchmark: (replies, replies the two verdicts differ on)} over the tables (the README's figures)."""
    return {b: (len(t), sum(vk != lenient for _, _, vk, lenient in t)) for b, t in ((b, TABLES[b]()) for b in vlmeval_rules.PAPER)}


def test_judge_flags_and_reply_cleaning():
    row = {"question": "Q?", "A": "red", "B": "green", "answer": "B"}
    assert vlmeval_rules.verdict("VStarBench", "B", row) == {"pred": "B", "correct": True, "judge": False}
    assert vlmeval_rules.verdict("VStarBench", "A", row)["judge"] is False  # read, wrong: decided by the rules
    assert vlmeval_rules.verdict("VStarBench", "B or A", row)["judge"] is True  # unread: VLMEvalKit asks its judge
    assert vlmeval_rules.verdict("VStarBench", "Failed to obtain answer via API", row)["pred"] is None
    # decoded with skip_special_tokens: a latent span and end tokens leave nothing behind
    s = sample("VStarBench", row, ["red", "green"])
    assert benchmarks.is_correct("<|lvr_start|><|lvr|><|lvr|><|lvr_end|>B<|im_end|>", s, protocol="vlmeval")
    mv = {"question": "Q?", "answer": "12", "question_type": "free_form", "answer_type": "integer"}
    assert vlmeval_rules.verdict("MathVista_MINI", "<|lvr_start|><|lvr|><|lvr_end|>12", mv)["correct"]
    assert vlmeval_rules.verdict("MathVista_MINI", "13", mv)["judge"] and not vlmeval_rules.verdict("MathVista_MINI", "12", mv)["judge"]
    assert vlmeval_rules.verdict("MathVerse_MINI", "12", mv)["judge"]  # every MathVerse reply goes to its extraction judge
    assert not vlmeval_rules.verdict("MME-RealWorld-Lite", "", {"answer": "B"})["judge"]  # MME-RealWorld never asks one


def test_pandas_missing_values_and_mme_block():
    """VLMEvalKit reads TSVs with pandas: "None", "NA", "nan" cells are missing (smp/file.py load)."""
    row = {"question": "Q?", "hint": "nan", "A": "yes", "B": "None", "C": "NA", "answer": "A"}
    assert vlmeval_rules.options(row) == {"A": "yes"}
    assert vlmeval_rules.prompt("MMVP", row) == "Question: Q?\nOptions:\nA. yes\nPlease select the correct answer from the options above. \n"
    assert vlmeval_rules.prompt("MMVP", {"question": "Q?", "answer": "x"}) == "Question: Q?\n"  # no options: no option block
    block = "The choices are listed below:\n(A) 1\n(B) 2"  # the full MME-RealWorld TSV holds the block already
    assert vlmeval_rules.mme_options(block) == (block, ["1", "2"]) == vlmeval_rules.mme_options("['(A) 1', '(B) 2']")


# ------------------------------------------------------------------------------------ aggregation
def v(pred, correct, judge=False):
    return {"pred": pred, "correct": correct, "judge": judge}


def test_mmbench_circular():
    rows = [{"index": i, "g_index": i % 1_000_000, "answer": a, "category": c, "l2-category": l2}
            for i, a, c, l2 in [(1, "A", "ocr", "perception"), (1000001, "B", "ocr", "perception"),
                                (2, "C", "ocr", "perception"), (1000002, "D", "ocr", "perception"),
                                (3, "A", "count", "reasoning"), (1000003, "C", "count", "reasoning"),
                                (4, "B", "count", "reasoning")]]
    verdicts = [v("A", T), v("B", T),            # question 1: both rotations right -> 1
                v("C", T), v(None, F, True),     # question 2: a rotation unread -> 0, would go to the judge
                v("A", T), v("D", F),            # question 3: a rotation read wrong -> 0, decided
                v("B", T)]                        # question 4: no rotation in this table -> its row alone
    out = vlmeval_rules.report("MMBench_V11_MINI", rows, verdicts)
    assert out["n"] == 4 and out["judge"] == 1 and out["decided"] == 0.75
    assert out["metrics"] == {"Overall": 0.5, "perception": 0.5, "reasoning": 0.5, "count": 0.5, "ocr": 0.5}
    assert sum(x["correct"] for x in verdicts) / len(verdicts) == 5 / 7  # what plain accuracy would say


def test_mmvp_pairs_hrbench_cycles_and_report_acc():
    rows = [{"index": i, "question": f"P{(i + 1) // 2}"} for i in (4, 3, 2, 1)]  # pairs by index order, any row order
    out = vlmeval_rules.report("MMVP", rows, [v("A", T), v("A", T), v("A", F), v("A", T)])
    assert out["metrics"] == {"Overall": 0.5, "Average": 0.75}
    with pytest.raises(ValueError, match="got 3 rows"):
        vlmeval_rules.report("MMVP", rows[:3], [v("A", T)] * 3)
    rows = [{"cycle_category": c, "category": k} for c, k in
            [("cycle1", "single"), ("cycle1", "single"), ("cycle1", "cross"), ("cycle2", "single"), ("cycle2", "single")]]
    out = vlmeval_rules.report("HRBench4K", rows, [v("A", x) for x in (T, F, T, T, T)])
    assert out["metrics"] == {"cycle1/all": 2 / 3, "cycle1/cross": 1.0, "cycle1/single": 0.5, "cycle2/all": 1.0,
                              "cycle2/single": 1.0, "Average/all": (2 / 3 + 1) / 2, "Average/cross": 0.5,  # 1.0 / 2 cycles
                              "Average/single": 0.75}
    assert out["headline"] == "Average/all"
    rows = [{"category": c, "split": s} for c, s in [("a", "dev"), ("b", "dev"), ("a", "test")]]
    assert vlmeval_rules.report("VStarBench", rows, [v("A", T), v("A", F), v("A", F)])["metrics"] == {
        "dev/Overall": 0.5, "dev/a": 1.0, "dev/b": 0.0, "test/Overall": 0.0, "test/a": 0.0}


def test_mme_mathvista_mathverse_metrics():
    rows = [{"category": c} for c in ["Perception/OCR", "Perception/OCR", "Perception/Remote Sensing", "Reasoning/OCR"]]
    out = vlmeval_rules.report("MME-RealWorld-Lite", rows, [v("A", x) for x in (T, T, F, T)])
    assert out["metrics"] == {"Overall": 0.75, "Perception": 2 / 3, "Perception/OCR": 1.0, "Perception/Remote Sensing": 0.0,
                              "Reasoning": 1.0, "Reasoning/OCR": 1.0}
    assert out["judge"] == 0 and out["decided"] == 1.0
    rows = [{"task": "geometry", "skills": "['algebraic', 'geometry']"}, {"task": "geometry", "skills": "['geometry']"},
            {"task": "figure qa", "skills": "statistical"}]  # not a list literal: the cell itself (MathVista_acc)
    out = vlmeval_rules.report("MathVista_MINI", rows, [v("A", T), v(None, F, True), v("B", F)])
    assert out["metrics"] == {"Overall": 1 / 3, "geometry": 0.5, "algebraic": 1.0, "figure qa": 0.0, "statistical": 0.0}
    assert (out["judge"], out["n"]) == (1, 3)
    rows = [{"problem_version": p, "metadata": m} for p, m in [
        ("Vision Only", "{'subject': 'plane geometry', 'subfield': 'angle'}"),
        ("Vision Only", "{'subject': 'plane geometry', 'subfield': 'length'}"),
        ("Text Lite", "{'subject': 'functions', 'subfield': 'angle'}")]]
    out = vlmeval_rules.report("MathVerse_MINI", rows, [v("x", T, True), v("x", F, True), v("x", F, True)])
    assert out["metrics"] == {"all versions": 1 / 3, "Text Lite/Overall": 0.0, "Text Lite/functions": 0.0,
                              "Text Lite/angle": 0.0, "Vision Only/Overall": 0.5, "Vision Only/plane geometry": 0.5,
                              "Vision Only/angle": 1.0, "Vision Only/length": 0.0}
    assert out["decided"] == 0.0
    with pytest.raises(ValueError, match="field 'category' must be"):
        vlmeval_rules.report("MME-RealWorld-Lite", [{"category": "OCR"}], [v("A", T)])
