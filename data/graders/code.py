"""HumanEval-format code grader (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

The program is `prompt + code + "\\n" + test + "\\ncheck(entry_point)\\n"`, the layout of the
HumanEval harness, run in the subprocess sandbox. `code` is the completion itself (a base model
continues the function body), or the first fenced ```python block of a chat reply; a block that
repeats the whole `def` still works, since the prompt's own def (docstring only) is valid Python
and the block's def replaces it. The program passes (score 1.0) only when it runs to its last line
within the limits: see data/sandbox.py for why exit status 0 alone is not enough.
"""
import re

from data.graders import Grade
from data.sandbox import Limits, SandboxResult, run_many, run_program


FENCE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code a completion means: its first fenced block when it has one, else all of it."""
    match = FENCE.search(completion)
    return match.group(1) if match else completion


def build_program(completion: str, reference: dict) -> str:
    """The test program for a completion of reference's prompt (reference: a HumanEval row)."""
    code = extract_code(completion)
    return f"{reference['prompt']}{code}\n{reference['test']}\ncheck({reference['entry_point']})\n"


def _to_grade(result: SandboxResult) -> Grade:
    if result.completed:
        return Grade(1.0, None, "passed")
    if result.timed_out:
        return Grade(0.0, None, "timed out")
    last_line = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
    return Grade(0.0, None, f"failed: {last_line[0][:200]}")


def grade(completion: str, reference: dict, limits: Limits = Limits()) -> Grade:
    return _to_grade(run_program(build_program(completion, reference), limits))


def grade_many(completions: list[str], references: list[dict], workers: int | None = None,
               limits: Limits = Limits()) -> list[Grade]:
    """grade() over many completions, their programs run `workers` at a time."""
    programs = [build_program(c, r) for c, r in zip(completions, references, strict=True)]
    return [_to_grade(result) for result in run_many(programs, limits, workers)]
