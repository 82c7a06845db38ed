"""GSM8K grader: extract the final number and compare it numerically with the gold answer.

Extraction order (the first that finds a number wins):
  1. the first number after the first `####` (GSM8K's own answer marker; taking the first one
     ignores a model that runs on into a new few-shot question with its own `####`),
  2. the number inside the last \\boxed{...} (chat models trained on MATH-style answers),
  3. the last number in the text.
Numbers may carry a sign, thousands separators (1,000) and decimals; they are compared as exact
fractions, so 3.50 == 3.5 and 1,000 == 1000. Currency signs, units and trailing periods around the
number ("$5.", "5 dollars") are ignored because only the number itself is matched.
"""
import re
from fractions import Fraction

from data.graders.grade import Grade
from data.graders.math import last_boxed

# -1,234.5 | 1234 | .5 ; thousands groups must be exactly 3 digits, so "1,2,3" is three numbers.
# A sign counts only when it does not follow a word character: "16-3" is 16 and 3, not 16 and -3.
NUMBER = re.compile(r"(?:(?<![\w)])[-+])?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")


def parse_number(text: str) -> Fraction | None:
    """The first number in `text` as an exact Fraction, or None when there is none."""
    match = NUMBER.search(text)
    return Fraction(match.group().replace(",", "")) if match else None


def format_number(value: Fraction) -> str:
    """Canonical text of a number: 1000, -3.5, 1/3 (what `extracted` shows)."""
    if value.denominator == 1:
        return str(value.numerator)
    decimal = float(value)
    return repr(decimal) if Fraction(decimal) == value else str(value)


def extract_answer(completion: str) -> tuple[Fraction | None, str]:
    """(final number, which rule found it) following the order in the module docstring."""
    _, sep, after = completion.partition("####")
    if sep and (value := parse_number(after)) is not None:
        return value, "####"
    boxed = last_boxed(completion)
    if boxed is not None and (value := parse_number(boxed)) is not None:
        return value, "boxed"
    numbers = NUMBER.findall(completion)
    if numbers:
        return Fraction(numbers[-1].replace(",", "")), "last number"
    return None, "no number found"


def grade(completion: str, reference: str) -> Grade:
    gold = parse_number(reference)
    if gold is None:
        raise ValueError(f"gsm8k reference {reference!r} is not a number")
    value, rule = extract_answer(completion)
    if value is None:
        return Grade(0.0, None, rule)
    return Grade(float(value == gold), format_number(value), rule)
