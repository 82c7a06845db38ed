"""Peak memory and time of the chunked fused-linear losses vs the naive full-logits computation.

Forward + backward on CPU, fp32, at the Qwen2.5-0.5B head (d = 896, V = 151,936) and N = 4096 tokens:
- kd:       forward KL(teacher || student), student and teacher both projected from hidden states;
- ce:       next-token cross-entropy;
- logprobs: GRPO-style per-token log-probs (temperature 0.7) fed to an advantage-weighted sum;
            the chunked variant returns per-token values (reduction="none", checkpointed chunks);
- grpo_fused: the same objective written as one per-token loss through the fused "sum" path.

Each (case, variant) runs in its own fresh subprocess, one after another (the naive KD alone needs
several x 2.5 GB). Peak memory = peak RSS (VmHWM, reset once the inputs exist) over `--steps`
forward+backward steps, minus the RSS at that point; time = the last step.
Targets: chunked peak <= 15% of naive, time <= 1.2x naive.

    python bench/bench_losses.py            # full size (several minutes on 2 cores, ~16 GB free RAM)
    python bench/bench_losses.py --quick    # smoke run: N = 1024, V = 32000
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from losses import DEFAULT_CHUNK_SIZE, Head, cross_entropy, forward_kl, reduce_tokens, token_logprobs  # noqa: E402

CASES = ("kd", "ce", "logprobs", "grpo_fused")
TEMPERATURE = 0.7  # sampling temperature of the log-probs cases


def make_inputs(n: int, d: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden=torch.randn(n, d, generator=g).requires_grad_(),
        weight=(torch.randn(vocab, d, generator=g) * d ** -0.5).requires_grad_(),
        teacher_hidden=torch.randn(n, d, generator=g),
        teacher_weight=torch.randn(vocab, d, generator=g) * d ** -0.5,
        targets=torch.randint(0, vocab, (n,), generator=g),
        advantages=torch.randn(n, generator=g),
    )


def naive_loss(case: str, x: dict) -> torch.Tensor:
    """What one writes without chunking: full [N, V] logits and plain torch ops."""
    logits = x["hidden"] @ x["weight"].T  # (N, V)
    if case == "kd":
        with torch.no_grad():
            teacher = torch.log_softmax(x["teacher_hidden"] @ x["teacher_weight"].T, -1)  # (N, V)
        return F.kl_div(torch.log_softmax(logits, -1), teacher, log_target=True, reduction="batchmean")
    if case == "ce":
        return F.cross_entropy(logits, x["targets"])
    logp = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, x["targets"][:, None])[:, 0]  # (N,)
    return -(x["advantages"] * logp).mean()


def chunked_loss(case: str, x: dict, chunk_size: int) -> torch.Tensor:
    student = Head(x["hidden"], x["weight"])
    if case == "kd":
        return forward_kl(student, Head(x["teacher_hidden"], x["teacher_weight"]), chunk_size=chunk_size)
    if case == "ce":
        return cross_entropy(student, x["targets"], chunk_size=chunk_size)
    if case == "logprobs":
        logp = token_logprobs(student, x["targets"], TEMPERATURE, chunk_size=chunk_size)  # (N,)
        return -(x["advantages"] * logp).mean()
    grpo = lambda z, y, a: -a * torch.log_softmax(z / TEMPERATURE, -1).gather(-1, y[:, None])[:, 0]  # noqa: E731
    return reduce_tokens(grpo, student, (x["targets"], x["advantages"]), chunk_size=chunk_size)


def reset_peak_rss() -> float:
    """Reset the kernel's high-water mark of this process's RSS (Linux: clear_refs 5); return RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def worker(case: str, variant: str, n: int, d: int, vocab: int, chunk_size: int, steps: int) -> dict:
    x = make_inputs(n, d, vocab)
    base = reset_peak_rss()
    seconds = 0.0
    for _ in range(steps):  # the last step is timed (earlier ones warm the allocator)
        start = time.perf_counter()
        loss = naive_loss(case, x) if variant == "naive" else chunked_loss(case, x, chunk_size)
        grad_h, grad_w = torch.autograd.grad(loss, (x["hidden"], x["weight"]))
        seconds = time.perf_counter() - start
        del loss, grad_h, grad_w
    return dict(peak_mb=peak_rss_mb() - base, seconds=seconds)


def run_variant(case, variant, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", case, variant, "--n", str(args.n), "--d", str(args.d),
           "--vocab", str(args.vocab), "--chunk-size", str(args.chunk_size), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{case}/{variant} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke size: N=1024, V=32000")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--steps", type=int, default=2, help="forward+backward steps per variant; the last is timed")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.n, args.d, args.vocab, args.chunk_size, args.steps)))
        return
    if args.quick:
        args.n, args.vocab = 1024, 32000
    print(f"N={args.n} d={args.d} V={args.vocab} chunk_size={args.chunk_size} fp32 CPU "
          f"threads={torch.get_num_threads()}; peak = RSS above the inputs, time = one fwd+bwd step")
    print(f"{'case':<11} {'naive MB':>9} {'chunk MB':>9} {'mem ratio':>9} {'naive s':>8} {'chunk s':>8} "
          f"{'time ratio':>10}  mem<=15%  time<=1.2x")
    for case in args.cases:
        naive, chunked = run_variant(case, "naive", args), run_variant(case, "chunked", args)
        mem, tim = chunked["peak_mb"] / naive["peak_mb"], chunked["seconds"] / naive["seconds"]
        print(f"{case:<11} {naive['peak_mb']:>9.0f} {chunked['peak_mb']:>9.0f} {mem:>9.1%} {naive['seconds']:>8.2f} "
              f"{chunked['seconds']:>8.2f} {tim:>9.2f}x  {'PASS' if mem <= 0.15 else 'MISS':<8}  "
              f"{'PASS' if tim <= 1.2 else 'MISS'}", flush=True)


if __name__ == "__main__":
    main()
