"""rl/rewards.py: the gsm8k grader on real GSM8K rows, format and DAPO length rewards, weighting."""
import pytest
import torch
from conftest import shared_data

from data.readers import load_gsm8k
from model.generate import Completion
from rl.rewards import RewardFn, compute_rewards, correctness, format_match, overlong_penalty


def _completion(text, n_tokens=3, finish_reason="stop"):
    return Completion(prompt_index=0, sample_index=0, tokens=list(range(n_tokens)), logprobs=[0.0] * n_tokens,
                      logprobs_t1=[0.0] * n_tokens, finish_reason=finish_reason, text=text)


def test_correctness_on_real_gsm8k_rows():
    rows = load_gsm8k(shared_data("gsm8k/test.jsonl"))[:20]
    right = [_completion(row["answer"]) for row in rows]  # the reference solutions end in "#### N"
    wrong = [_completion(row["answer"].rpartition("####")[0] + f"#### {float(row['reference']) + 1:g}") for row in rows]
    refs = [row["reference"] for row in rows]
    score = correctness("gsm8k")
    assert score(right, refs) == [1.0] * 20
    assert score(wrong, refs) == [0.0] * 20


def test_correctness_on_real_math_and_humaneval_rows_and_the_synthetic_code_task():
    """The math grader (math-verify) on MATH-500 solutions, the code grader (sandbox) on HumanEval's and the
    synthetic code task's canonical solutions, each against a wrong completion."""
    from data.readers import load_humaneval, load_math
    from data.synthetic import make_code_tasks
    math_rows = load_math(shared_data("math500/test.jsonl"))[:10]
    math_score = correctness("math")
    refs = [row["reference"] for row in math_rows]
    assert math_score([_completion(row["solution"]) for row in math_rows], refs) == [1.0] * 10
    assert math_score([_completion("so \\boxed{\\text{none}}") for _ in math_rows], refs) == [0.0] * 10
    code_rows = load_humaneval(shared_data("humaneval/HumanEval.jsonl.gz"))[:3] + make_code_tasks(seed=0, n=2)
    code_score = correctness("code", workers=2)
    # a code reference is the HumanEval-format row itself (prompt, test, entry_point)
    assert code_score([_completion(row["canonical_solution"]) for row in code_rows], code_rows) == [1.0] * 5
    assert code_score([_completion("    pass\n") for _ in code_rows], code_rows) == [0.0] * 5


def test_format_match():
    fn = format_match(r"#### -?\d+")
    assert fn([_completion("so #### 12"), _completion("answer 12"), _completion("#### x")], [None] * 3) == [1.0, 0.0, 0.0]


def test_overlong_penalty_hand_numbers():
    # max 10 tokens, buffer 4: free up to 6 tokens, then (6 - L) / 4 down to -1 at L = 10.
    fn = overlong_penalty(max_new_tokens=10, buffer=4)
    lengths = [1, 6, 7, 8, 10]
    assert fn([_completion("", n) for n in lengths], [None] * 5) == [0.0, 0.0, -0.25, -0.5, -1.0]
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(max_new_tokens=10, buffer=11)


def test_weighted_total_and_per_function_columns():
    completions = [_completion("#### 3", 9), _completion("no answer", 2)]
    fns = [RewardFn("format", format_match(r"####"), weight=0.5),
           RewardFn("length", overlong_penalty(10, 4), weight=2.0)]
    total, per_fn = compute_rewards(fns, completions, [None, None])
    torch.testing.assert_close(per_fn["format"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(per_fn["length"], torch.tensor([-0.75, 0.0]))
    torch.testing.assert_close(total, torch.tensor([0.5 * 1.0 + 2.0 * -0.75, 0.0]))


def test_errors():
    fn = RewardFn("format", format_match("x"))
    with pytest.raises(ValueError, match="unique"):
        compute_rewards([fn, fn], [_completion("x")], [None])
    with pytest.raises(ValueError, match="references"):
        compute_rewards([fn], [_completion("x")], [None, None])
    with pytest.raises(ValueError, match="tokenizer"):
        compute_rewards([fn], [_completion(None)], [None])
    with pytest.raises(ValueError, match="unknown grader"):
        correctness("gsm9k")
