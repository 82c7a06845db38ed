"""data/tasks.py: grade-only inputs, scoring with pass@k, stop strings and graded text per task and style."""
import json

import pytest

import data.tasks as task_registry
from data.readers import load_gsm8k, load_humaneval
from data.synthetic import write_splits


def test_grade_only_rejects_unknown_id(tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    completions = tmp_path / "c.jsonl"
    completions.write_text('{"id": 0, "completion": "1"}\n{"id": 5, "completion": "1"}\n')
    rows = load_gsm8k(data)
    with pytest.raises(ValueError, match=r"c.jsonl:2: field 'id' 5 matches no row"):
        task_registry.read_completions(completions, rows)


def test_grade_only_ids_are_task_ids_for_code(tmp_path):
    tasks = write_splits(tmp_path, seed=0, n_train=1, n_test=1, n_harder=1, n_code=3)["code"]
    rows = load_humaneval(tasks)
    completions = tmp_path / "c.jsonl"
    completions.write_text("".join(json.dumps({"id": i, "completion": c}) + "\n" for i, c in
                                   [("Synthetic/2", "a"), ("Synthetic/0", "b"), ("Synthetic/2", "c")]))
    used, texts = task_registry.read_completions(completions, rows)
    assert [row["id"] for row in used] == ["Synthetic/0", "Synthetic/2"] and texts == [["b"], ["a", "c"]]
    completions.write_text('{"id": 0, "completion": "a"}\n')  # a row index is not a HumanEval id
    with pytest.raises(ValueError, match=r"c.jsonl:1: field 'id' 0 matches no row"):
        task_registry.read_completions(completions, rows)


def test_grade_only_code_task(tmp_path):
    tasks = write_splits(tmp_path, seed=0, n_train=1, n_test=1, n_harder=1, n_code=2)["code"]
    rows = load_humaneval(tasks)
    completions = [[rows[0]["canonical_solution"], "    return None\n"], [rows[1]["canonical_solution"]] * 2]
    records, summary = task_registry.score(rows, "synthetic-code", completions, workers=2)
    assert [r["score"] for r in records] == [1.0, 0.0, 1.0, 1.0]
    assert summary["pass@1"] == pytest.approx(0.75) and summary["pass@2"] == pytest.approx(1.0)
    assert "maj@1" not in summary  # code has no extracted answer to vote on


def test_prompt_formats_and_graded_text():
    assert task_registry.stop_strings("humaneval", "fewshot") == task_registry.CODE_STOP_STRINGS
    assert task_registry.stop_strings("gsm8k", "fewshot") == ("\n\nQuestion:",)
    assert task_registry.stop_strings("humaneval", "chat") == ()
    # fewshot answers follow "Answer:" after a space; raw code continuations keep their indentation
    assert task_registry.graded_text(" 3 + 4 = 7\n#### 7", "gsm8k", "fewshot") == "3 + 4 = 7\n#### 7"
    assert task_registry.graded_text("    return x\n", "humaneval", "fewshot") == "    return x\n"
    assert task_registry.graded_text(" x", "gsm8k", "chat") == " x"
