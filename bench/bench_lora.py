"""One SFT step with LoRA vs full fine-tuning, Qwen2.5-0.5B shape (CPU, fp32, random weights).

A step = forward + the trainer's fused chunked cross-entropy + backward + AdamW step (train.py's
build_optimizer: trainable parameters only), batch 1 x 256 tokens. LoRA: rank 16, alpha 32, all
seven projections of every layer (model/lora.py). Each case runs in its own subprocess, so its peak
RSS is its own: the model (~1.9 GiB fp32) is common to both; full fine-tuning adds a gradient and
two AdamW moments per weight (3 x 1.9 GiB), LoRA adds them for the adapters only (~1.8% of the
weights). Reported: trainable parameters, median step seconds after one warm-up step (which
allocates the AdamW state), peak RSS, and the LoRA / full ratios.

    python bench/bench_lora.py [--iters 3] [--tokens 256]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import median_seconds, peak_rss_mib, print_table, run_json_subprocess  # noqa: E402
from losses import Head, cross_entropy  # noqa: E402
from model.config import PRESETS  # noqa: E402
from model.lora import LoRAConfig, apply_lora  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from train import build_optimizer  # noqa: E402
from trainer.config import OptimConfig  # noqa: E402

LORA = LoRAConfig(rank=16, alpha=32.0)


def worker(case: str, iters: int, tokens: int):
    """Subprocess body: build the model, time SFT steps, print one JSON line."""
    torch.manual_seed(0)
    model = Transformer(PRESETS["qwen2.5-0.5b"])
    if case == "lora":
        apply_lora(model, LORA)
    model_rss = peak_rss_mib()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-4))
    ids = torch.randint(0, model.config.vocab_size, (1, tokens + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = ids[:, :-1], ids[:, 1:]  # (1, T) each

    def step():
        hidden = model(inputs, return_hidden=True)  # (1, T, d)
        cross_entropy(Head(hidden, model.output_weight), targets, reduction="mean", chunk_size=1024).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = median_seconds({case: step}, warmup=1, iters=iters)[case]
    print(json.dumps({"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "total": sum(p.numel() for p in model.parameters()), "step_s": seconds,
                      "model_rss_mib": model_rss, "peak_rss_mib": peak_rss_mib()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3, help="timed steps after the warm-up (median reported)")
    parser.add_argument("--tokens", type=int, default=256, help="sequence length (batch 1)")
    parser.add_argument("--worker", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.iters, args.tokens)
    runs = {case: run_json_subprocess([__file__, "--worker", case, "--iters", str(args.iters),
                                       "--tokens", str(args.tokens)]) for case in ("full", "lora")}
    full, lora = runs["full"], runs["lora"]
    print(f"SFT step, Qwen2.5-0.5B shape ({full['total'] / 1e6:.1f}M params), random weights, fp32, CPU, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1 x {args.tokens} tokens, "
          f"LoRA r={LORA.rank} alpha={LORA.alpha:g} on {LORA.targets}")
    print_table(["case", "trainable params (M)", "step s", "RSS after build MiB", "peak RSS MiB"],
                [[case, r["trainable"] / 1e6, r["step_s"], r["model_rss_mib"], r["peak_rss_mib"]]
                 for case, r in runs.items()])
    above_model = {case: r["peak_rss_mib"] - r["model_rss_mib"] for case, r in runs.items()}
    ratio = lambda key: lora[key] / full[key]  # noqa: E731
    print(f"LoRA / full: trainable params {ratio('trainable'):.4f}, step time {ratio('step_s'):.2f}x, "
          f"peak RSS {ratio('peak_rss_mib'):.2f}x, peak RSS above the built model "
          f"{above_model['lora'] / above_model['full']:.2f}x")

if __name__ == "__main__":
    main()
