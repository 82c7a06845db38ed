"""Generation throughput: model/generate.py vs transformers `generate`, same weights, same batch.

Preset "bench-tiny" with random weights, 64 prompts of 16-64 tokens x 128 new tokens, no stop tokens
(every row generates all 128), left-padded batch for transformers. Prints tokens/s of each, the ratio
(target >= 3x) for nucleus sampling (T=1, top_p=0.95), plain sampling (T=1) and greedy, and checks
that greedy outputs of the two engines agree token for token.

    python bench/bench_generate.py [--repeats 3] [--prompts 64] [--new-tokens 128]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.checkpoint import save_pretrained  # noqa: E402
from model.config import PRESETS  # noqa: E402
from model.generate import SamplingParams, generate  # noqa: E402
from model.transformer import Transformer  # noqa: E402

TARGET = 3.0
MODES = {  # name -> (temperature, top_p)
    "sample T=1 top_p=0.95": (1.0, 0.95),
    "sample T=1": (1.0, 1.0),
    "greedy": (0.0, 1.0),
}


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 65, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths]


def ours(model, prompts, new_tokens, temperature, top_p) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, top_p=top_p)
    out = generate(model, prompts, params, stop_ids=[])
    assert all(len(c.tokens) == new_tokens for c in out)
    return [c.tokens for c in out]


def hf_generate(hf, prompts, new_tokens, temperature, top_p) -> list[list[int]]:
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])  # (B, P) left-padded
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    sampling = dict(do_sample=False)
    if temperature:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                          pad_token_id=0, **sampling)
    assert out.shape[1] == P + new_tokens
    return out[:, P:].tolist()


def timed_pair(fns, repeats: int) -> list[tuple[float, list[list[int]]]]:
    """(median seconds, last output) of each fn; calls alternate so both see the same machine load."""
    times, results = [[] for _ in fns], [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [(statistics.median(t), r) for t, r in zip(times, results)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    config = PRESETS["bench-tiny"]
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    prompts = make_prompts(args.prompts, config.vocab_size)
    generated = args.prompts * args.new_tokens
    print(f"bench-tiny ({config.num_parameters / 1e6:.2f}M params), {args.prompts} prompts of 16-64 tokens x "
          f"{args.new_tokens} new tokens, fp32 CPU, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'mode':<24}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>8}{'target':>8}  result")
    for name, (temperature, top_p) in MODES.items():
        ours(model, prompts[:4], 8, temperature, top_p)  # warm-up
        hf_generate(hf, prompts[:4], 8, temperature, top_p)
        (t_ours, tokens_ours), (t_hf, tokens_hf) = timed_pair(
            [lambda: ours(model, prompts, args.new_tokens, temperature, top_p),
             lambda: hf_generate(hf, prompts, args.new_tokens, temperature, top_p)], args.repeats)
        ratio = t_hf / t_ours
        print(f"{name:<24}{generated / t_ours:>12.0f}{generated / t_hf:>12.0f}{ratio:>7.2f}x{TARGET:>7.1f}x  "
              f"{'PASS' if ratio >= TARGET else 'MISS'}")
        if temperature == 0:
            same = sum(a == b for a, b in zip(tokens_ours, tokens_hf))
            print(f"  greedy parity: {same}/{len(prompts)} completions identical to transformers'")


if __name__ == "__main__":
    main()
