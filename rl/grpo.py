"""GRPO: one policy update on a batch of rollouts (DeepSeekMath, Shao et al. 2024, arXiv:2402.03300).

A step of the RL stage reads:

    batch = next(rollout_batches(...))                 # rl/rollout.py: G samples per prompt
    metrics = grpo_step(policy, ref, opt, batch, reward_fns, cfg)
        rewards    = compute_rewards(...)              # rl/rewards.py
        advantages = group_advantages(...)             # rl/advantages.py
        grpo_update(...)                               # mu optimizer steps on the same rollouts

What is kept from GRPO, and what is not:
- kept: group-relative advantages (no value network), the PPO-clipped importance ratio, mu
  iterations over one rollout batch, an optional KL penalty to a frozen reference in the loss (k3, as
  in DeepSeekMath, or k1);
- knobs from later work: std scaling "group" | "batch" | "none" (Dr. GRPO, Liu et al. 2025,
  arXiv:2503.20783, drops it), clip-higher eps_high, token-level "dapo" and constant "dr_grpo"
  aggregation, zero-variance group filtering and masking of truncated completions (DAPO, Yu et al.
  2025, arXiv:2503.14476);
- dropped: process supervision, iterative reward-model retraining, DAPO's re-sampling to refill
  filtered groups (filtered groups are masked out, not replaced).

beta = 0 (the default, as in DAPO and Dr. GRPO) keeps no reference model at all. With mu = 1 as well
(also the default) the ratio is exactly 1, the loss's gradient is REINFORCE's, and the update runs as
one fused lm_head pass (`_on_policy_objective`); otherwise log-probs with a graph feed `policy_loss`.

Normalisation: every micro-batch's loss is a SUM divided by the GLOBAL normaliser of the whole
rollout batch on all ranks (rl/policy_loss.py), all-reduced once before the first backward, so the
update does not depend on micro_batch_size or on the number of ranks. The data-parallel wrapper
(DDP, FSDP) averages gradients over ranks, so each rank scales its loss by world_size.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch

from losses import Head, entropy, token_logprobs
from model.generate import SamplingParams
from model.parallel import all_reduce_sum, clip_grad_norm, unwrap, world_size
from rl.advantages import ADVANTAGES, group_advantages, zero_std_groups
from rl.policy_loss import AGGREGATIONS, KL_ESTIMATORS, PolicyLossOutput, normaliser, policy_loss, token_weights
from rl.rewards import RewardFn, compute_rewards, correctness, format_match, overlong_penalty
from rl.rollout import RolloutBatch


@dataclass(frozen=True)
class GRPOConfig:
    prompts_per_step: int = 16  # prompts of one step over all ranks (a multiple of the world size)
    group_size: int = 8  # G completions per prompt
    temperature: float = 1.0  # rollout sampling
    top_p: float = 1.0
    max_new_tokens: int = 256  # completion length limit (also the Dr. GRPO constant)
    eps_low: float = 0.2  # ratio clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.2  # DAPO clip-higher uses 0.28
    beta: float = 0.0  # KL penalty weight; 0 -> no reference model
    kl_estimator: str = "k3"  # rl/policy_loss.py KL_ESTIMATORS: "k1" | "k3"
    aggregation: str = "dapo"  # rl/policy_loss.py AGGREGATIONS: "grpo" | "dapo" | "dr_grpo"
    advantage: str = "grpo"  # rl/advantages.py ADVANTAGES: "grpo" | "dr_grpo" | "batch_std"
    std_eps: float = 1e-4  # added to the std before dividing
    filter_zero_std: bool = False  # drop groups whose rewards are all equal (DAPO dynamic sampling)
    mask_truncated: bool = False  # drop completions cut at max_new_tokens (DAPO overlong filtering)
    mu: int = 1  # optimizer steps per rollout batch; 1 = fully on-policy (ratio == 1)
    micro_batch_size: int = 8  # sequences per forward/backward
    chunk_size: int = 1024  # tokens per lm_head chunk when computing log-probs
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 0  # rollout sampling seed
    format_pattern: str = ""  # regex for the format reward ...
    format_weight: float = 0.0  # ... and its weight (0 = off)
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens (0 = off) ...
    overlong_weight: float = 1.0  # ... and its weight

    def __post_init__(self):
        checks = [
            ("group_size", self.group_size >= 2, ">= 2 (a group baseline needs two samples)"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("eps_low", 0 <= self.eps_low < 1, "in [0, 1)"),
            ("eps_high", self.eps_high >= 0, ">= 0"),
            ("beta", self.beta >= 0, ">= 0"),
            ("kl_estimator", self.kl_estimator in KL_ESTIMATORS, f"one of {tuple(KL_ESTIMATORS)}"),
            ("aggregation", self.aggregation in AGGREGATIONS, f"one of {tuple(AGGREGATIONS)}"),
            ("advantage", self.advantage in ADVANTAGES, f"one of {tuple(ADVANTAGES)}"),
            ("std_eps", self.std_eps >= 0, ">= 0"),
            ("mu", self.mu >= 1, ">= 1"),
            ("micro_batch_size", self.micro_batch_size >= 1, ">= 1"),
            ("chunk_size", self.chunk_size >= 1, ">= 1"),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0"),
            ("prompts_per_step", self.prompts_per_step >= 1, ">= 1"),
            ("format_pattern", bool(self.format_pattern) or self.format_weight == 0, "set when format_weight != 0"),
            ("overlong_buffer", 0 <= self.overlong_buffer <= self.max_new_tokens, "in [0, max_new_tokens]"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"GRPOConfig.{name} must be {expected}, got {getattr(self, name)!r}")

    def sampling_params(self, stop_strings: tuple[str, ...] = ()) -> SamplingParams:
        """Rollout sampling; `stop_strings` come from the prompt template (e.g. few-shot's next "Question:")."""
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              n=self.group_size, stop_strings=stop_strings, seed=self.seed)

    def reward_fns(self, grader: str, workers: int | None = None) -> list[RewardFn]:
        """correctness by data/graders' `grader` (weight 1), plus the format reward and the overlong
        penalty when switched on; `workers` sandboxes run at once for the code grader."""
        fns = [RewardFn("correct", correctness(grader, workers))]
        if self.format_weight:
            fns.append(RewardFn("format", format_match(self.format_pattern), self.format_weight))
        if self.overlong_buffer:
            fns.append(RewardFn("overlong", overlong_penalty(self.max_new_tokens, self.overlong_buffer),
                                self.overlong_weight))
        return fns


