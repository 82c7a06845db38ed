"""The GRPO objective on per-token log-probs: clipped importance ratio, KL penalty, aggregation.

For completion i with advantage A_i and token t (all tensors [B, C], C = completion slots):

    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)              importance ratio
    l_it   = -min(rho_it * A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) * A_i)  + beta * kl_it

This is PPO's clipped surrogate (Schulman et al. 2017) as GRPO uses it (DeepSeekMath, Shao et al.
2024, eq. 3) with DAPO's "clip-higher" (Yu et al. 2025): separate eps_low / eps_high so unlikely
tokens with positive advantage can grow. With one update per rollout batch (mu = 1) pi_old is the
current policy detached: rho == 1, the clip never binds, and the gradient is REINFORCE with the
group-relative advantage, -A_i * grad log pi(o_it).

KL penalty to a frozen reference pi_ref (beta = 0 drops it and no reference model is kept). With
r = pi_ref(o_it) / pi_theta(o_it) at a token sampled from pi_theta (Schulman 2020, "Approximating
KL Divergence"):
- "k1": kl = -log r = log pi_theta - log pi_ref. Its VALUE is an unbiased estimate of
  KL(pi_theta || pi_ref). Its GRADIENT is grad log pi_theta(o), whose expectation under pi_theta is
  0: as a loss term it only adds noise (k1 acts through the reward, not through the loss).
- "k3": kl = r - 1 - log r >= 0 (DeepSeekMath's choice). Its VALUE is an unbiased, lower-variance
  estimate of KL(pi_theta || pi_ref). Its GRADIENT is (1 - r) * grad log pi_theta(o), whose
  expectation sum_o (pi_theta - pi_ref)(o) grad log pi_theta(o) = -sum_o pi_ref grad log pi_theta
  is the gradient of the REVERSE direction KL(pi_ref || pi_theta), not of KL(pi_theta || pi_ref).
Both are taken per token with the prefix fixed, as in DeepSeekMath and TRL.

Aggregation over tokens (mask m_it = 1 on completion tokens that take part), `grpo.aggregation`
from AGGREGATIONS: token weights w_it (loss_sum = sum_it w_it l_it of THIS micro-batch) and a
normaliser additive over sequences; the trainer sums both over micro-batches and ranks and divides
once, so the result does not depend on how the batch was split:
- "grpo" (DeepSeekMath): mean over each sequence's tokens, then mean over sequences.
  loss_sum = sum_i (sum_t m_it l_it / sum_t m_it); normaliser = number of sequences with >= 1 token.
  Long sequences' tokens weigh less (the length bias Dr. GRPO points out).
- "dapo" (DAPO's token-level loss): loss_sum = sum_it m_it l_it; normaliser = number of tokens.
- "dr_grpo" (Dr. GRPO): loss_sum = sum_it m_it l_it; normaliser = max_new_tokens x number of
  sequences with >= 1 token: a constant per sequence, so no length bias and no per-batch token count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

def k1(log_r: torch.Tensor) -> torch.Tensor:
    return -log_r


def k3(log_r: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_r) - 1 - log_r


# grpo.kl_estimator -> per-token KL(pi_theta || pi_ref) estimate from log r = log pi_ref - log pi_theta
KL_ESTIMATORS = {"k1": k1, "k3": k3}


def _sequences(mask: torch.Tensor) -> torch.Tensor:
    return (mask.sum(dim=1) > 0).sum().float()


def per_sequence_mean(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()  # (B, C)
    return mask / mask.sum(dim=1, keepdim=True).clamp(min=1)


def per_token(mask: torch.Tensor) -> torch.Tensor:
    return mask.float()  # (B, C)


@dataclass(frozen=True)
class Aggregation:
    token_weights: Callable[[torch.Tensor], torch.Tensor]  # mask [B, C] -> w [B, C]
    normaliser: Callable[[torch.Tensor, int], torch.Tensor]  # mask [B, C], max_new_tokens -> scalar


# grpo.aggregation -> how per-token losses are weighted and normalised (module docstring)
AGGREGATIONS = {
    "grpo": Aggregation(per_sequence_mean, lambda mask, max_new_tokens: _sequences(mask)),
    "dapo": Aggregation(per_token, lambda mask, max_new_tokens: mask.sum().float()),
    "dr_grpo": Aggregation(per_token, lambda mask, max_new_tokens: _sequences(mask) * max_new_tokens),
}


def token_weights(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """w_it [B, C] with loss_sum = sum_it w_it l_it."""
    return AGGREGATIONS[aggregation].token_weights(mask)


def normaliser(mask: torch.Tensor, aggregation: str, max_new_tokens: int) -> torch.Tensor:
    """The divisor of `aggregation` contributed by the sequences of `mask` [B, C] (additive over batches)."""
    return AGGREGATIONS[aggregation].normaliser(mask, max_new_tokens)


@dataclass
class PolicyLossOutput:
    loss_sum: torch.Tensor  # scalar with grad: sum of the aggregated per-token loss
    clipped_tokens: torch.Tensor  # scalar: tokens where the clip is active (zero gradient)
    kl_sum: torch.Tensor  # scalar: sum of per-token KL estimates (0 without a reference)
    num_tokens: torch.Tensor  # scalar: tokens in the mask (for token means of the two above)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, eps_low: float, eps_high: float, aggregation: str,
                ref_logprobs: torch.Tensor | None = None, beta: float = 0.0,
                kl_estimator: str = "k3") -> PolicyLossOutput:
    """GRPO loss of one micro-batch. logprobs, old_logprobs, ref_logprobs, mask: [B, C]; advantages: [B].

    Returns the UN-normalised sum (see the module docstring); masked tokens contribute nothing. With
    beta > 0 the KL penalty beta * kl to the reference's log-probs ref_logprobs is added.
    """
    if (beta > 0) != (ref_logprobs is not None):
        raise ValueError(f"beta = {beta}: pass ref_logprobs (a frozen reference's log-probs) exactly when beta > 0")
    mask = mask.bool()
    ratio = torch.exp((logprobs - old_logprobs).masked_fill(~mask, 0.0))  # (B, C); 1 at padding
    adv = advantages[:, None].to(logprobs.dtype)  # (B, 1)
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(ratio * adv, clipped_ratio * adv)  # (B, C)
    kl = torch.zeros_like(per_token_loss)
    if ref_logprobs is not None:
        kl = KL_ESTIMATORS[kl_estimator](ref_logprobs - logprobs).masked_fill(~mask, 0.0)  # (B, C)
        per_token_loss = per_token_loss + beta * kl
    # The clip is active (the min picks the constant clipped branch) when the ratio left the trust
    # region in the direction the advantage pushes it.
    clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    weights = token_weights(mask, aggregation)  # (B, C)
    return PolicyLossOutput(loss_sum=(per_token_loss.masked_fill(~mask, 0.0) * weights).sum(),
                            clipped_tokens=(clipped & mask).sum().detach(),
                            kl_sum=kl.detach().sum(), num_tokens=mask.sum())
