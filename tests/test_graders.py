"""data/graders: gold solutions of the real benchmarks grade as correct, perturbed ones as wrong."""
import warnings
from fractions import Fraction

import pytest
from conftest import shared_data

from data.graders import GRADERS, Grade, grade_batch
from data.graders import gsm8k, math
from data.readers import load_gsm8k, load_humaneval, load_math
from data.synthetic import code_specs, make_code_tasks


# ---- gsm8k ----

def test_gsm8k_gold_solutions_score_all_and_changed_answers_none():
    rows = load_gsm8k(shared_data("gsm8k/test.jsonl"))
    assert sum(gsm8k.grade(r["answer"], r["reference"]).score for r in rows) == 1319
    wrong = 0.0
    for r in rows:
        body, _, final = r["answer"].rpartition("####")
        changed = Fraction(final.strip().replace(",", "")) + 1
        wrong += gsm8k.grade(f"{body}#### {changed}", r["reference"]).score
    assert wrong == 0


@pytest.mark.parametrize("completion, expected, rule", [
    ("She pays 1,000 dollars in total.\n#### 1,000", "1000", "####"),
    ("#### $5.", "5", "####"),
    ("#### 3.50", "3.5", "####"),
    ("#### -7 degrees", "-7", "####"),
    ("#### 42\n\nQuestion: next one?\nAnswer: #### 3", "42", "####"),  # run-on few-shot: first ####
    ("The answer is \\boxed{12} apples, not 13.", "12", "boxed"),
    ("16-3-4=9 eggs, so 9 * 2 = 18 dollars.", "18", "last number"),
    ("It costs $1,234.5.", "1234.5", "last number"),
    ("First 1,2,3 then 12.", "12", "last number"),
])
def test_gsm8k_extraction(completion, expected, rule):
    value, found_by = gsm8k.extract_answer(completion)
    assert (gsm8k.format_number(value), found_by) == (expected, rule)


def test_gsm8k_numeric_comparison():
    assert gsm8k.grade("#### 3.50", "3.5") == Grade(1.0, "3.5", "####")
    assert gsm8k.grade("the total is 1,000.", "1000").score == 1.0
    assert gsm8k.grade("#### 999", "1000").score == 0.0
    assert gsm8k.grade("16 - 3 = 13 so -13", "-13").score == 1.0
    assert gsm8k.grade("no digits here", "5") == Grade(0.0, None, "no number found")


# ---- math ----

def test_math500_gold_solutions_grade_correct():
    rows = load_math(shared_data("math500/test.jsonl"))
    misses = [(r["id"], r["reference"], g) for r in rows if (g := math.grade(r["solution"], r["reference"])).score < 1]
    for miss in misses:  # a warning, so the misses show in pytest's summary even when the test passes
        warnings.warn(f"MATH-500 miss: {miss}")
    assert len(misses) <= 5  # >= 99% of 500 (0 misses at the time of writing)


@pytest.mark.parametrize("answer, reference", [
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("x=3", "3"),
    ("[2, 5)", "[2,5)"),
    ("[0.5, 1)", "[\\frac{1}{2},1)"),
    ("(-\\infty, -2] \\cup [3, \\infty)", "(-\\infty,-2]\\cup[3,\\infty)"),
    ("10\\%", "10"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
])
def test_math_known_equivalences(answer, reference):
    assert math.grade(f"so the answer is $\\boxed{{{answer}}}$.", reference).score == 1.0


@pytest.mark.parametrize("answer, reference", [("0.25", "\\frac{1}{2}"), ("[2,5]", "[2,5)"), ("x=4", "3"),
                                               ("(-\\infty, 3)", "(-\\infty,3]")])
def test_math_non_equivalences(answer, reference):
    assert math.grade(f"\\boxed{{{answer}}}", reference).score == 0.0


def test_last_boxed_nesting_fbox_and_unbalanced():
    assert math.last_boxed("\\boxed{1} then \\boxed{\\frac{a^{2}}{b}}") == "\\frac{a^{2}}{b}"
    assert math.last_boxed("\\fbox{7}") == "7"
    assert math.last_boxed("$\\boxed 5$") == "5"
    assert math.last_boxed("\\boxed{\\frac{1}{2") is None
    assert math.grade("no box, just 5", "5") == Grade(0.0, None, "no \\boxed{} answer")


def test_math_falls_back_to_string_match_when_math_verify_fails(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RecursionError("sympy blew up")
    monkeypatch.setattr(math_verify, "parse", broken)
    assert math.grade("\\boxed{\\dfrac{1}{2}}", "\\frac12") == Grade(
        0.0, "\\dfrac{1}{2}", "math_verify failed: RecursionError; string match")
    assert math.grade("\\boxed{ \\left(1,2\\right) }", "(1, 2)").score == 1.0  # normalised strings agree


def test_math_falls_back_to_string_match_when_math_verify_cannot_parse(monkeypatch):
    import math_verify
    monkeypatch.setattr(math_verify, "parse", lambda *args, **kwargs: [])  # what parse returns on failure
    assert math.grade("\\boxed{\\text{Monday}}", "\\text{Monday}") == Grade(
        1.0, "\\text{Monday}", "math_verify could not parse the reference; string match")


def test_math_empty_box_is_wrong_not_an_error():
    assert math.grade("\\boxed{}", "5").score == 0.0


def test_math_works_in_worker_threads():
    """math_verify's signal timeouts only work on the main thread; the grader must not raise elsewhere."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        grades = list(pool.map(lambda a: math.grade(f"\\boxed{{{a}}}", "\\frac{1}{2}"), ["0.5", "1/2", "0.3"]))
    assert [g.score for g in grades] == [1.0, 1.0, 0.0]


# ---- code (HumanEval through the sandbox) ----

def test_humaneval_canonical_solutions_pass_and_stub_bodies_fail():
    rows = load_humaneval(shared_data("humaneval/HumanEval.jsonl.gz"))
    references = [r["reference"] for r in rows]
    canonical = grade_batch("code", [r["canonical_solution"] for r in rows], references)
    failed = [(r["task_id"], g.note) for r, g in zip(rows, canonical) if g.score != 1.0]
    assert failed == []
    stubs = grade_batch("code", ["    pass\n"] * len(rows), references)
    passed = [r["task_id"] for r, g in zip(rows, stubs) if g.score != 0.0]
    assert passed == []
    assert stubs[0].note == "failed: AssertionError"  # HumanEval/0: None == True fails the first assert


def test_synthetic_code_canonical_solutions_pass_and_stub_bodies_fail():
    tasks = make_code_tasks(seed=0, n=len(code_specs()))
    assert [g.note for g in grade_batch("code", [t["canonical_solution"] for t in tasks], tasks)] == ["passed"] * 49
    assert [g.score for g in grade_batch("code", ["    pass\n"] * len(tasks), tasks)] == [0.0] * 49


def test_registry_and_batch_length_check():
    assert set(GRADERS) == {"gsm8k", "math", "code"}
    assert [g.score for g in grade_batch("gsm8k", ["#### 1", "#### 2"], ["1", "1"])] == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        grade_batch("gsm8k", ["a", "b"], ["1"])
