"""eval.py end to end: grade-only CLI, evaluate() and main() with a tiny random model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as evaluation
from data.graders import gsm8k
from data.readers import load_gsm8k, load_humaneval
from data.synthetic import corpus_texts, write_splits
from data.templates import render_prompt
from model.checkpoint import save_pretrained
from model.config import PRESETS
from model.generate import SamplingParams
from model.tokenizer import train_tokenizer
from model.transformer import Transformer

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


def test_grade_only_rejects_unknown_id(tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    completions = tmp_path / "c.jsonl"
    completions.write_text('{"id": 0, "completion": "1"}\n{"id": 5, "completion": "1"}\n')
    rows = load_gsm8k(data)
    with pytest.raises(ValueError, match=r"c.jsonl:2: field 'id' 5 matches no row"):
        evaluation.read_completions(completions, rows)


def test_grade_only_ids_are_task_ids_for_code(tmp_path):
    tasks = write_splits(tmp_path, seed=0, n_train=1, n_test=1, n_harder=1, n_code=3)["code"]
    rows = load_humaneval(tasks)
    completions = tmp_path / "c.jsonl"
    completions.write_text("".join(json.dumps({"id": i, "completion": c}) + "\n" for i, c in
                                   [("Synthetic/2", "a"), ("Synthetic/0", "b"), ("Synthetic/2", "c")]))
    used, texts = evaluation.read_completions(completions, rows)
    assert [row["id"] for row in used] == ["Synthetic/0", "Synthetic/2"] and texts == [["b"], ["a", "c"]]
    completions.write_text('{"id": 0, "completion": "a"}\n')  # a row index is not a HumanEval id
    with pytest.raises(ValueError, match=r"c.jsonl:1: field 'id' 0 matches no row"):
        evaluation.read_completions(completions, rows)


def test_grade_only_code_task(tmp_path):
    tasks = write_splits(tmp_path, seed=0, n_train=1, n_test=1, n_harder=1, n_code=2)["code"]
    rows = load_humaneval(tasks)
    completions = [[rows[0]["canonical_solution"], "    return None\n"], [rows[1]["canonical_solution"]] * 2]
    records, summary = evaluation.score(rows, "synthetic-code", completions, workers=2)
    assert [r["score"] for r in records] == [1.0, 0.0, 1.0, 1.0]
    assert summary["pass@1"] == pytest.approx(0.75) and summary["pass@2"] == pytest.approx(1.0)
    assert "maj@1" not in summary  # code has no extracted answer to vote on


def test_prompt_formats_and_graded_text():
    assert evaluation.stop_strings("humaneval", "fewshot") == evaluation.CODE_STOP_STRINGS
    assert evaluation.stop_strings("gsm8k", "fewshot") == ("\n\nQuestion:",)
    assert evaluation.stop_strings("humaneval", "chat") == ()
    # fewshot answers follow "Answer:" after a space; raw code continuations keep their indentation
    assert evaluation.graded_text(" 3 + 4 = 7\n#### 7", "gsm8k", "fewshot") == "3 + 4 = 7\n#### 7"
    assert evaluation.graded_text("    return x\n", "humaneval", "fewshot") == "    return x\n"
    assert evaluation.graded_text(" x", "gsm8k", "chat") == " x"


# ---- evaluate() with a tiny random model ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny-student checkpoint with a tokenizer trained on the synthetic task, saved in one dir."""
    root = tmp_path_factory.mktemp("tiny")
    paths = write_splits(root / "data", seed=0, n_train=200, n_test=4, n_harder=1, n_code=2)
    train = load_gsm8k(paths["train"])
    tokenizer = train_tokenizer(corpus_texts(train, load_humaneval(paths["code"])), root / "model", vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-student"])
    save_pretrained(model, root / "model")
    return model, tokenizer, paths, root / "model"


def test_evaluate_machinery(tiny, tmp_path):
    model, tokenizer, paths, _ = tiny
    rows = load_gsm8k(paths["test"])[:3]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=3)
    summary = evaluation.evaluate(model, tokenizer, rows, "synthetic", params, style="fewshot", batch_size=2,
                                  out_dir=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 6 and [(r["id"], r["sample"]) for r in records] == [(i, j) for i in range(3) for j in range(2)]
    for record, row in zip(records, [row for row in rows for _ in range(2)]):
        assert record["prompt"] == render_prompt(tokenizer, row["question"], "fewshot", task="synthetic")
        assert record["score"] == gsm8k.grade(record["completion"], row["reference"]).score
        assert record["finish_reason"] in ("stop", "length")
    scores = [[r["score"] for r in records[i:i + 2]] for i in (0, 2, 4)]
    assert summary["pass@1"] == pytest.approx(sum(map(sum, scores)) / 6)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    again = evaluation.evaluate(model, tokenizer, rows, "synthetic", params, style="fewshot", batch_size=2, progress=False)
    assert again == summary  # same seed, same numbers


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
    with pytest.raises(SystemExit):  # n > 1 identical greedy samples is refused
        evaluation.parse_args(["--model", "m", "--task", "gsm8k", "--data", "d", "--n-samples", "4"])
