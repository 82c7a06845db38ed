"""Fused log-softmax kernels on a GPU: achieved bandwidth against the device's own copy bandwidth,
and speed and memory against torch and the plain-torch references.

Bandwidth is bytes / time as a fraction of a device-to-device copy measured in the same run, the
device's practical peak (target >= 80% of it). Two byte counts are printed:
  moved: what the kernels read and write. Forward reads the logits twice (the online softmax pass,
         then the output pass) and writes fp32 log-probs; backward reads the fp32 gradient twice
         (its row sum first) and the logits once, and writes the logits' gradient. A 150k-vocabulary
         row (300 KB in bf16) does not fit on one SM, so the second read cannot be avoided.
  ideal: each tensor read or written once (what a single-read kernel would need).

    python bench/bench_kernels.py [--rows 4096] [--vocab 151936] [--dtype bf16]

Without a GPU it prints "no GPU: skipped" and times the log-softmax reference against torch on 32 CPU rows.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from kernels.kl_div import kl_div_reference  # noqa: E402
from kernels.log_softmax import log_softmax_reference  # noqa: E402
from kernels.token_logprobs import cross_entropy_reference, token_logprobs_reference  # noqa: E402

TARGET = 0.80
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cuda_ms(fn, repeats: int = 20) -> float:
    """Median milliseconds of fn() on the GPU, after two warm-up calls (compilation, allocator)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(n_bytes: int) -> float:
    """Bytes/s of a device-to-device copy (reads and writes n_bytes each): the device's practical peak."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n_bytes / (cuda_ms(lambda: dst.copy_(src)) / 1e3)


def backward_ms(forward, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Milliseconds of the backward pass alone: one forward, then repeated backwards through its graph."""
    out = forward(x)
    return cuda_ms(lambda: torch.autograd.grad(out, x, grad, retain_graph=True))


def bandwidth_report(rows: int, vocab: int, dtype: torch.dtype) -> None:
    x = torch.randn(rows, vocab, device="cuda").to(dtype).requires_grad_()
    g = torch.randn(rows, vocab, device="cuda")
    in_bytes, elems = x.element_size(), rows * vocab
    peak = copy_bandwidth(elems * in_bytes)
    moved = {"forward": elems * (2 * in_bytes + 4), "backward": elems * (2 * 4 + 2 * in_bytes)}
    ideal = {"forward": elems * (in_bytes + 4), "backward": elems * (4 + 2 * in_bytes)}
    impls = {"triton": lambda z: kernels.log_softmax(z),
             "torch": lambda z: torch.log_softmax(z, dim=-1, dtype=torch.float32)}
    print(f"log_softmax {rows}x{vocab} {dtype}: device copy bandwidth {peak / 1e9:.0f} GB/s")
    for phase in ("forward", "backward"):
        ms = {name: (cuda_ms(lambda: fn(x.detach())) if phase == "forward" else backward_ms(fn, x, g))
              for name, fn in impls.items()}
        seconds = ms["triton"] / 1e3
        frac_moved, frac_ideal = moved[phase] / seconds / peak, ideal[phase] / seconds / peak
        verdict = "ok" if frac_moved >= TARGET else f"below the {TARGET:.0%} target"
        print(f"  {phase:8s} triton {ms['triton']:7.3f} ms: {frac_moved:5.1%} of copy bandwidth on bytes moved "
              f"({verdict}), {frac_ideal:5.1%} on ideal bytes; torch.log_softmax {ms['torch']:7.3f} ms, "
              f"speed-up x{ms['torch'] / ms['triton']:.2f}")


def train_step(fn, x: torch.Tensor) -> tuple[float, float]:
    """(ms, peak MiB above the inputs) of a forward + backward of fn(x).sum()."""
    step = lambda: torch.autograd.grad(fn(x).sum(), x)   # noqa: E731
    ms = cuda_ms(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def loss_report(rows: int, vocab: int, dtype: torch.dtype) -> None:
    x = torch.randn(rows, vocab, device="cuda").to(dtype).requires_grad_()
    teacher = torch.randn(rows, vocab, device="cuda").to(dtype)
    t = torch.randint(0, vocab, (rows,), device="cuda")
    t[::4] = -100
    ops = {
        "cross_entropy": (lambda z: kernels.cross_entropy(z, t), lambda z: cross_entropy_reference(z, t),
                          lambda z: F.cross_entropy(z.float(), t, reduction="none")),
        "token_logprobs T=0.7": (lambda z: kernels.token_logprobs(z, t.clamp(min=0), 0.7),
                                 lambda z: token_logprobs_reference(z, t.clamp(min=0), 0.7), None),
        "kl forward T=2": (lambda z: kernels.kl_div(z, teacher, 2.0), lambda z: kl_div_reference(z, teacher, 2.0),
                           None),
        "kl reverse": (lambda z: kernels.kl_div(z, teacher, reverse=True),
                       lambda z: kl_div_reference(z, teacher, reverse=True), None),
    }
    print(f"forward + backward, {rows}x{vocab} {dtype}: ms (peak MiB above inputs)")
    for name, (ours, reference, torch_op) in ops.items():
        (ms, mib), (ref_ms, ref_mib) = train_step(ours, x), train_step(reference, x)
        line = f"  {name:22s} triton {ms:7.3f} ms ({mib:6.0f})  reference {ref_ms:7.3f} ms ({ref_mib:6.0f})"
        if torch_op is not None:
            torch_ms, torch_mib = train_step(torch_op, x)
            line += f"  F.cross_entropy(fp32) {torch_ms:7.3f} ms ({torch_mib:6.0f})"
        print(line + f"  speed-up vs reference x{ref_ms / ms:.2f}")


def cpu_report(rows: int, vocab: int) -> None:
    x = torch.randn(rows, vocab, requires_grad=True)
    for name, fn in {"log_softmax_reference": log_softmax_reference,
                     "torch.log_softmax": lambda z: torch.log_softmax(z, dim=-1)}.items():
        times = []
        for _ in range(6):   # the first is a warm-up
            start = time.perf_counter()
            fn(x).sum().backward()
            times.append(time.perf_counter() - start)
        print(f"  CPU {name:22s} forward + backward {rows}x{vocab} fp32: "
              f"{statistics.median(times[1:]) * 1e3:7.1f} ms (median of 5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    args = parser.parse_args()
    if not (torch.cuda.is_available() and kernels.HAS_TRITON):
        print("no GPU: skipped (Triton speed is unmeasured on CPU); timing the reference on the CPU only")
        cpu_report(32, args.vocab)
        return
    print(f"device: {torch.cuda.get_device_name()}")
    bandwidth_report(args.rows, args.vocab, DTYPES[args.dtype])
    loss_report(args.rows, args.vocab, DTYPES[args.dtype])


if __name__ == "__main__":
    main()
