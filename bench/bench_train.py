"""SFT throughput of train.py on CPU: 1 process vs 2 (torchrun, gloo), and the trainer's overhead
against a bare forward / backward / AdamW loop on the same batches.

    python bench/bench_train.py [--steps 30] [--warmup 5]
    OMP_NUM_THREADS=1 python bench/bench_train.py   # on a loaded machine: oversubscribed threads spin

Model: preset bench-tiny (hidden 256, 4 layers, 4 heads / 2 KV) with the vocabulary of a tokenizer
trained on the synthetic task; data: the synthetic GSM8K-style train split, ChatML prompts.
Throughput counts non-padding input tokens over the timed steps (after `warmup` steps) at the same
global batch (8 examples: 8 x 1 rank, or 4 x 2 ranks); bare and 1-process trainer runs alternate
in this process, best of `repeats` each (contention only ever slows a run down). The bare loop uses the same model init, the
same batches, the same fused chunked cross-entropy and AdamW; what it lacks is the trainer:
token counting and all-reduces, lr schedule, clipping, metrics, progress bar. Target: the trainer
is at most 10% slower than the bare loop.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from data.synthetic import corpus_texts, make_splits, write_jsonl  # noqa: E402
from losses import Head, cross_entropy  # noqa: E402
from model.config import PRESETS  # noqa: E402
from model.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from trainer.batches import collate, load_examples, rank_micro_batches, shifted_targets  # noqa: E402
from trainer.config import load_config  # noqa: E402

GLOBAL_BATCH = 8
OVERHEAD_TARGET = 0.10


def workspace(root: Path) -> Path:
    splits = make_splits(seed=0, n_train=512, n_test=1, n_harder=1)
    write_jsonl(root / "train.jsonl", splits["train"])
    train_tokenizer(corpus_texts(splits["train"]), root / "tok", vocab_size=2048)
    return root


def trainer_args(ws: Path, out: Path, steps: int, micro_batch_size: int) -> list[str]:
    return ["--model", "bench-tiny", "--tokenizer", str(ws / "tok"), "--data", str(ws / "train.jsonl"),
            "--out", str(out), "--max-steps", str(steps), "--set", f"data.micro_batch_size={micro_batch_size}",
            "--set", "data.max_len=256", "--set", f"save_every={steps}", "--set", "optim.warmup_steps=2"]


def step_tokens(ws: Path, steps: int) -> list[int]:
    """Non-padding input tokens of each optimizer step (the same for any rank split)."""
    cfg = load_config(None, {"model": "bench-tiny", "out": "-", "data.path": str(ws / "train.jsonl")},
                      [("data.max_len", "256")])
    examples = load_examples(cfg.data.path, cfg.data, load_tokenizer(ws / "tok"))
    return [sum(len(ids) for m in rank_micro_batches(examples, s, 0, GLOBAL_BATCH, 1, 0, 1) for ids, _ in m)
            for s in range(steps)]


def trainer_throughput(out: Path, tokens: list[int], warmup: int) -> float:
    """Tokens of steps warmup+1..N over the wall time between their records (everything the loop does)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in records}
    return sum(tokens[warmup:]) / (elapsed[len(tokens)] - elapsed[warmup])


def run_trainer(ws: Path, out: Path, steps: int, world_size: int) -> None:
    """One process: in this process (same threads as the bare loop); more: torchrun subprocess."""
    args = trainer_args(ws, out, steps, GLOBAL_BATCH // world_size)
    if world_size == 1:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), contextlib.redirect_stdout(devnull):
            assert train.main(args) == 0
        return
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size),
                str(ROOT / "train.py")]
    subprocess.run(launcher + args, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)


def bare_throughput(ws: Path, tokens: list[int], warmup: int) -> float:
    """The same steps as plain PyTorch: forward, fused CE sum / count, backward, AdamW."""
    cfg = load_config(None, {"model": "bench-tiny", "out": "-", "data.path": str(ws / "train.jsonl")},
                      [("data.max_len", "256")])
    tokenizer = load_tokenizer(ws / "tok")
    examples = load_examples(cfg.data.path, cfg.data, tokenizer)
    torch.manual_seed(cfg.seed)
    model = Transformer(replace(PRESETS["bench-tiny"], vocab_size=tokenizer.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.95))
    for step in range(len(tokens)):
        if step == warmup:
            t0 = time.perf_counter()
        batch = collate(rank_micro_batches(examples, step, 0, GLOBAL_BATCH, 1, 0, 1)[0], tokenizer.pad_id, "cpu")
        targets = shifted_targets(batch["labels"])
        hidden = model(batch["input_ids"], batch["attention_mask"], return_hidden=True)  # (B, T, d)
        loss = cross_entropy(Head(hidden, model.output_weight), targets, reduction="sum", chunk_size=cfg.chunk_size)
        (loss / (targets != -100).sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(tokens[warmup:]) / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="alternate bare / trainer runs, keep the best of each")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = workspace(Path(tmp))
        tokens = step_tokens(ws, args.steps)
        bare, one = 0.0, 0.0
        for r in range(args.repeats):
            bare = max(bare, bare_throughput(ws, tokens, args.warmup))
            run_trainer(ws, Path(tmp) / f"one{r}", args.steps, 1)
            one = max(one, trainer_throughput(Path(tmp) / f"one{r}", tokens, args.warmup))
        run_trainer(ws, Path(tmp) / "two", args.steps, 2)
        two = trainer_throughput(Path(tmp) / "two", tokens, args.warmup)
        vocab = load_tokenizer(ws / "tok").vocab_size
    overhead = bare / one - 1
    print(f"SFT, preset bench-tiny (vocab {vocab}), CPU fp32, torch threads {torch.get_num_threads()}, "
          f"global batch {GLOBAL_BATCH} x <=256 tokens, {args.steps} steps ({args.warmup} warm-up), "
          f"best of {args.repeats}")
    print(f"{'variant':<34}{'tokens/s':>10}{'ratio':>8}{'target':>10}{'':>6}")
    print(f"{'bare fwd/bwd/AdamW loop':<34}{bare:>10.0f}{1.0:>8.2f}")
    print(f"{'train.py, 1 process':<34}{one:>10.0f}{one / bare:>8.2f}{'>= 0.91':>10}"
          f"{'PASS' if overhead <= OVERHEAD_TARGET else 'MISS':>6}   (overhead {100 * overhead:+.1f}%)")
    print(f"{'train.py, 2 processes (gloo)':<34}{two:>10.0f}{two / one:>8.2f}{'(vs 1)':>10}")


if __name__ == "__main__":
    main()
