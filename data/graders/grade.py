"""The result every grader returns."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Grade:
    score: float              # 1.0 correct, 0.0 wrong (code: 1.0 = every test passed)
    extracted: str | None     # the answer pulled out of the completion (None: nothing found)
    note: str = ""            # how it was extracted / why it failed, for reading generations.jsonl
