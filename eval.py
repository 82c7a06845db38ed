"""Evaluate a checkpoint: render prompts, sample completions, grade them, report pass@k and maj@k.

    python eval.py --model DIR --task gsm8k --data ../shared/data/gsm8k/test.jsonl --out runs/eval-gsm8k
    python eval.py --model DIR --task humaneval --data HumanEval.jsonl.gz --n-samples 10 --temperature 0.8
    python eval.py --task gsm8k --data test.jsonl --completions completions.jsonl   # grade only, no model

The tasks, their prompts, stop strings and graders are data/tasks.py's; generation and grading are
trainer/evaluation.py's `evaluate`. summary.json holds pass@k and maj@k for every k <= n; the printed
table shows k = 1, 2, 4, ... < n and n. Outputs in --out: generations.jsonl (one line per sample: id,
sample, prompt, completion, finish_reason, extracted, score, note) and summary.json.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

from data.passk import report_ks
from data.tasks import TASKS, load_rows, read_completions, score
from data.templates import STYLES
from model.generate import SamplingParams
from trainer import cli
from trainer.evaluation import evaluate, load_model, write_outputs


def print_table(summary: dict):
    """summary's entries, its pass@k / maj@k only for the k of report_ks."""
    shown = {f"{metric}@{k}" for metric in ("pass", "maj") for k in report_ks(summary["samples_per_problem"])}
    for key, value in summary.items():
        if "@" in key and key not in shown:
            continue
        print(f"{key:<22}{value:.4f}" if isinstance(value, float) else f"{key:<22}{value}")


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="eval.py", description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", required=True, help="benchmark file (.jsonl or .jsonl.gz)")
    p.add_argument("--model", help="checkpoint directory (HF layout)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--completions", help="grade this JSONL of {id, completion} instead of generating")
    p.add_argument("--style", default="chat", choices=STYLES)
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
    check_args(args)
    return args


def check_args(args: argparse.Namespace):
    """Every flag, before any file is read or model loaded: a one-line error naming the flag."""
    if (args.model is None) == (args.completions is None):
        raise ValueError("give exactly one of --model (generate and grade) or --completions (grade only)")
    ranges = [("--n-samples", args.n_samples, args.n_samples >= 1, ">= 1"),
              ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
              ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
              ("--seed", args.seed, args.seed >= 0, ">= 0"),
              ("--temperature", args.temperature, 0 <= args.temperature < math.inf, "a finite number >= 0"),
              ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
              ("--limit", args.limit, args.limit is None or args.limit >= 1, ">= 1"),
              ("--workers", args.workers, args.workers is None or args.workers >= 1, ">= 1")]
    for flag, value, ok, expected in ranges:
        if not ok:
            raise ValueError(f"{flag} must be {expected}, got {value}")
    if args.n_samples > 1 and args.temperature == 0:
        raise ValueError("--n-samples > 1 with --temperature 0 gives n identical greedy samples; set --temperature > 0")
    for flag, path in (("--data", args.data), ("--completions", args.completions)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag}: file {path} not found")
    for flag, path in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{flag}: directory {path} not found")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out: {args.out} exists and is not a directory")
    if args.model is not None:
        check_device(args.device)


def check_device(device: str):
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device: {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here; use --device cpu")


def make_out(out: str | None):
    """--out before the work: an unwritable directory fails now, not after grading everything."""
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)


def main(argv=None) -> dict:
    """Evaluate (or grade) and print the summary table; returns the summary."""
    args = parse_args(argv)
    rows = load_rows(args.task, args.data)[:args.limit]
    if args.completions:
        rows, completions = read_completions(args.completions, rows)
        make_out(args.out)
        records, summary = score(rows, args.task, completions, args.workers)
        if args.out:
            write_outputs(args.out, records, summary)
    else:
        model, tokenizer = load_model(args.model, args.tokenizer or args.model, args.device)
        make_out(args.out)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, n=args.n_samples, seed=args.seed)
        summary = evaluate(model, tokenizer, rows, args.task, params, args.style, args.batch_size, args.workers,
                           args.out)
    print_table(summary)
    return summary


if __name__ == "__main__":
    sys.exit(cli.run(main))
