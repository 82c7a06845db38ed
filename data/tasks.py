"""The evaluation tasks: for each, how its rows are read, prompted, stopped and graded.

Tasks: gsm8k, math (MATH-500), humaneval, and the embedded synthetic (GSM8K format) and
synthetic-code (HumanEval format) tasks. Each names a loader (data/readers.py), a grader
(data/graders/), a prompt instruction (data/templates.py) and the row field the prompt is built from.
Styles: "chat" (ChatML, for instruct and our SFT models) and "fewshot" (plain text for base models;
code tasks then use the raw prompt). eval.py evaluates a task, train.py's stage rl trains on one
(same prompts, same stop strings, same grader), and a new benchmark is one TASKS entry.

Metrics over n samples per problem (data/passk.py): pass@k, the unbiased estimator of Chen et al.
2021, for every k <= n (pass@1 is the mean score over samples), and maj@k (self-consistency vote on
the extracted answers; not for code, which has no answer to vote on).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data.graders import GRADERS, Grade, grade_batch
from data.passk import maj_at_k, pass_at_k
from data.readers import iter_jsonl, load_gsm8k, load_humaneval, load_math, require
from data.templates import STOP_STRINGS, render_prompt
from model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Task:
    load: Callable[[Path], list[dict]]  # rows with "id" and "reference"
    grader: str                          # key of data.graders.GRADERS
    template: str                        # task name for data/templates.py's instruction
    question: str                        # the row field the prompt is built from

    def __post_init__(self):
        if self.grader not in GRADERS:
            raise ValueError(f"Task.grader must be one of {tuple(GRADERS)}, got {self.grader!r}")


TASKS = {
    "gsm8k": Task(load_gsm8k, "gsm8k", "gsm8k", "question"),
    "synthetic": Task(load_gsm8k, "gsm8k", "synthetic", "question"),
    "math": Task(load_math, "math", "math", "problem"),
    "humaneval": Task(load_humaneval, "code", "humaneval", "prompt"),
    "synthetic-code": Task(load_humaneval, "code", "humaneval", "prompt"),
}

# A base model (fewshot style) continues a code prompt as code, the Codex protocol (Chen et al. 2021):
# the raw HumanEval prompt, the completion cut where a line at column 0 leaves the function body.
CODE_STOP_STRINGS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def load_rows(task: str, path: str | Path) -> list[dict]:
    """The rows of `task` in `path` (errors name the file and line)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"data file {path} not found")
    rows = TASKS[task].load(Path(path))
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def raw_code_prompt(task: str, style: str) -> bool:
    return style == "fewshot" and TASKS[task].grader == "code"


def render_prompts(tokenizer: Tokenizer, rows: list[dict], task: str, style: str) -> list[str]:
    spec = TASKS[task]
    if raw_code_prompt(task, style):
        return [row["prompt"] for row in rows]
    return [render_prompt(tokenizer, row[spec.question], style, task=spec.template) for row in rows]


def stop_strings(task: str, style: str) -> tuple[str, ...]:
    """Where a completion of `task` in `style` ends, beyond the tokenizer's stop ids."""
    return CODE_STOP_STRINGS if raw_code_prompt(task, style) else STOP_STRINGS[style]


def graded_text(completion: str, task: str, style: str) -> str:
    """The completion as graded: fewshot answers follow "Answer:" after the space format_completion adds."""
    templated_fewshot = style == "fewshot" and not raw_code_prompt(task, style)
    return completion[1:] if templated_fewshot and completion.startswith(" ") else completion


def score(rows: list[dict], task: str, completions: list[list[str]],
          workers: int | None = None) -> tuple[list[dict], dict]:
    """Grade completions[i], the samples of rows[i]: (one record per sample, summary)."""
    flat = [(row, j, text) for row, texts in zip(rows, completions, strict=True) for j, text in enumerate(texts)]
    grades = grade_batch(TASKS[task].grader, [text for _, _, text in flat], [row["reference"] for row, _, _ in flat],
                         workers)
    records = [{"id": row["id"], "sample": j, "completion": text, "extracted": g.extracted, "score": g.score,
                "note": g.note} for (row, j, text), g in zip(flat, grades)]
    per_problem, start = [], 0
    for texts in completions:
        per_problem.append(grades[start:start + len(texts)])
        start += len(texts)
    return records, summarize(task, per_problem)


def summarize(task: str, per_problem: list[list[Grade]]) -> dict:
    """pass@k (and maj@k for answer tasks) averaged over problems, for k up to the fewest samples."""
    if not per_problem or not all(per_problem):
        raise ValueError("summarize: every problem needs at least one graded sample")
    n = min(len(grades) for grades in per_problem)
    summary = {"task": task, "problems": len(per_problem), "samples_per_problem": n}
    for k in range(1, n + 1):
        summary[f"pass@{k}"] = _mean(pass_at_k(len(g), sum(x.score == 1.0 for x in g), k) for g in per_problem)
    if TASKS[task].grader != "code":
        for k in range(1, n + 1):
            summary[f"maj@{k}"] = _mean(maj_at_k([x.extracted for x in g], [x.score for x in g], k)
                                        for g in per_problem)
    return summary


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def read_completions(path: str | Path, rows: list[dict]) -> tuple[list[dict], list[list[str]]]:
    """Grade-only input: lines {"id": row index or task_id, "completion": str}, several per id for pass@k.

    Returns the rows that have completions (in data order) and their completions (in file order).
    """
    by_id = {row["id"]: row for row in rows}
    grouped: dict = {}
    for where, record in iter_jsonl(path):
        row_id = require(record, "id", (int, str), where)
        if row_id not in by_id:
            raise ValueError(f"{where}: field 'id' {row_id!r} matches no row of the data (ids: row index or task_id)")
        grouped.setdefault(row_id, []).append(require(record, "completion", str, where))
    if not grouped:
        raise ValueError(f"{path}: no completions")
    used = [row for row in rows if row["id"] in grouped]
    return used, [grouped[row["id"]] for row in used]
