"""data/readers.py: real benchmark files load whole; bad input names file, line and field."""
import gzip
import json
import re

import pytest
from conftest import shared_data

from data.readers import load_chat, load_gsm8k, load_humaneval, load_math, load_prompt_completion, read_jsonl


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_real_files_load_every_row():
    gsm8k = load_gsm8k(shared_data("gsm8k/test.jsonl"))
    math = load_math(shared_data("math500/test.jsonl"))
    humaneval = load_humaneval(shared_data("humaneval/HumanEval.jsonl.gz"))
    assert (len(gsm8k), len(math), len(humaneval)) == (1319, 500, 164)
    # The first GSM8K test answer ends "#### 18" (Janet's ducks).
    assert gsm8k[0]["reference"] == "18" and gsm8k[0]["id"] == 0
    assert humaneval[0]["id"] == "HumanEval/0" and humaneval[0]["reference"]["entry_point"] == "has_close_elements"
    assert math[0]["reference"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_gsm8k_reference_drops_thousands_separators(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [json.dumps({"question": "q", "answer": "so\n#### 1,200"})])
    assert load_gsm8k(path)[0]["reference"] == "1200"


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"question": "a", "answer": "#### 1"}', "", '{"question": "b",'])
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/bad.jsonl:3: invalid JSON")):
        read_jsonl(path)


def test_line_that_is_not_an_object(tmp_path):
    path = write_lines(tmp_path / "list.jsonl", ['{"prompt": "a", "completion": "b"}', '["a", "b"]'])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: expected a JSON object, got list")):
        load_prompt_completion(path)


def test_missing_and_ill_typed_fields_name_file_line_field(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", ['{"question": "a", "answer": "#### 1"}', '{"question": "b"}'])
    with pytest.raises(ValueError, match=r"g.jsonl:2: field 'answer' missing"):
        load_gsm8k(path)
    path = write_lines(tmp_path / "m.jsonl", ['{"problem": "p", "solution": 3}'])
    with pytest.raises(ValueError, match=r"m.jsonl:1: field 'solution' must be str, got int"):
        load_math(path)
    path = write_lines(tmp_path / "g2.jsonl", ['{"question": "a", "answer": "no marker"}'])
    with pytest.raises(ValueError, match=r"g2.jsonl:1: field 'answer' must end with '#### <number>'"):
        load_gsm8k(path)


def test_math_answer_falls_back_to_last_boxed(tmp_path):
    rows = [{"problem": "p", "solution": "first \\boxed{1}, then \\boxed{\\frac{a}{b}}."},
            {"problem": "p", "solution": "no box"}]
    path = write_lines(tmp_path / "m.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(ValueError, match=r"m.jsonl:2: field 'answer' missing"):
        load_math(path)
    path = write_lines(tmp_path / "m1.jsonl", [json.dumps(rows[0])])
    assert load_math(path)[0]["reference"] == "\\frac{a}{b}"


def test_humaneval_gz_and_missing_field(tmp_path):
    row = {"task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
           "test": "def check(f):\n    assert f() == 1\n", "entry_point": "f"}
    path = tmp_path / "h.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(row) + "\n" + json.dumps({k: v for k, v in row.items() if k != "test"}) + "\n")
    with pytest.raises(ValueError, match=r"h.jsonl.gz:2: field 'test' missing"):
        load_humaneval(path)


def test_chat_roles_validated(tmp_path):
    good = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                         {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}]}
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(good), json.dumps(bad)])
    with pytest.raises(ValueError, match=r"c.jsonl:2: messages\[1\]: field 'role' must be one of"):
        load_chat(path)
    assert load_chat(write_lines(tmp_path / "c1.jsonl", [json.dumps(good)])) == [good]
    path = write_lines(tmp_path / "c2.jsonl", ['{"messages": [{"role": "user"}]}'])
    with pytest.raises(ValueError, match=r"c2.jsonl:1: messages\[0\]: field 'content' missing"):
        load_chat(path)


def test_prompt_completion(tmp_path):
    path = write_lines(tmp_path / "pc.jsonl", ['{"prompt": "1+1=", "completion": "2"}', '{"prompt": "x"}'])
    with pytest.raises(ValueError, match=r"pc.jsonl:2: field 'completion' missing"):
        load_prompt_completion(path)
    assert load_prompt_completion(write_lines(tmp_path / "ok.jsonl", ['{"prompt": "a", "completion": "b"}'])) == [
        {"prompt": "a", "completion": "b"}]


@pytest.mark.parametrize("name", ["latin1.jsonl", "latin1.jsonl.gz"])
def test_invalid_utf8_names_file_and_line(tmp_path, name):
    """One byte that is not UTF-8 (0xe9, Latin-1 'é') on line 3; multi-byte UTF-8 before it is fine."""
    lines = [json.dumps({"prompt": "caf\u00e9 \U0001f642", "completion": "ok"}, ensure_ascii=False).encode(),
             b"", b'{"prompt": "caf\xe9", "completion": "b"}']
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    expected = f"{path}:3: not valid UTF-8 (byte 0xe9 at position 16 of the line)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_prompt_completion(path)
    good = b"\n".join(lines[:2]) + b"\n"
    path.write_bytes(gzip.compress(good) if name.endswith(".gz") else good)
    assert load_prompt_completion(path) == [{"prompt": "caf\u00e9 \U0001f642", "completion": "ok"}]


def test_corrupt_gzip_names_file(tmp_path):
    path = tmp_path / "h.jsonl.gz"
    path.write_bytes(b"not gzip at all\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: corrupt gzip data")):
        read_jsonl(path)
    good = gzip.compress(b'{"a": 1}\n{"a": 2}\n' * 200)
    path.write_bytes(good[:len(good) - 12])  # truncated: the stream ends before its end marker
    with pytest.raises(ValueError, match=re.escape(f"{path}:") + r"\d+: corrupt gzip data"):
        read_jsonl(path)


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\r\n\r\n{"prompt": "c", "completion": "d"}\r\n')
    assert load_prompt_completion(path) == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
