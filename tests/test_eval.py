"""eval.py end to end: the grade-only CLI, and main() with a tiny random model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import eval as evaluation
from data.readers import load_humaneval
from trainer_helpers import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


# ---- grade-only CLI ----

def test_grade_only_cli_end_to_end(tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"work\n#### {a}"}) + "\n"
                            for i, a in enumerate(["5", "10", "1,000"])))
    samples = {0: ["#### 5", "#### 6", "#### 5", "#### 7"],
               1: ["#### 3", "#### 3", "#### 10", "the answer is 10"],
               2: ["1,000 dollars", "#### 1000.0", "#### 999", "no number"]}
    completions = tmp_path / "completions.jsonl"
    completions.write_text("".join(json.dumps({"id": i, "completion": c}) + "\n" for i, cs in samples.items() for c in cs))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "eval.py", "--task", "gsm8k", "--data", str(data),
                             "--completions", str(completions), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    # Each problem has c=2 correct of n=4: pass@1 = 2/4, pass@2 = 1 - C(2,2)/C(4,2) = 5/6, pass@4 = 1.
    assert summary["problems"] == 3 and summary["samples_per_problem"] == 4
    # pass@3 = 1 - C(2,3)/C(4,3) = 1: every 3 of the 4 samples hold a correct one.
    assert [summary[f"pass@{k}"] for k in (1, 2, 3, 4)] == pytest.approx([0.5, 5 / 6, 1.0, 1.0])
    # maj@k: problem 0 votes 5 (right) for every k; problem 1 votes 3 (k=1, 2, 3) then ties 3-3 vs
    # 10-10 and keeps the first seen, 3 (wrong); problem 2 votes 1000 (right): 2/3 for every k.
    assert [summary[f"maj@{k}"] for k in (1, 2, 3, 4)] == pytest.approx([2 / 3] * 4)
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 12 and [r["score"] for r in records[8:]] == [1.0, 1.0, 0.0, 0.0]
    assert records[9]["extracted"] == "1000" and records[11]["extracted"] is None
    assert "pass@2" in result.stdout and "pass@3" not in result.stdout  # the table shows k = 1, 2, 4


# ---- main() with a tiny random model ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny-student checkpoint with a tokenizer trained on the synthetic task, saved in one dir."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_main_with_model_and_code_task(tiny, tmp_path):
    """main() loads the saved checkpoint and tokenizer (check_vocab included) and grades in the sandbox."""
    _, _, paths, model_dir = tiny
    summary = evaluation.main(["--model", str(model_dir), "--task", "synthetic-code", "--data", str(paths["code"]),
                               "--max-new-tokens", "4", "--batch-size", "1", "--device", "cpu", "--style", "fewshot",
                               "--out", str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["problems"] == 2 and summary["samples_per_problem"] == 1 and 0.0 <= summary["pass@1"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["Synthetic/0", "Synthetic/1"]
    # Base-model code prompts are the raw function prompt (Codex protocol), not "Question: ...".
    assert [r["prompt"] for r in records] == [row["prompt"] for row in load_humaneval(paths["code"])]
    # The sampling flags reach SamplingParams, --limit keeps the first K problems.
    sampled = evaluation.main(["--model", str(model_dir), "--task", "synthetic-code", "--data", str(paths["code"]),
                               "--max-new-tokens", "3", "--device", "cpu", "--style", "fewshot", "--limit", "1",
                               "--n-samples", "3", "--temperature", "0.7", "--top-p", "0.9", "--seed", "5"])
    expected = {"problems": 1, "samples_per_problem": 3, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 3, "seed": 5}
    assert {key: sampled[key] for key in expected} == expected
    assert [f"pass@{k}" in sampled for k in (1, 2, 3, 4)] == [True, True, True, False]
    with pytest.raises(ValueError, match="identical greedy samples"):  # n > 1 greedy samples is refused
        evaluation.parse_args(["--model", "m", "--task", "gsm8k", "--data", "d", "--n-samples", "4"])
