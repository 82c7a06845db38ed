"""Reward functions: verifiable correctness, optional format reward, optional length penalty.

A reward function scores a batch of sampled completions (model/generate.py's `Completion`: tokens,
text, finish_reason) against their prompts' references, one float each. The total reward is a
weighted sum

    r = sum_k w_k * f_k(completion, reference)

and every f_k is also returned on its own so each is logged separately.

- `correctness(grader)`: the benchmark grader's score (data/graders: gsm8k — also the embedded
  synthetic task, which uses GSM8K's format —, math, code through the sandbox). The outcome reward
  of DeepSeekMath / R1-Zero-style RL.
- `format_match(pattern)`: 1 when the text contains a match of a regex (e.g. an answer line), else 0.
- `overlong_penalty(max_new_tokens, buffer)`: DAPO's soft overlong punishment (Yu et al. 2025,
  arXiv:2503.14476, eq. 13): 0 up to max_new_tokens - buffer tokens, then falling linearly to -1
  at max_new_tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from model.generate import Completion

# completions, references -> one score per completion
BatchReward = Callable[[Sequence[Completion], Sequence[Any]], list[float]]


@dataclass(frozen=True)
class RewardFn:
    name: str  # key of its column in the logged metrics
    fn: BatchReward
    weight: float = 1.0


def _texts(completions: Sequence[Completion]) -> list[str]:
    if any(c.text is None for c in completions):
        raise ValueError("text rewards need decoded completions: pass a tokenizer to the rollout")
    return [c.text for c in completions]


def correctness(grader: str, workers: int | None = None) -> BatchReward:
    """Scores of data/graders/<grader>.py in [0, 1]; `workers` sandboxes run at once for "code"."""
    from data.graders import GRADERS, grade_batch  # here: the graders pull in math_verify and the sandbox
    if grader not in GRADERS:
        raise ValueError(f"unknown grader {grader!r}; known: {sorted(GRADERS)}")

    def score(completions, references):
        return [g.score for g in grade_batch(grader, _texts(completions), list(references), workers=workers)]
    return score


def format_match(pattern: str) -> BatchReward:
    """1.0 where `pattern` (a regex) occurs in the completion text, else 0.0."""
    regex = re.compile(pattern)
    return lambda completions, references: [float(regex.search(t) is not None) for t in _texts(completions)]


def overlong_penalty(max_new_tokens: int, buffer: int) -> BatchReward:
    """DAPO soft overlong punishment: clamp((max_new_tokens - buffer - length) / buffer, -1, 0)."""
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"overlong buffer must be in (0, max_new_tokens={max_new_tokens}], got {buffer}")
    start = max_new_tokens - buffer
    return lambda completions, references: [max(-1.0, min(0.0, (start - len(c.tokens)) / buffer))
                                            for c in completions]


def compute_rewards(reward_fns: Sequence[RewardFn], completions: Sequence[Completion],
                    references: Sequence[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total [B], {name: [B]}) for B completions."""
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    names = [rf.name for rf in reward_fns]
    if len(set(names)) != len(names):
        raise ValueError(f"reward function names must be unique, got {names}")
    per_fn = {rf.name: torch.tensor(rf.fn(completions, references), dtype=torch.float32)
              for rf in reward_fns}  # name -> (B,)
    total = torch.zeros(len(completions))
    for rf in reward_fns:
        total += rf.weight * per_fn[rf.name]
    return total, per_fn
