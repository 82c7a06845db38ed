"""MATH grader: the last \\boxed{...} of the completion, checked for equivalence with math_verify.

math_verify (Hugging Face) parses both LaTeX answers into sympy and compares them symbolically, so
\\frac{1}{2} == 0.5 == \\dfrac12, intervals, sets and percentages work. Two practical points:
  * Its timeouts use signal.alarm, which only works in the main thread; elsewhere (a trainer's
    reward thread) we call it with the timeouts off rather than let it raise.
  * It must never crash an evaluation: any failure, or an answer it cannot parse, falls back to a
    normalised string comparison, and the Grade's note says so.
"""
import re
import threading

from data.graders.grade import Grade

BOXED = re.compile(r"\\(?:boxed|fbox)\b")
TIMEOUT_S = 5


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (nested braces allowed; also `\\boxed 5`)."""
    matches = list(BOXED.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():].lstrip()
    if not rest.startswith("{"):  # "\boxed 5$": the argument is the next token
        token = re.match(r"[^\s$]+", rest)
        return token.group() if token else None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced braces: the answer was cut off


def normalize(answer: str) -> str:
    """Loose canonical form for the string fallback: no spaces, \\left/\\right, \\dfrac, `x=`, $."""
    answer = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ |\$|\s", "", answer)
    answer = re.sub(r"\\[dt]frac", r"\\frac", answer)
    answer = re.sub(r"^[a-zA-Z]=", "", answer)
    return answer.rstrip(".")


def equivalent(answer: str, reference: str) -> tuple[bool, str]:
    """(answer == reference, note): symbolic via math_verify, else normalised string match."""
    # Imported here: math_verify loads sympy (seconds), which the other graders never need.
    from math_verify import LatexExtractionConfig, parse, verify

    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:  # each answer is wrapped in \boxed{} so that math_verify takes it whole
        gold, pred = (parse(f"\\boxed{{{text}}}", extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout)
                      for text in (reference, answer))
        if gold and pred:
            return verify(gold, pred, timeout_seconds=timeout), "math_verify"
        reason = "math_verify could not parse the " + ("reference" if not gold else "answer")
    except Exception as e:  # noqa: BLE001  (math_verify / sympy failures must not end the eval)
        reason = f"math_verify failed: {type(e).__name__}"
    return normalize(answer) == normalize(reference), reason + "; string match"


def grade(completion: str, reference: str) -> Grade:
    answer = last_boxed(completion)
    if answer is None:
        return Grade(0.0, None, "no \\boxed{} answer")
    same, note = equivalent(answer, reference)
    if not same and note == "math_verify":  # symbolic says no: accept an exact normalised match
        same, note = normalize(answer) == normalize(reference), "math_verify said no; string match"
    return Grade(float(same), answer, note)
