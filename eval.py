"""Evaluate a checkpoint: render prompts, sample completions, grade them, report pass@k and maj@k.

    python eval.py --model DIR --task gsm8k --data ../shared/data/gsm8k/test.jsonl --out runs/eval-gsm8k
    python eval.py --model DIR --task humaneval --data HumanEval.jsonl.gz --n-samples 10 --temperature 0.8
    python eval.py --task gsm8k --data test.jsonl --completions completions.jsonl   # grade only, no model

Tasks: gsm8k, math (MATH-500), humaneval, and the embedded synthetic (GSM8K format) and
synthetic-code (HumanEval format) tasks. Each names a loader (data/readers.py), a grader
(data/graders/) and a prompt template (data/templates.py). Styles: "chat" (ChatML, for instruct
and our SFT models) and "fewshot" (plain text for base models; code tasks then use the raw prompt).

Metrics over n samples per problem (data/passk.py): pass@k, the unbiased estimator of Chen et al.
2021, for every k <= n (pass@1 is the mean score over samples), and maj@k (self-consistency vote on
the extracted answers; not for code, which has no answer to vote on). summary.json holds every k;
the printed table shows k = 1, 2, 4, ... < n and n.

Outputs in --out: generations.jsonl (one line per sample: id, sample, prompt, completion,
finish_reason, extracted, score, note) and summary.json.

Sampling streams: completions come from model/generate.py in chunks of --batch-size prompts (one
progress-bar step each); chunk c samples with seed + c. Greedy results do not depend on the
batch size; sampled ones are reproducible for a given (seed, batch size).
"""
import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from data.graders import Grade, grade_batch
from data.passk import maj_at_k, pass_at_k, report_ks
from data.readers import iter_jsonl, load_gsm8k, load_humaneval, load_math, require
from data.templates import STOP_STRINGS, render_prompt
from model.checkpoint import load_pretrained
from model.generate import Completion, SamplingParams, generate
from model.tokenizer import Tokenizer, check_vocab, load_tokenizer


@dataclass(frozen=True)
class Task:
    load: Callable[[Path], list[dict]]  # rows with "id" and "reference"
    grader: str                          # key of data.graders.GRADERS
    template: str                        # task name for data/templates.py's instruction
    question: str                        # the row field the prompt is built from


TASKS = {
    "gsm8k": Task(load_gsm8k, "gsm8k", "gsm8k", "question"),
    "synthetic": Task(load_gsm8k, "gsm8k", "synthetic", "question"),
    "math": Task(load_math, "math", "math", "problem"),
    "humaneval": Task(load_humaneval, "code", "humaneval", "prompt"),
    "synthetic-code": Task(load_humaneval, "code", "humaneval", "prompt"),
}


# A base model (fewshot style) continues a code prompt as code, the Codex protocol (Chen et al. 2021):
# the raw HumanEval prompt, the completion cut where a line at column 0 leaves the function body.
CODE_STOP_STRINGS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def raw_code_prompt(task: str, style: str) -> bool:
    return style == "fewshot" and TASKS[task].grader == "code"


def render_prompts(tokenizer: Tokenizer, rows: list[dict], task: str, style: str) -> list[str]:
    spec = TASKS[task]
    if raw_code_prompt(task, style):
        return [row["prompt"] for row in rows]
    return [render_prompt(tokenizer, row[spec.question], style, task=spec.template) for row in rows]


def stop_strings(task: str, style: str) -> tuple[str, ...]:
    return CODE_STOP_STRINGS if raw_code_prompt(task, style) else STOP_STRINGS[style]


def sample(model, tokenizer: Tokenizer, prompts: list[str], params: SamplingParams, batch_size: int | None,
           progress: bool = True) -> list[Completion]:
    """params.n completions per prompt, ordered by (prompt, sample); see the docstring on seeds."""
    ids = [tokenizer.encode(prompt) for prompt in prompts]
    batch_size = batch_size or len(ids)
    completions = []
    with tqdm(total=len(ids), desc="generate", unit="prompt", disable=not progress) as bar:
        for chunk, start in enumerate(range(0, len(ids), batch_size)):
            batch = ids[start:start + batch_size]
            out = generate(model, batch, replace(params, seed=params.seed + chunk), tokenizer.stop_ids, tokenizer)
            completions += [replace(c, prompt_index=start + c.prompt_index) for c in out]
            bar.update(len(batch))
    return completions


def graded_text(completion: str, task: str, style: str) -> str:
    """The completion as graded: fewshot answers follow "Answer:" after the space format_completion adds."""
    templated_fewshot = style == "fewshot" and not raw_code_prompt(task, style)
    return completion[1:] if templated_fewshot and completion.startswith(" ") else completion


def score(rows: list[dict], task: str, completions: list[list[str]], workers: int | None = None) -> tuple[list[dict], dict]:
    """Grade completions[i], the samples of rows[i]: (one record per sample, summary)."""
    flat = [(row, j, text) for row, texts in zip(rows, completions, strict=True) for j, text in enumerate(texts)]
    grades = grade_batch(TASKS[task].grader, [text for _, _, text in flat], [row["reference"] for row, _, _ in flat], workers)
    records = [{"id": row["id"], "sample": j, "completion": text, "extracted": g.extracted, "score": g.score, "note": g.note}
               for (row, j, text), g in zip(flat, grades)]
    per_problem, start = [], 0
    for texts in completions:
        per_problem.append(grades[start:start + len(texts)])
        start += len(texts)
    return records, summarize(task, per_problem)


