"""data/synthetic.py: determinism, split hygiene, answers re-derived from the question text, code tasks."""
import json
import re

import pytest

from conftest import shared_data
from data.synthetic import STEPS, code_specs, corpus_texts, make_code_tasks, make_splits, write_splits
from model.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def splits():
    return make_splits(seed=7, n_train=400, n_test=200, n_harder=200)


def solve_question(question: str) -> int:
    """Independent solver: the start count, then each event sentence adds ("more") or removes its number."""
    sentences = question.split(". ")
    count = int(re.fullmatch(r"\w+ has (\d+) \w+", sentences[0]).group(1))
    for sentence in sentences[1:-1]:
        (k,) = map(int, re.findall(r"\d+", sentence))
        count += k if " more " in sentence else -k
    return count


def test_deterministic_and_seeded(splits):
    assert make_splits(seed=7, n_train=400, n_test=200, n_harder=200) == splits
    assert make_splits(seed=8, n_train=400, n_test=200, n_harder=200)["train"] != splits["train"]
    # The first rows of a split do not depend on how many rows are asked for.
    assert make_splits(seed=7, n_train=50, n_test=0, n_harder=0)["train"] == splits["train"][:50]
    assert make_code_tasks(3, 10) == make_code_tasks(3, 10)


def test_splits_disjoint_and_sized(splits):
    assert [len(splits[s]) for s in ("train", "test", "harder")] == [400, 200, 200]
    questions = [row["question"] for rows in splits.values() for row in rows]
    assert len(set(questions)) == len(questions)


def test_harder_has_more_steps(splits):
    train_steps = {row["steps"] for row in splits["train"]}
    assert train_steps == set(range(STEPS["train"][0], STEPS["train"][1] + 1))
    assert {row["steps"] for row in splits["test"]} <= train_steps
    assert min(row["steps"] for row in splits["harder"]) > max(train_steps)


@pytest.mark.parametrize("split", ["train", "test", "harder"])
def test_answers_follow_from_question_and_annotations(splits, split):
    for row in splits[split]:
        *lines, final = row["answer"].split("\n")
        assert len(lines) == row["steps"] == len(row["question"].split(". ")) - 2
        count = int(re.search(r"has (\d+)", row["question"]).group(1))
        for line in lines:
            # GSM8K calculator annotation: "a-b = <<a-b=c>>c"; evaluate a-b independently.
            m = re.search(r"(\d+)([+-])(\d+) = <<(\d+)([+-])(\d+)=(\d+)>>(\d+) ", line)
            a, op, b, a2, op2, b2, value, shown = m.groups()
            assert (a, op, b) == (a2, op2, b2) and value == shown
            assert int(a) == count  # each line continues from the previous result
            count = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert int(value) == count and 0 <= count <= 99 and 1 <= int(b) <= 20
        assert final == f"#### {count}" == f"#### {solve_question(row['question'])}"


def test_without_calculator_annotations():
    rows = make_splits(seed=1, n_train=50, n_test=0, n_harder=0, calculator=False)["train"]
    for row in rows:
        assert "<<" not in row["answer"]
        *lines, final = row["answer"].split("\n")
        last = None
        for line in lines:
            a, op, b, c = re.search(r"(\d+)([+-])(\d+) = (\d+) ", line).groups()
            last = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert last == int(c)
        assert final == f"#### {last}" == f"#### {solve_question(row['question'])}"


def test_rows_have_gsm8k_fields(splits):
    with open(shared_data("gsm8k/test.jsonl")) as f:
        real = json.loads(f.readline())
    assert set(real) <= set(splits["train"][0])
    assert re.search(r"\n#### -?[\d,]+$", real["answer"]) and re.search(r"\n#### \d+$", splits["train"][0]["answer"])


def test_code_tasks_canonical_solutions_pass():
    tasks = make_code_tasks(seed=0, n=len(code_specs()))
    assert [t["task_id"] for t in tasks] == [f"Synthetic/{i}" for i in range(len(tasks))]
    assert len({t["entry_point"] for t in tasks}) == len(tasks)
    for task in tasks:
        assert task["prompt"].startswith(f"def {task['entry_point']}(")
        namespace = {}
        exec(task["prompt"] + task["canonical_solution"] + task["test"], namespace)  # our own solutions only
        namespace["check"](namespace[task["entry_point"]])
        with pytest.raises(AssertionError):  # the tests reject a wrong function
            namespace["check"](lambda x: None)
        expected = {line.split(" == ", 1)[1] for line in task["test"].splitlines() if " == " in line}
        assert len(expected) >= 2, task["task_id"]  # no constant function passes
    with pytest.raises(ValueError, match="only"):
        make_code_tasks(seed=0, n=len(code_specs()) + 1)


def test_write_splits_round_trip(tmp_path):
    paths = write_splits(tmp_path, seed=2, n_train=20, n_test=10, n_harder=5, n_code=4)
    expected = make_splits(2, 20, 10, 5) | {"code": make_code_tasks(2, 4)}
    for split, path in paths.items():
        assert [json.loads(line) for line in path.read_text().splitlines()] == expected[split]


def test_tokenizer_on_synthetic_corpus(splits, tmp_path):
    code = make_code_tasks(seed=0, n=20)
    tok = train_tokenizer(corpus_texts(splits["train"], code), tmp_path, vocab_size=512)
    assert tok.vocab_size <= 512  # fits the tiny presets' embedding
    texts = corpus_texts(splits["test"] + splits["harder"], make_code_tasks(seed=1, n=20))
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    digits = [tok.decode([i]) for i in tok.encode(splits["harder"][0]["answer"])]
    assert all(sum(c.isdigit() for c in piece) <= 1 for piece in digits)
    # the prompt framing is in the corpus, so BPE learns its words whole (not letter by letter)
    for framing in ("user\n", "assistant\n", "Solve step by step.", "Question: "):
        assert len(tok.encode(framing)) <= len(framing.split()) + 2, [tok.decode([i]) for i in tok.encode(framing)]