def completion_head(model, batch: RolloutBatch) -> Head:
    """The lm_head inputs that predict the completion slots: Head(hidden [B, C, d], weight [V, d]).
    Position P - 1 + j predicts completion slot j; the [B, C, V] logits are never formed at once."""
    P = batch.prompt_length
    hidden = model(batch.input_ids, attention_mask=batch.attention_mask, return_hidden=True)  # (B, P + C, d)
    return Head(hidden[:, P - 1:-1], unwrap(model).output_weight)


def completion_logprobs(model, batch: RolloutBatch, chunk_size: int) -> torch.Tensor:
    """log pi(o_t | prefix) at temperature 1 of every completion slot [B, C] (0 at padding), through
    losses/' chunked selective log-softmax (chunk_size tokens of [V] logits at a time)."""
    head = completion_head(model, batch)
    targets = batch.input_ids[:, batch.prompt_length:]  # (B, C)
    return token_logprobs(head, targets, mask=batch.completion_mask, chunk_size=chunk_size)


def sequence_weights(batch: RolloutBatch, rewards: torch.Tensor, cfg: GRPOConfig):
    """Advantages [B] (group-relative, rl/advantages.py) and `drop` [B]: rows left out of the loss
    (zero-variance groups when filter_zero_std, truncated completions when mask_truncated)."""
    grouped = rewards.view(-1, cfg.group_size)  # (P, G): rows are ordered prompt-major
    advantages = group_advantages(grouped, cfg.advantage, cfg.std_eps).view(-1)  # (B,)
    drop = torch.zeros(len(batch), dtype=torch.bool)
    if cfg.filter_zero_std:
        drop |= zero_std_groups(grouped).repeat_interleave(cfg.group_size)
    if cfg.mask_truncated:
        drop |= batch.truncated.cpu()
    return advantages, drop


