"""HumanEval-format code grader (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

`code` is the completion itself (a base model continues the function body), or the first fenced
```python block of a chat reply; a block that repeats the whole `def` still works, since the
prompt's own def (docstring only) is valid Python and the block's def replaces it. The candidate
process runs `prompt + code`; the task's `test` runs in a separate runner process that calls
`check()` with a stand-in for the entry point forwarding each call to the candidate, and only the
runner's verdict counts (data/sandbox.py run_check: why the program's own exit status or output
cannot be trusted). Score 1.0 when check() returns normally within the limits.
"""
import re

from data.graders.grade import Grade
from data.sandbox import CheckResult, Limits, in_parallel, run_check


FENCE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code a completion means: its first fenced block when it has one, else all of it."""
    match = FENCE.search(completion)
    return match.group(1) if match else completion


def _to_grade(result: CheckResult) -> Grade:
    return Grade(1.0 if result.passed else 0.0, None, result.note)


def grade(completion: str, reference: dict, limits: Limits = Limits()) -> Grade:
    """reference: a HumanEval row (prompt, test, entry_point)."""
    code = extract_code(completion) + "\n"
    return _to_grade(run_check(reference["prompt"], code, reference["test"], reference["entry_point"], limits))


def grade_many(completions: list[str], references: list[dict], workers: int | None = None,
               limits: Limits = Limits()) -> list[Grade]:
    """grade() over many completions, their sandboxes run `workers` at a time."""
    pairs = list(zip(completions, references, strict=True))
    return in_parallel(lambda pair: grade(*pair, limits), pairs, workers)
