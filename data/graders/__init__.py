"""Graders: one module per benchmark, each exposing `grade(completion, reference) -> Grade`.

    gsm8k  final number (`####`, then \\boxed{}, then the last number), compared numerically
    math   last \\boxed{} compared with math_verify (symbolic equivalence)
    code   HumanEval program (prompt + completion + tests) run in the subprocess sandbox

The GSM8K-style synthetic task uses the gsm8k grader; the HumanEval-format synthetic code task
uses the code grader. A new benchmark's grader is one module and one GRADERS entry.
"""
from data.graders import code, gsm8k, math
from data.graders.grade import Grade

GRADERS = {"gsm8k": gsm8k.grade, "math": math.grade, "code": code.grade}

__all__ = ["GRADERS", "Grade", "grade_batch"]


def grade_batch(grader: str, completions: list[str], references: list, workers: int | None = None) -> list[Grade]:
    """Grade completions[i] against references[i].

    Code runs sandboxed programs concurrently (threads that wait on subprocesses); the text
    graders run in the calling thread so that math_verify keeps its signal-based timeout.
    """
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    if grader == "code":
        return code.grade_many(completions, references, workers=workers)
    return [GRADERS[grader](c, r) for c, r in zip(completions, references)]