def _micro_batches(batch: RolloutBatch, size: int) -> list[tuple[slice, RolloutBatch]]:
    return [(rows, batch.select(rows)) for rows in (slice(s, s + size) for s in range(0, len(batch), size))]


@torch.no_grad()
def _reference_logprobs(ref_model, micro, chunk_size, forward_context) -> list[torch.Tensor]:
    with forward_context():
        return [completion_logprobs(ref_model, mb, chunk_size) for _, mb in micro]


def grpo_update(policy: torch.nn.Module, ref_model: torch.nn.Module | None, optimizer: torch.optim.Optimizer,
                batch: RolloutBatch, advantages: torch.Tensor, cfg: GRPOConfig, *, drop: torch.Tensor | None = None,
                scheduler=None, forward_context: Callable[[], ContextManager] = contextlib.nullcontext) -> dict:
    """cfg.mu optimizer steps on one rollout batch; returns this rank's metrics.

    Metrics: loss (this rank's share of the globally normalised loss: the sum over ranks is the loss),
    clip_frac, kl (per loss token), entropy (nats per loss token, before the first step), grad_norm
    (before clipping), loss_tokens; means over the mu steps. {"skipped": 1.0} when nothing is left to train.

    advantages [B] and drop [B] as from `sequence_weights`. `forward_context` wraps each forward
    (e.g. `lambda: torch.autocast("cuda", torch.bfloat16)`); `scheduler` steps after each optimizer step.
    Old log-probs: the current policy detached when mu == 1 (ratio exactly 1), the sampler's
    temperature-1 log-probs when mu > 1 (same weights, computed before any update).
    """
    if (cfg.beta > 0) != (ref_model is not None):
        raise ValueError(f"GRPOConfig.beta = {cfg.beta}: pass a reference model exactly when beta > 0")
    device = batch.input_ids.device
    advantages = advantages.to(device)
    keep = batch.completion_mask if drop is None else batch.completion_mask & ~drop.to(device)[:, None]  # (B, C)
    global_norm = all_reduce_sum(normaliser(keep, cfg.aggregation, cfg.max_new_tokens))
    if global_norm.item() == 0:  # every sequence dropped on every rank: nothing to learn from
        return {"skipped": 1.0}
    scale = world_size() / global_norm.item()  # the data-parallel wrapper averages gradients over ranks
    micro = _micro_batches(batch, cfg.micro_batch_size)
    ref = ([None] * len(micro) if ref_model is None
           else _reference_logprobs(ref_model, micro, cfg.chunk_size, forward_context))
    sums = dict.fromkeys(("loss", "clipped", "kl", "tokens", "entropy"), 0.0)  # device scalars: one sync at the end
    grad_norm = 0.0
    for iteration in range(cfg.mu):
        for k, (rows, mb) in enumerate(micro):
            last = k == len(micro) - 1
            with contextlib.nullcontext() if last or not hasattr(policy, "no_sync") else policy.no_sync():
                out = _micro_step(policy, mb, advantages[rows], keep[rows], ref[k], cfg, scale, forward_context,
                                  with_entropy=iteration == 0)
            sums = {key: sums[key] + out[key] for key in sums}
        grad_norm += optimizer_step(policy, optimizer, cfg.max_grad_norm, scheduler)
    sums = {key: float(value) / cfg.mu for key, value in sums.items()}  # per iteration
    tokens = max(sums["tokens"], 1.0)  # loss tokens of this rank
    return {"loss": sums["loss"] / global_norm.item(), "clip_frac": sums["clipped"] / tokens,
            "kl": sums["kl"] / tokens, "entropy": sums["entropy"] * cfg.mu / tokens,  # measured in iteration 1 only
            "grad_norm": float(grad_norm) / cfg.mu, "loss_tokens": tokens}


