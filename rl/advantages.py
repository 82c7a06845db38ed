"""Group-relative advantages: the critic-free baselines of GRPO and its variants.

For a prompt q, G completions o_1..o_G are sampled and scored r_1..r_G; every token of o_i gets the
advantage A_i. `grpo.advantage` selects the estimator from ADVANTAGES; each maps rewards [P, G]
(P prompts on this rank, G samples each) to advantages [P, G]:

    "grpo"       A_i = (r_i - mean_j r_j) / (std_j r_j + eps)
                 DeepSeekMath (Shao et al. 2024, arXiv:2402.03300, eq. 3, "outcome supervision")
    "dr_grpo"    A_i = r_i - mean_j r_j
                 Dr. GRPO (Liu et al. 2025, arXiv:2503.20783): the division by the group std up-weights
                 prompts that are nearly always (or nearly never) solved, so it is dropped
    "batch_std"  A_i = (r_i - mean_j r_j) / (std_batch r + eps)
                 the group-mean baseline with ONE std of the rewards of the whole global batch (all
                 prompts, all ranks): a steady update scale without the per-prompt re-weighting
    "rloo"       A_i = r_i - sum_{j != i} r_j / (G - 1)
                 RLOO (Ahmadian et al. 2024, arXiv:2402.14740): each sample's baseline leaves it out

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

from model.parallel import all_reduce_sum


def global_std(x: torch.Tensor) -> torch.Tensor:
    """Population std of every element of `x` on every rank: sqrt(E[x^2] - E[x]^2) from global sums."""
    x = x.double()
    stats = all_reduce_sum(torch.stack([x.sum(), x.pow(2).sum(), x.new_tensor(x.numel())]))
    mean = stats[0] / stats[2]
    return (stats[1] / stats[2] - mean ** 2).clamp(min=0).sqrt().float()


def grpo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    return centered / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)


def dr_grpo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    return rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)


def batch_std_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (global_std(rewards) + eps)  # (P, G)


def rloo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740): the baseline of sample i is the mean
    of the OTHER G - 1 rewards, A_i = r_i - sum_{j != i} r_j / (G - 1) = G / (G - 1) * (r_i - mean_j r_j),
    an unbiased baseline (it does not depend on o_i); no std scaling."""
    G = rewards.shape[1]
    return (rewards - rewards.mean(dim=1, keepdim=True)) * G / (G - 1)  # (P, G)


# grpo.advantage -> (rewards [P, G] fp32, std eps) -> advantages [P, G]; see the module docstring.
ADVANTAGES = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "batch_std": batch_std_advantages,
              "rloo": rloo_advantages}


def group_advantages(rewards: torch.Tensor, estimator: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """Advantages [P, G] from rewards [P, G] with ADVANTAGES[estimator]."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    return ADVANTAGES[estimator](rewards.float(), eps)


def zero_std_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P] bool: True where all G rewards of the prompt are equal (no learning signal; DAPO filters them)."""
    return (rewards == rewards[:, :1]).all(dim=1)
