"""The embedded tasks: seeded GSM8K-style word problems and HumanEval-style code tasks.

They let the whole pipeline (tokenizer, SFT, KD, GRPO, eval) run on a CPU in minutes, so they are
built to be learnable by a ~1M-parameter model: a closed vocabulary (12 names, 10 objects,
6 events), small numbers (a start of 2..20, changes of 1..10, every intermediate result in 0..70)
and one solution line per event that restates the computation, in GSM8K's own answer format:

    Q: Mia has 12 apples. Mia buys 7 more apples. Mia loses 4 apples. How many apples does Mia have now?
    A: After buying 7 more, Mia has 12+7 = <<12+7=19>>19 apples.
       After losing 4, Mia has 19-4 = <<19-4=15>>15 apples.
       #### 15

Difficulty is the number of steps (events). Splits: train and test share the step range 1..3 and
have disjoint questions; "harder" has 4..5 steps, more than any training row (so its counts also
reach 70 where training stops at 50), to measure length generalisation.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from data.templates import INSTRUCTIONS

NAMES = ("Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eva", "Ben", "Amy", "Dan")
OBJECTS = ("apples", "pens", "books", "cards", "coins", "shells", "stamps", "marbles", "stickers", "cookies")
# (question sentence, solution clause, operation); {n} is the name, {f} a friend, {k} the amount, {o} the object.
EVENTS = (
    ("{n} buys {k} more {o}.", "buying {k} more", "+"),
    ("{n} finds {k} more {o}.", "finding {k} more", "+"),
    ("{f} gives {n} {k} more {o}.", "getting {k} from {f}", "+"),
    ("{n} gives {k} {o} to {f}.", "giving {k} to {f}", "-"),
    ("{n} loses {k} {o}.", "losing {k}", "-"),
    ("{n} sells {k} {o}.", "selling {k}", "-"),
)
STEPS = {"train": (1, 3), "test": (1, 3), "harder": (4, 5)}  # inclusive ranges of reasoning steps
START, CHANGE = (2, 20), (1, 10)


def make_problem(rng: random.Random, steps: int, calculator: bool = True) -> dict:
    """One word problem with `steps` events; the count never goes negative."""
    name, friend = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    count = rng.randint(*START)
    sentences, lines = [f"{name} has {count} {obj}."], []
    for _ in range(steps):
        sentence, clause, op = rng.choice([e for e in EVENTS if e[2] == "+" or count > 0])
        k = rng.randint(CHANGE[0], CHANGE[1] if op == "+" else min(CHANGE[1], count))
        new = count + k if op == "+" else count - k
        words = dict(n=name, f=friend, k=k, o=obj)
        expr = f"{count}{op}{k}"
        result = f"<<{expr}={new}>>{new}" if calculator else f"{new}"
        sentences.append(sentence.format(**words))
        lines.append(f"After {clause.format(**words)}, {name} has {expr} = {result} {obj}.")
        count = new
    sentences.append(f"How many {obj} does {name} have now?")
    return {"question": " ".join(sentences), "answer": "\n".join(lines + [f"#### {count}"]), "steps": steps}


def make_splits(seed: int, n_train: int, n_test: int, n_harder: int, calculator: bool = True) -> dict[str, list[dict]]:
    """{"train", "test", "harder"} lists of GSM8K-shaped rows; no question appears twice in or across splits.

    Each split draws from its own generator seeded by (seed, split name), so train rows do not depend
    on n_test and the first rows of a split stay the same when more are asked for.
    """
    seen: set[str] = set()
    splits = {}
    for split, n in (("train", n_train), ("test", n_test), ("harder", n_harder)):
        rng = random.Random(f"{seed}-{split}")
        rows = []
        while len(rows) < n:
            row = make_problem(rng, rng.randint(*STEPS[split]), calculator)
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(row)
        splits[split] = rows
    return splits


# ---------------------------------------------------------------- code tasks (HumanEval format)

@dataclass(frozen=True)
class CodeSpec:
    """One synthetic function: its text (signature, docstring, one-line body) and, independently,
    a Python `reference` that computes the expected outputs written into the tests."""
    entry_point: str
    arguments: str  # "x: int"
    returns: str  # "int"
    doc: str
    body: str  # the canonical solution, one line
    reference: Callable
    argument: str  # kind of random test argument: "int", "list" or "word"


def code_specs() -> list[CodeSpec]:
    """Every (family, parameter) pair: add/subtract/multiply by k, multiple of k, count a letter,
    repeat k times, first k items, and the parameterless largest/smallest/total/reverse."""
    specs = []
    for k in range(2, 10):
        specs += [
            CodeSpec(f"add_{k}", "x: int", "int", f"Return x plus {k}.", f"return x + {k}", lambda x, k=k: x + k, "int"),
            CodeSpec(f"subtract_{k}", "x: int", "int", f"Return x minus {k}.", f"return x - {k}",
                     lambda x, k=k: x - k, "int"),
            CodeSpec(f"multiply_by_{k}", "x: int", "int", f"Return x times {k}.", f"return x * {k}",
                     lambda x, k=k: x * k, "int"),
            CodeSpec(f"is_multiple_of_{k}", "x: int", "bool", f"Return True if x is a multiple of {k}, else False.",
                     f"return x % {k} == 0", lambda x, k=k: x % k == 0, "int")]
    for c in "abcde":
        specs.append(CodeSpec(f"count_{c}", "s: str", "int", f"Return how many times '{c}' occurs in s.",
                              f"return s.count('{c}')", lambda s, c=c: s.count(c), "word"))
    for k in range(2, 6):
        specs += [
            CodeSpec(f"repeat_{k}_times", "s: str", "str", f"Return s repeated {k} times.", f"return s * {k}",
                     lambda s, k=k: s * k, "word"),
            CodeSpec(f"first_{k}", "xs: list", "list", f"Return the first {k} items of xs.", f"return xs[:{k}]",
                     lambda xs, k=k: xs[:k], "list")]
    return specs + [
        CodeSpec("largest", "xs: list", "int", "Return the largest number in xs.", "return max(xs)", max, "list"),
        CodeSpec("smallest", "xs: list", "int", "Return the smallest number in xs.", "return min(xs)", min, "list"),
        CodeSpec("total", "xs: list", "int", "Return the sum of the numbers in xs.", "return sum(xs)", sum, "list"),
        CodeSpec("reverse", "s: str", "str", "Return s reversed.", "return s[::-1]", lambda s: s[::-1], "word")]


def _random_argument(rng: random.Random, kind: str):
    if kind == "int":
        return rng.randint(-20, 20)
    if kind == "list":
        return [rng.randint(-9, 30) for _ in range(rng.randint(1, 6))]
    return "".join(rng.choice("abcde") for _ in range(rng.randint(0, 7)))


def _code_task(index: int, spec: CodeSpec, rng: random.Random, n_tests: int = 4) -> dict:
    """A HumanEval row: prompt (def line + docstring with one example), body, check(candidate), entry point."""
    inputs = []
    while len(inputs) < n_tests:  # distinct inputs, so each assert checks something new ...
        x = _random_argument(rng, spec.argument)
        constant = len(inputs) == n_tests - 1 and all(spec.reference(x) == spec.reference(i) for i in inputs)
        if x not in inputs and not constant:  # ... and two expected values at least, so no constant passes
            inputs.append(x)
    prompt = (f"def {spec.entry_point}({spec.arguments}) -> {spec.returns}:\n    \"\"\"{spec.doc}\n"
              f"    >>> {spec.entry_point}({inputs[0]!r})\n    {spec.reference(inputs[0])!r}\n    \"\"\"\n")
    asserts = "".join(f"    assert candidate({x!r}) == {spec.reference(x)!r}\n" for x in inputs)
    return {"task_id": f"Synthetic/{index}", "prompt": prompt, "canonical_solution": f"    {spec.body}\n",
            "test": f"\n\ndef check(candidate):\n{asserts}", "entry_point": spec.entry_point}


def make_code_tasks(seed: int, n: int) -> list[dict]:
    """n distinct code tasks: every (family, parameter) pair, shuffled by the seed, first n taken."""
    specs = code_specs()
    if n > len(specs):
        raise ValueError(f"make_code_tasks: n={n} but only {len(specs)} distinct synthetic code tasks exist")
    rng = random.Random(f"{seed}-code")
    rng.shuffle(specs)
    return [_code_task(i, spec, rng) for i, spec in enumerate(specs[:n])]


# ---------------------------------------------------------------- files and tokenizer corpus

def corpus_texts(rows: Iterable[dict] = (), code_tasks: Iterable[dict] = ()) -> list[str]:
    """Texts to train the embedded tokenizer on (pass the train split): each row framed as the model
    reads it, a chat user turn (question + instruction) and assistant turn, and a few-shot block; code.

    The framing words ("assistant", "Solve step by step.", "Question:") must be in the corpus, or BPE
    spells them in single characters: a chat prompt of the synthetic task then takes ~76 tokens
    instead of ~43, and every training step pays for the difference.
    """
    instruction = INSTRUCTIONS["synthetic"]
    texts = [text for row in rows for text in (
        f"user\n{row['question']}\n{instruction}", f"assistant\n{row['answer']}",
        f"Question: {row['question']}\nAnswer: {row['answer']}")]
    return texts + [task["prompt"] + task["canonical_solution"] + task["test"] for task in code_tasks]


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def write_splits(out_dir: str | Path, seed: int, n_train: int, n_test: int, n_harder: int, n_code: int,
                 calculator: bool = True) -> dict[str, Path]:
    """Write {train,test,harder}.jsonl (GSM8K rows) and code.jsonl (HumanEval rows); return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = make_splits(seed, n_train, n_test, n_harder, calculator)
    splits["code"] = make_code_tasks(seed, n_code)
    paths = {}
    for split, rows in splits.items():
        paths[split] = out_dir / f"{split}.jsonl"
        write_jsonl(paths[split], rows)
    return paths
