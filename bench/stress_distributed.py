"""Abort count of 2-rank torchrun launches (gloo, CPU) under CPU load.

    python bench/stress_distributed.py [--reps 20] [--hogs 2] [--modes ddp fsdp] [--out DIR]
    python bench/stress_distributed.py --scenario teardown --reps 60

Scenario `train` (default): each repetition runs, per mode, what tests/test_train.py's rank tests run:
a tiny-student SFT run stopped after step 2 (`stop_at=2`), then resumed to step 3. Scenario `teardown`:
the end of such a run alone, in seconds instead of a minute: init_distributed, one DDP / FSDP step of a
small layer, three all_gather_object calls, cleanup, exit. Every launch is `torchrun --nproc_per_node 2`
with one torch thread per rank, while `--hogs` busy-looping processes compete for the cores. A launch
counts as an abort when a rank died of SIGABRT (what "terminate called without an active exception"
ends in); any other failure is counted apart. The stderr of every failed launch is kept in `--out`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.synthetic import corpus_texts, make_splits, write_jsonl  # noqa: E402
from model.tokenizer import train_tokenizer  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ABORT_MARKS = ("SIGABRT", "exitcode: -6", "terminate called")


def make_workspace(root: Path) -> Path:
    """train.jsonl and a tokenizer of the synthetic task, as tests/conftest.py's synthetic_workspace."""
    splits = make_splits(seed=0, n_train=24, n_test=8, n_harder=1)
    write_jsonl(root / "train.jsonl", splits["train"])
    train_tokenizer(corpus_texts(splits["train"]), root / "tok", 400)
    return root


def run_args(ws: Path, out: Path, mode: str) -> list[str]:
    """tests/test_train.py's base_args + RANKS_COMMON, one micro-batch per rank, DDP or FSDP."""
    return ["--model", "tiny-student", "--tokenizer", str(ws / "tok"), "--data", str(ws / "train.jsonl"),
            "--out", str(out), "--max-steps", "3", "--set", "data.max_len=256", "--set", "optim.lr=3e-3",
            "--set", "optim.warmup_steps=1", "--set", "save_every=1", "--set", "data.grad_accum_steps=2",
            "--set", "optim.eps=1e-3", "--set", "data.micro_batch_size=1", "--set", f"parallel={mode}"]


def torchrun(script: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def teardown_child(mode: str):
    """One rank of the teardown scenario (this file run by torchrun with --child MODE)."""
    import torch
    import torch.distributed as dist
    from trainer.distributed import cleanup, init_distributed
    d = init_distributed()
    layer = torch.nn.Linear(8, 8)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        fully_shard(layer)
    else:
        layer = torch.nn.parallel.DistributedDataParallel(layer)
    layer(torch.randn(2, 8)).sum().backward()
    for _ in range(3):  # what save_checkpoint ends with: objects gathered through Python-owned tensors
        dist.all_gather_object([None] * d.world_size, {"rank": d.rank, "state": list(range(100))})
    cleanup()


def outcome(result: subprocess.CompletedProcess) -> str:
    """"ok", "abort" (a rank died of SIGABRT) or "failed" (any other non-zero exit)."""
    if result.returncode == 0:
        return "ok"
    return "abort" if any(mark in result.stderr for mark in ABORT_MARKS) else "failed"


def start_hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen]):
    for hog in hogs:
        hog.kill()
        hog.wait()


def launches(scenario: str, ws: Path, out: Path, mode: str) -> list[tuple[str, Path, list[str]]]:
    """(phase, script, arguments) of one repetition of a scenario."""
    if scenario == "teardown":
        return [("teardown", Path(__file__).resolve(), ["--child", mode])]
    args = run_args(ws, out, mode)
    train_py = ROOT / "train.py"
    return [("stop", train_py, args + ["--set", "stop_at=2"]), ("resume", train_py, args + ["--resume"])]


def stress(scenario: str, ws: Path, logs: Path, modes: list[str], reps: int) -> dict[str, Counter]:
    """Per mode and phase, outcomes of `reps` repetitions (a failed phase skips the rest of its repetition)."""
    counts = {mode: Counter() for mode in modes}
    for rep in range(reps):
        for mode in modes:
            out = logs / f"{mode}_{rep:03d}"
            for phase, script, args in launches(scenario, ws, out, mode):
                result = torchrun(script, args)
                kind = outcome(result)
                counts[mode][f"{phase}_{kind}"] += 1
                if kind != "ok":
                    (logs / f"{mode}_{rep:03d}_{phase}.stderr").write_text(result.stderr[-6000:])
                    break
            print(f"rep {rep + 1}/{reps} {mode}: {dict(counts[mode])}", flush=True)
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--hogs", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    p.add_argument("--scenario", choices=["train", "teardown"], default="train")
    p.add_argument("--out", type=Path, default=None, help="where runs and failing stderr go (default: a temp dir)")
    p.add_argument("--child", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)  # a rank of the teardown scenario
    args = p.parse_args()
    if args.child:
        return teardown_child(args.child)
    root = args.out or Path(tempfile.mkdtemp(prefix="stress_distributed_"))
    root.mkdir(parents=True, exist_ok=True)
    ws = make_workspace(root) if args.scenario == "train" else root
    hogs = start_hogs(args.hogs)
    t0 = time.perf_counter()
    try:
        counts = stress(args.scenario, ws, root, args.modes, args.reps)
    finally:
        stop_hogs(hogs)
    print(f"\n{args.scenario}: {args.reps} repetitions, {args.hogs} CPU hogs, {time.perf_counter() - t0:.0f} s, "
          f"logs in {root}")
    for mode, c in counts.items():
        per_phase = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
        aborts = sum(v for k, v in c.items() if k.endswith("_abort"))
        failed = sum(v for k, v in c.items() if k.endswith("_failed"))
        print(f"{mode}: aborts {aborts}, other failures {failed} ({per_phase})")


if __name__ == "__main__":
    main()
