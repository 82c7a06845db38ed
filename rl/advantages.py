"""Group-relative advantages: the critic-free baseline of GRPO.

For a prompt q, G completions o_1..o_G are sampled and scored r_1..r_G. GRPO (DeepSeekMath, Shao et
al. 2024, arXiv:2402.03300, eq. 3 "outcome supervision") gives every token of o_i the advantage

    A_i = (r_i - mean_j r_j) / (std_j r_j + eps)            scale_rewards = "group"

Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like Training", arXiv:2503.20783) shows the
division by the group std up-weights prompts that are nearly always (or nearly never) solved and
drops it:

    A_i = r_i - mean_j r_j                                   scale_rewards = "none"

A middle way keeps the group-mean baseline but divides by ONE std of the rewards of the whole
global batch (all prompts, all ranks), which keeps the scale of the update steady without the
per-prompt re-weighting:

    A_i = (r_i - mean_j r_j) / (std_batch r + eps)           scale_rewards = "batch"

std is the population std (divide by G, resp. the batch size). DAPO's dynamic sampling (Yu et al.
2025, arXiv:2503.14476) discards groups whose rewards are all equal: their advantages are 0, they
carry no policy gradient, yet under token-level normalisation they dilute the others.
`zero_std_groups` finds them; the update step drops them from the loss (it does not re-sample to
refill the batch as DAPO does).

Sharding: the rollout gives every rank whole groups, so the group statistics are exact on each rank
without communication. Only the batch std needs the global batch: it is computed from the global
sum, sum of squares and count, all-reduced when torch.distributed is initialised.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

SCALE_MODES = ("group", "batch", "none")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all ranks (identity when not distributed), on `t`'s device."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    # NCCL reduces CUDA tensors only, gloo CPU ones (rewards live on the CPU).
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    summed = t.to(device, copy=True)
    dist.all_reduce(summed)
    return summed.to(t.device)


def global_std(x: torch.Tensor) -> torch.Tensor:
    """Population std of every element of `x` on every rank: sqrt(E[x^2] - E[x]^2) from global sums."""
    x = x.double()
    stats = all_reduce_sum(torch.stack([x.sum(), x.pow(2).sum(), x.new_tensor(x.numel())]))
    mean = stats[0] / stats[2]
    return (stats[1] / stats[2] - mean ** 2).clamp(min=0).sqrt().float()


def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Advantages [P, G] from rewards [P, G] (P prompts on this rank, G samples each), see module doc."""
    if scale_rewards not in SCALE_MODES:
        raise ValueError(f"scale_rewards must be one of {SCALE_MODES}, got {scale_rewards!r}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    if scale_rewards == "group":
        return centered / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)
    if scale_rewards == "batch":
        return centered / (global_std(rewards) + eps)
    return centered


def zero_std_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P] bool: True where all G rewards of the prompt are equal (no learning signal; DAPO filters them)."""
    return (rewards == rewards[:, :1]).all(dim=1)