def summarize(task: str, per_problem: list[list[Grade]]) -> dict:
    """pass@k (and maj@k for answer tasks) averaged over problems, for k up to the fewest samples."""
    if not per_problem or not all(per_problem):
        raise ValueError("summarize: every problem needs at least one graded sample")
    n = min(len(grades) for grades in per_problem)
    summary = {"task": task, "problems": len(per_problem), "samples_per_problem": n}
    for k in range(1, n + 1):
        summary[f"pass@{k}"] = _mean(pass_at_k(len(g), sum(x.score == 1.0 for x in g), k) for g in per_problem)
    if TASKS[task].grader != "code":
        for k in range(1, n + 1):
            summary[f"maj@{k}"] = _mean(maj_at_k([x.extracted for x in g], [x.score for x in g], k) for g in per_problem)
    return summary


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def evaluate(model, tokenizer: Tokenizer, rows: list[dict], task: str, params: SamplingParams, style: str = "chat",
             batch_size: int | None = None, workers: int | None = None, out_dir: str | Path | None = None,
             progress: bool = True) -> dict:
    """Generate params.n completions per row, grade them, write out_dir (if given); return the summary.

    The stop strings of the prompt format are added to params.stop_strings.
    """
    if not rows:
        raise ValueError("evaluate: no rows to evaluate")
    prompts = render_prompts(tokenizer, rows, task, style)
    params = replace(params, stop_strings=tuple(dict.fromkeys(params.stop_strings + stop_strings(task, style))))
    completions = sample(model, tokenizer, prompts, params, batch_size, progress)
    texts = [[graded_text(c.text, task, style) for c in completions[i * params.n:(i + 1) * params.n]]
             for i in range(len(rows))]
    records, summary = score(rows, task, texts, workers)
    for record, completion in zip(records, completions):
        record["prompt"] = prompts[completion.prompt_index]
        record["finish_reason"] = completion.finish_reason
    summary.update(style=style, temperature=params.temperature, top_p=params.top_p,
                   max_new_tokens=params.max_new_tokens, seed=params.seed)
    if out_dir is not None:
        write_outputs(out_dir, records, summary)
    return summary


def read_completions(path: str | Path, rows: list[dict]) -> tuple[list[dict], list[list[str]]]:
    """Grade-only input: lines {"id": row index or task_id, "completion": str}, several per id for pass@k.

    Returns the rows that have completions (in data order) and their completions (in file order).
    """
    by_id = {row["id"]: row for row in rows}
    grouped: dict = {}
    for where, record in iter_jsonl(path):
        row_id = require(record, "id", (int, str), where)
        if row_id not in by_id:
            raise ValueError(f"{where}: field 'id' {row_id!r} matches no row of the data (ids: row index or task_id)")
        grouped.setdefault(row_id, []).append(require(record, "completion", str, where))
    if not grouped:
        raise ValueError(f"{path}: no completions")
    used = [row for row in rows if row["id"] in grouped]
    return used, [grouped[row["id"]] for row in used]


def write_outputs(out_dir: str | Path, records: list[dict], summary: dict):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "generations.jsonl", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def print_table(summary: dict):
    """summary's entries, its pass@k / maj@k only for the k of report_ks."""
    shown = {f"{metric}@{k}" for metric in ("pass", "maj") for k in report_ks(summary["samples_per_problem"])}
    for key, value in summary.items():
        if "@" in key and key not in shown:
            continue
        print(f"{key:<22}{value:.4f}" if isinstance(value, float) else f"{key:<22}{value}")


def load_model(model_dir: str, tokenizer_dir: str, device: str):
    """(model, tokenizer) from a checkpoint directory; bf16 on CUDA, fp32 elsewhere."""
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_pretrained(model_dir, dtype=dtype, device=device)
    check_vocab(tokenizer, model.config, tokenizer_dir)
    return model, tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", required=True, help="benchmark file (.jsonl or .jsonl.gz)")
    p.add_argument("--model", help="checkpoint directory (HF layout)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--completions", help="grade this JSONL of {id, completion} instead of generating")
    p.add_argument("--style", default="chat", choices=["chat", "fewshot"])
    p.add_argument("--n-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="prompts generated together")
    p.add_argument("--limit", type=int, help="first K problems only")
    p.add_argument("--workers", type=int, help="concurrent sandboxed programs (default: 2 per core)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="directory for generations.jsonl and summary.json")
    args = p.parse_args(argv)
    if (args.model is None) == (args.completions is None):
        p.error("give exactly one of --model (generate and grade) or --completions (grade only)")
    if args.n_samples > 1 and args.temperature == 0:
        p.error("--n-samples > 1 with --temperature 0 gives n identical greedy samples; set --temperature > 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = TASKS[args.task].load(Path(args.data))[:args.limit]
    if args.completions:
        rows, completions = read_completions(args.completions, rows)
        records, summary = score(rows, args.task, completions, args.workers)
        if args.out:
            write_outputs(args.out, records, summary)
    else:
        model, tokenizer = load_model(args.model, args.tokenizer or args.model, args.device)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, n=args.n_samples, seed=args.seed)
        summary = evaluate(model, tokenizer, rows, args.task, params, args.style, args.batch_size, args.workers, args.out)
    print_table(summary)
    return summary


if __name__ == "__main__":
    main()
