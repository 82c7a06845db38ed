"""trainer/evaluation.py: evaluate() with a tiny random model: records, grading, summary, determinism."""
import json

import pytest

from data.graders import gsm8k
from data.readers import load_gsm8k
from data.templates import render_prompt
from model.generate import SamplingParams
from trainer.evaluation import evaluate
from trainer_helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny-student checkpoint with a tokenizer trained on the synthetic task, saved in one dir."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_evaluate_machinery(tiny, tmp_path):
    model, tokenizer, paths, _ = tiny
    rows = load_gsm8k(paths["test"])[:3]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=3)
    summary = evaluate(model, tokenizer, rows, "synthetic", params, style="fewshot", batch_size=2,
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
    again = evaluate(model, tokenizer, rows, "synthetic", params, style="fewshot", batch_size=2, progress=False)
    assert again == summary  # same seed, same numbers
