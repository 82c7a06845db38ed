"""Row-wise log-softmax and logsumexp over the vocabulary.

    lse(x)            = log Σ_j exp(x_j)
    log_softmax(x)_i  = x_i / T - lse(x / T)
"""
import torch


def logsumexp_reference(logits: torch.Tensor) -> torch.Tensor:
    """log Σ_j exp(x_j) per row in fp32: (N, V) -> (N,). Max-shifted so exp never overflows."""
    x = logits.float()                                             # (N, V)
    m = x.max(dim=-1, keepdim=True).values.detach()                # (N, 1) shift only; lse is shift-invariant
    return (m + (x - m).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)  # (N,)


def log_softmax_reference(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(x / T) per row in fp32: (N, V) -> (N, V)."""
    z = logits.float() / temperature                               # (N, V)
    return z - logsumexp_reference(z).unsqueeze(-1)                # (N, V)
