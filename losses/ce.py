"""Token-level losses on the model's own distribution: cross-entropy (SFT), log-probs and entropy (RL).

Each function takes `logits` [..., V] or a `Head(hidden [..., d], lm_head weight [V, d])`; with a
Head the [N, V] logits exist only `chunk_size` tokens at a time (losses/chunked.py). The per-row
math runs in kernels/ (Triton on CUDA, plain torch elsewhere). See losses/__init__.py for the
normalisation rule (token sums divided by the global number of valid tokens).
"""
from dataclasses import dataclass

import torch

import kernels
from losses.chunked import DEFAULT_CHUNK_SIZE, Logits, reduce_tokens, softmax_


@dataclass(frozen=True)
class LogProb:
    """Per-token l_i = sign * log softmax(z_i / T)[y_i] (sign = -1: cross-entropy), and its gradient in
    closed form for the chunked path: with p_i = softmax(z_i / T),
        d l_i / d z_i = sign * (onehot(y_i) - p_i) / T."""

    temperature: float = 1.0
    sign: float = 1.0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.sign * kernels.token_logprobs(logits, targets, self.temperature)  # (n,)

    def value_and_grad_(self, logits: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """l [n]; logits [n, V] are overwritten with d(sum_i weights_i l_i)/dz (with p when weights is None)."""
        scale = 1.0 / self.temperature
        picked = logits.gather(1, targets[:, None]).squeeze(1)  # (n,) z_i[y_i]
        values = self.sign * (scale * picked - softmax_(logits, scale))  # (n,) logits now hold p
        if weights is not None:
            coef = (self.sign * scale) * weights  # (n,)
            logits.mul_(-coef[:, None]).scatter_add_(1, targets[:, None], coef[:, None].to(logits.dtype))
        return values


def _check_targets(logits: Logits, targets: torch.Tensor):
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets have shape {tuple(targets.shape)}, expected {tuple(logits.shape[:-1])} "
                         f"(the logits' shape {tuple(logits.shape)} without the vocabulary dim)")


def cross_entropy(logits: Logits, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Next-token cross-entropy l_i = -log softmax(z_i)[y_i] = logsumexp(z_i) - z_i[y_i].

    Tokens whose target is `ignore_index` (prompt, padding) count for nothing. reduction: "mean" over
    valid tokens (as F.cross_entropy), "sum" (divide by the global valid-token count yourself),
    "none" (per token, 0 at ignored tokens).
    """
    _check_targets(logits, targets)
    return reduce_tokens(LogProb(sign=-1.0), logits, (targets,),  # ignored targets are masked out
                         mask=targets != ignore_index, reduction=reduction, chunk_size=chunk_size)


def token_logprobs(logits: Logits, targets: torch.Tensor, temperature: float = 1.0,
                   mask: torch.Tensor | None = None, reduction: str = "none",
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """log pi(y_i) = z_i[y_i] / T - logsumexp(z_i / T), the per-token log-probabilities of policy-gradient
    RL (GRPO, DeepSeekMath, arXiv:2402.03300). "Selective log-softmax": only the target's log-prob is
    kept (the CUDA kernel never writes an [N, V] log-softmax; with a Head only [chunk, V] logits exist).
    Differentiable; 0 at masked tokens. Use the sampling temperature T so the log-probs are those of
    the distribution that was sampled.

    With a Head and reduction="none" each chunk is recomputed in backward (one extra lm_head matmul);
    a loss that only needs the reduced sum is cheaper written as a per-token function for
    `reduce_tokens` (three matmuls, like the unchunked forward + backward).
    """
    _check_targets(logits, targets)
    return reduce_tokens(LogProb(temperature), logits, (targets,),
                         mask=mask, reduction=reduction, chunk_size=chunk_size)


def _entropy_rows(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = kernels.log_softmax(logits, temperature)  # (n, V)
    return -(logp.exp() * logp).sum(-1)  # (n,)


def entropy(logits: Logits, temperature: float = 1.0, mask: torch.Tensor | None = None,
            reduction: str = "none", chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Shannon entropy of the next-token distribution H_i = -sum_v p_iv log p_iv, p_i = softmax(z_i / T),
    in nats: the exploration signal monitored (or rewarded) in RL. Differentiable; 0 at masked tokens."""
    return reduce_tokens(lambda z: _entropy_rows(z, temperature), logits, mask=mask,
                         reduction=reduction, chunk_size=chunk_size)
