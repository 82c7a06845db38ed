"""Model speed and memory vs transformers on the same weights (CPU, fp32).

1. Training step = forward + backward + AdamW step, preset "bench-tiny", batch 32 x 256 tokens, the
   same cross-entropy on the logits for both: tokens/s ours / transformers Qwen2ForCausalLM.
   Target >= 1.2x.
2. Forward of the Qwen2.5-0.5B shape (random weights, 1 x 512 tokens, no grad). Each library loads
   the same checkpoint (written once by our save_pretrained) in a fresh subprocess, so the peak RSS
   reported is its own: load seconds, peak RSS after loading, tokens/s, peak RSS after the forwards.
   Both libraries memory-map the safetensors file, so RSS after loading is small and the weights
   become resident in the first forward: the peak after the forwards is the figure to compare.
   Each library runs twice in ABBA order; times are averaged, memory is the max. Target >= 1.0x.

Before timing, the logits of both models on the benchmark input are compared (max |diff|).

    python bench/bench_model.py [--iters 5] [--skip-forward]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import median_seconds, peak_rss_mib, print_table, run_json_subprocess, verdict  # noqa: E402
from model.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from model.config import PRESETS  # noqa: E402
from model.transformer import Transformer  # noqa: E402

TRAIN_TARGET, FORWARD_TARGET = 1.2, 1.0
TRAIN_BATCH, TRAIN_LEN, FORWARD_LEN = 32, 256, 512


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path)


def logits_fn(model):
    """model(input_ids) -> logits [B, T, V] for either library."""
    return model if isinstance(model, Transformer) else (lambda ids: model(ids).logits)


def bench_train_step(iters: int) -> list:
    config = PRESETS["bench-tiny"]
    torch.manual_seed(0)
    ours = Transformer(config)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp)
        theirs = hf_model(tmp).train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (TRAIN_BATCH, TRAIN_LEN + 1), generator=gen)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        diff = (ours(inputs[:2]) - logits_fn(theirs)(inputs[:2])).abs().max().item()

    def train_step(model):
        forward, optimizer = logits_fn(model), torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = F.cross_entropy(forward(inputs).flatten(0, 1), targets.flatten())  # (B*T, V) vs (B*T,)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    seconds = median_seconds({"ours": train_step(ours), "hf": train_step(theirs)}, warmup=1, iters=iters)
    tokens = TRAIN_BATCH * TRAIN_LEN
    ratio = seconds["hf"] / seconds["ours"]
    print(f"training step: bench-tiny {config.num_parameters / 1e6:.2f}M params, batch {TRAIN_BATCH}x{TRAIN_LEN}, "
          f"fp32, AdamW; max |logits diff| {diff:.1e}")
    return ["train step (tokens/s)", tokens / seconds["ours"], tokens / seconds["hf"], ratio, TRAIN_TARGET,
            verdict(ratio, TRAIN_TARGET)]


def forward_worker(library: str, path: str, iters: int):
    """Subprocess body: load, time no-grad forwards of 1 x FORWARD_LEN tokens, print one JSON line."""
    start = time.perf_counter()
    model = load_pretrained(path) if library == "ours" else hf_model(path).eval()
    load_seconds, load_rss = time.perf_counter() - start, peak_rss_mib()
    ids = torch.randint(0, model.config.vocab_size, (1, FORWARD_LEN), generator=torch.Generator().manual_seed(0))
    forward = logits_fn(model)
    with torch.no_grad():
        seconds = median_seconds({"forward": lambda: forward(ids)}, warmup=1, iters=iters)["forward"]
        head = forward(ids)[0, -4:]  # (4, V): returned so the parent can compare libraries
    print(json.dumps({"load_s": load_seconds, "load_rss_mib": load_rss, "tokens_per_s": FORWARD_LEN / seconds,
                      "peak_rss_mib": peak_rss_mib(), "logits_tail": head.tolist()}))


def merge_runs(runs: list[dict]) -> dict:
    """One figure per library from its repeated worker runs: mean times and speed, max memory."""
    merged = {key: sum(r[key] for r in runs) / len(runs) for key in ("load_s", "tokens_per_s")}
    merged.update({key: max(r[key] for r in runs) for key in ("load_rss_mib", "peak_rss_mib")})
    return {**merged, "logits_tail": runs[0]["logits_tail"]}


def bench_forward(iters: int) -> list:
    config = PRESETS["qwen2.5-0.5b"]
    runs = {"ours": [], "hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_pretrained(Transformer(config), tmp)
        for lib in ("ours", "hf", "hf", "ours"):  # ABBA: slow drift of background load hits both alike
            runs[lib].append(run_json_subprocess([__file__, "--forward-worker", lib, "--checkpoint", tmp,
                                                  "--iters", str(iters)]))
    runs = {lib: merge_runs(r) for lib, r in runs.items()}
    diff = (torch.tensor(runs["ours"]["logits_tail"]) - torch.tensor(runs["hf"]["logits_tail"])).abs().max().item()
    print(f"forward: Qwen2.5-0.5B shape {config.num_parameters / 1e6:.1f}M params, random weights, "
          f"1x{FORWARD_LEN} tokens, fp32, no grad; max |logits diff| {diff:.1e}")
    print_table(["library", "load s", "RSS after load MiB (mmap)", "tokens/s", "peak RSS MiB"],
                [[lib, r["load_s"], r["load_rss_mib"], r["tokens_per_s"], r["peak_rss_mib"]] for lib, r in runs.items()])
    ratio = runs["ours"]["tokens_per_s"] / runs["hf"]["tokens_per_s"]
    return ["0.5B forward (tokens/s)", runs["ours"]["tokens_per_s"], runs["hf"]["tokens_per_s"], ratio,
            FORWARD_TARGET, verdict(ratio, FORWARD_TARGET)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (median reported)")
    parser.add_argument("--skip-forward", action="store_true", help="only the training-step benchmark")
    parser.add_argument("--forward-worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.forward_worker:
        return forward_worker(args.forward_worker, args.checkpoint, args.iters)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [bench_train_step(args.iters)]
    if not args.skip_forward:
        rows.append(bench_forward(args.iters))
    print_table(["benchmark", "ours", "transformers", "ratio", "target", "verdict"], rows)


if __name__ == "__main__":
    main()
