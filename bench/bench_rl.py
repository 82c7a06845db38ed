"""One GRPO step on the embedded tiny student: time split rollout / rewards / update, and the rollout's
overhead over the bare generation engine.

Preset "tiny-student" with random weights, 16 prompts of 16-64 tokens x G = 8 samples x 64 new tokens,
nucleus sampling (T=1, top_p=0.95), no stop tokens (every row generates all tokens, so the shapes are
fixed). The same-shape plain `model.generate.generate` call is timed in the same run: target, the
rollout (generate + packing into tensors) is not slower per token (ratio >= 0.95, 5% for timing noise).
The update is one grpo_update (mu = 1, dapo aggregation, micro-batches of 32 sequences) on the batch.

    python bench/bench_rl.py [--repeats 3] [--prompts 16] [--group-size 8] [--new-tokens 64] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_generate import make_prompts  # noqa: E402
from bench.common import median_seconds, verdict  # noqa: E402
from model.config import PRESETS  # noqa: E402
from model.generate import generate  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from rl.grpo import GRPOConfig, grpo_update, sequence_weights  # noqa: E402
from rl.rewards import RewardFn, compute_rewards  # noqa: E402
from rl.rollout import rollout  # noqa: E402

TARGET = 0.95
EVEN_TOKENS = RewardFn("even", lambda completions, refs: [sum(t % 2 == 0 for t in c.tokens) / len(c.tokens)
                                                          for c in completions])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = PRESETS["tiny-student"]
    torch.manual_seed(0)
    model = Transformer(config)
    prompts = make_prompts(args.prompts, config.vocab_size)
    cfg = GRPOConfig(group_size=args.group_size, max_new_tokens=args.new_tokens, top_p=0.95, micro_batch_size=32)
    params = cfg.sampling_params()
    new_tokens = args.prompts * args.group_size * args.new_tokens

    batch = rollout(model, prompts, [None] * len(prompts), params, stop_ids=[])
    assert int(batch.completion_mask.sum()) == new_tokens
    rewards, _ = compute_rewards([EVEN_TOKENS], batch.completions, batch.references)
    advantages, drop = sequence_weights(batch, rewards, cfg)
    policy = copy.deepcopy(model)  # trained in place by every timed update (lr 1e-5: same work each call)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    seconds = median_seconds({
        "generate": lambda: generate(model, prompts, params, stop_ids=[]),
        "rollout": lambda: rollout(model, prompts, [None] * len(prompts), params, stop_ids=[]),
        "rewards": lambda: compute_rewards([EVEN_TOKENS], batch.completions, batch.references),
        "update": lambda: grpo_update(policy, None, optimizer, batch, advantages, cfg, drop=drop),
    }, warmup=1, iters=args.repeats)  # round-robin: load drifting during the run hits all alike
    t_generate, t_rollout, t_rewards, t_update = (seconds[k] for k in ("generate", "rollout", "rewards", "update"))
    train_tokens = int(batch.attention_mask.sum())

    step = t_rollout + t_rewards + t_update
    print(f"GRPO step, preset tiny-student, {args.prompts} prompts x G={args.group_size} x {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'phase':<28}{'seconds':>10}{'share':>8}{'tokens/s':>12}")
    for name, t, tokens in (("rollout (generate + pack)", t_rollout, new_tokens), ("rewards", t_rewards, None),
                            ("update (fwd + bwd + AdamW)", t_update, train_tokens)):
        rate = f"{tokens / t:>12.0f}" if tokens else f"{'':>12}"
        print(f"{name:<28}{t:>10.3f}{t / step:>8.1%}{rate}")
    ratio = t_generate / t_rollout
    print(f"plain generate, same shape: {t_generate:.3f} s, {new_tokens / t_generate:.0f} tokens/s")
    print(f"rollout / generate tokens/s: {ratio:.3f} (target >= {TARGET}) {verdict(ratio, TARGET)}")


if __name__ == "__main__":
    main()
