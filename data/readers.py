"""JSONL readers for the benchmark and training files.

Every loader returns a list of plain dicts (easy to render, serialise and extend) and refuses bad
input loudly: a malformed line or a missing / ill-typed field raises
`ValueError("{path}:{lineno}: field 'answer' missing")`. Nothing is silently dropped; only blank
lines are skipped.

Benchmark rows carry two extra keys the evaluator relies on: `id` (row index, or HumanEval's
task_id) and `reference` (what the benchmark's grader compares a completion against).
"""
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

CHAT_ROLES = ("system", "user", "assistant")
HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ("path:lineno", JSON object) for each non-blank line of a .jsonl or .jsonl.gz file.

    Lines end at "\\n" and must be UTF-8: a line that is not, a malformed line and a corrupt gzip
    stream are ValueErrors naming the file and line.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(_raw_lines(f, path), start=1):
            where = f"{path}:{lineno}"
            line = _utf8(raw, where)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _raw_lines(f, path: Path) -> Iterator[bytes]:
    """The lines of an open binary file; a corrupt or truncated gzip stream names the file and line."""
    lineno = 0
    try:
        for lineno, raw in enumerate(f, start=1):
            yield raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}:{lineno + 1}: corrupt gzip data ({e})") from None


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        byte = f"byte {raw[e.start]:#04x} at position {e.start + 1} of the line"
        raise ValueError(f"{where}: not valid UTF-8 ({byte})") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """All JSON objects of a .jsonl or .jsonl.gz file, in file order."""
    return [record for _, record in iter_jsonl(path)]


def require(record: dict, field: str, kind: type | tuple[type, ...], where: str):
    """record[field], checked to exist and to be of `kind`; `where` is "path:lineno"."""
    if field not in record:
        raise ValueError(f"{where}: field '{field}' missing")
    value = record[field]
    if not isinstance(value, kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{where}: field '{field}' must be {expected}, got {type(value).__name__}")
    return value


def _strings(record: dict, fields: tuple[str, ...], where: str) -> dict:
    return {field: require(record, field, str, where) for field in fields}


def load_gsm8k(path: str | Path) -> list[dict]:
    """GSM8K rows {id, question, answer, reference}; reference is the number after the last `####`.

    The synthetic GSM8K-style task writes the same format, so it loads here too.
    """
    from data.graders.gsm8k import format_number, parse_number

    rows = []
    for where, record in iter_jsonl(path):
        row = _strings(record, ("question", "answer"), where)
        _, sep, final = row["answer"].rpartition("####")
        if not sep or parse_number(final) is None:
            raise ValueError(f"{where}: field 'answer' must end with '#### <number>', got ...{row['answer'][-40:]!r}")
        rows.append({"id": len(rows), **row, "reference": format_number(parse_number(final))})
    return rows


def load_math(path: str | Path) -> list[dict]:
    """MATH rows {id, problem, solution, answer, reference}.

    `answer` comes from the file when present (MATH-500 has it), else from the last \\boxed{} of
    the solution (the original MATH release has no answer field).
    """
    from data.graders.math import last_boxed

    rows = []
    for where, record in iter_jsonl(path):
        row = _strings(record, ("problem", "solution"), where)
        answer = require(record, "answer", str, where) if "answer" in record else last_boxed(row["solution"])
        if answer is None:
            raise ValueError(f"{where}: field 'answer' missing and field 'solution' has no \\boxed{{}}")
        rows.append({"id": len(rows), **row, "answer": answer, "reference": answer})
    return rows


def load_humaneval(path: str | Path) -> list[dict]:
    """HumanEval rows {id=task_id, task_id, prompt, canonical_solution, test, entry_point, reference}.

    The code grader needs prompt, test and entry_point, so `reference` is the row itself.
    """
    rows = []
    for where, record in iter_jsonl(path):
        row = _strings(record, HUMANEVAL_FIELDS, where)
        rows.append({"id": row["task_id"], **row, "reference": row})
    return rows


def load_chat(path: str | Path) -> list[dict]:
    """Chat rows {messages: [{role, content}, ...]}; roles must be system, user or assistant."""
    rows = []
    for where, record in iter_jsonl(path):
        messages = require(record, "messages", list, where)
        if not messages:
            raise ValueError(f"{where}: field 'messages' is empty")
        for i, message in enumerate(messages):
            at = f"{where}: messages[{i}]"
            if not isinstance(message, dict):
                raise ValueError(f"{at}: expected an object, got {type(message).__name__}")
            message = _strings(message, ("role", "content"), at)
            if message["role"] not in CHAT_ROLES:
                raise ValueError(f"{at}: field 'role' must be one of {CHAT_ROLES}, got {message['role']!r}")
            messages[i] = message
        rows.append({"messages": messages})
    return rows


def load_prompt_completion(path: str | Path) -> list[dict]:
    """Rows {prompt, completion} (plain-text SFT / distillation pairs)."""
    return [_strings(record, ("prompt", "completion"), where) for where, record in iter_jsonl(path)]


# data.format of a training file -> its reader
TRAINING_FORMATS = {"gsm8k": load_gsm8k, "chat": load_chat, "prompt_completion": load_prompt_completion}