def _micro_step(policy, mb: RolloutBatch, advantages, keep, ref_logprobs, cfg: GRPOConfig, scale: float,
                forward_context, with_entropy: bool) -> dict:
    """Forward, loss and backward of one micro-batch (gradients accumulate); returns its sums.
    The entropy of pi (a metric; one extra no-grad pass over the vocabulary) only when `with_entropy`."""
    keep = keep[:, :mb.completion_mask.shape[1]]  # (b, C) the micro-batch's trimmed width
    targets = mb.input_ids[:, mb.prompt_length:]  # (b, C)
    with forward_context():
        head = completion_head(policy, mb)
        ent = _entropy_sum(head, keep, cfg.chunk_size) if with_entropy else 0.0
        if cfg.mu == 1 and ref_logprobs is None:
            objective, out = _on_policy_objective(head, targets, advantages, keep, cfg)
        else:
            logprobs = token_logprobs(head, targets, mask=mb.completion_mask, chunk_size=cfg.chunk_size)  # (b, C)
            old = logprobs.detach() if cfg.mu == 1 else mb.sampler_logprobs
            out = policy_loss(logprobs, old, advantages, keep, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                              aggregation=cfg.aggregation, ref_logprobs=ref_logprobs, beta=cfg.beta, kl_estimator=cfg.kl_estimator)
            objective = out.loss_sum
    (objective * scale).backward()
    return {"loss": out.loss_sum.detach(), "clipped": out.clipped_tokens, "kl": out.kl_sum,
            "tokens": out.num_tokens, "entropy": ent}


def _on_policy_objective(head: Head, targets, advantages, keep, cfg: GRPOConfig):
    """mu = 1, beta = 0: the ratio is exactly 1 and the clip never binds, so the GRPO loss has the gradient
    of REINFORCE, -sum_it A_i w_it log pi(o_it) (w_it: the aggregation's token weights). That sum is one
    fused lm_head pass (losses' reduction "sum": 3 matmuls per chunk, no per-token graph, no recomputation
    in backward, rows with A_i = 0 skipped). Returns it for backward, and the loss record: the surrogate's
    value at ratio 1, -sum_it A_i w_it, as policy_loss reports it."""
    weights = -advantages[:, None] * token_weights(keep, cfg.aggregation)  # (b, C)
    objective = token_logprobs(head, targets, mask=weights, reduction="sum", chunk_size=cfg.chunk_size)
    zero = weights.new_zeros(())
    out = PolicyLossOutput(loss_sum=weights.sum(), clipped_tokens=zero, kl_sum=zero, num_tokens=keep.sum())
    return objective, out


@torch.no_grad()
def _entropy_sum(head: Head, mask: torch.Tensor, chunk_size: int) -> torch.Tensor:
    return entropy(Head(head.hidden.detach(), head.weight.detach()), mask=mask, reduction="sum", chunk_size=chunk_size)


def optimizer_step(policy, optimizer, max_grad_norm: float, scheduler=None) -> torch.Tensor:
    """Clip the global grad norm (when max_grad_norm > 0), step, zero the grads; returns the norm before clipping."""
    norm = clip_grad_norm(policy, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return norm


def grpo_step(policy, ref_model, optimizer, batch: RolloutBatch, reward_fns: Sequence[RewardFn], cfg: GRPOConfig,
              **update_kwargs) -> dict:
    """Score one rollout batch, compute advantages, run `grpo_update`; returns all metrics of the step."""
    rewards, per_fn = compute_rewards(reward_fns, batch.completions, batch.references)  # (B,), name -> (B,)
    advantages, drop = sequence_weights(batch, rewards, cfg)
    metrics = grpo_update(policy, ref_model, optimizer, batch, advantages, cfg, drop=drop, **update_kwargs)
    metrics.update({f"reward/{name}": r.mean().item() for name, r in per_fn.items()})
    metrics.update({f"reward_std/{name}": r.std(correction=0).item() for name, r in per_fn.items()})
    metrics.update({
        "reward": rewards.mean().item(), "reward_std": rewards.std(correction=0).item(),
        "zero_std_frac": zero_std_groups(rewards.view(-1, cfg.group_size)).float().mean().item(),
        "completion_len": batch.completion_mask.sum(1).float().mean().item(),
        "truncated_frac": batch.truncated.float().mean().item(),
    })
    return metrics
