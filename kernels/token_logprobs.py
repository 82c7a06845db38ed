"""Selective log-softmax: the log-probability of one target token per row, and cross-entropy.

    token_logprobs(x, t)_n = x_{n,t_n} / T - lse(x_n / T)          (GRPO's log π(t | context))
    cross_entropy(x, t)_n  = -token_logprobs(x, t)_n at T = 1
Rows whose target equals ignore_index give 0 (and no gradient).
"""
import torch

from kernels.log_softmax import log_softmax_reference


def token_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                             ignore_index: int = -100) -> torch.Tensor:
    """log softmax(x / T)[t] per row in fp32: (N, V), (N,) -> (N,); 0 where t == ignore_index."""
    keep = targets != ignore_index                                 # (N,)
    safe = torch.where(keep, targets, 0)                           # (N,) any valid index for ignored rows
    logp = log_softmax_reference(logits, temperature)              # (N, V)
    picked = logp.gather(1, safe.unsqueeze(1)).squeeze(1)          # (N,)
    return torch.where(keep, picked, 0.0)                          # (N,)


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor,
                            ignore_index: int = -100) -> torch.Tensor:
    """-log softmax(x)[t] per row in fp32: (N, V), (N,) -> (N,); 0 where t == ignore_index."""
    return -token_logprobs_reference(logits, targets, 1.0, ignore_index)
