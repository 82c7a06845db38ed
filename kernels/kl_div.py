"""Per-token KL divergence between two softened next-token distributions.

With p = softmax(teacher / T) and q = softmax(student / T) (Hinton et al. 2015):
    forward KL(p || q) = Σ_i p_i (log p_i - log q_i)   (mode covering, classic KD)
    reverse KL(q || p) = Σ_i q_i (log q_i - log p_i)   (mode seeking, MiniLLM / GKD)
The teacher is a constant: it gets no gradient. The T² factor of Hinton's loss belongs to losses/.
"""
import torch

from kernels.log_softmax import log_softmax_reference


def kl_div_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 1.0, reverse: bool = False) -> torch.Tensor:
    """KL per row in fp32: (N, V), (N, V) -> (N,); forward KL(p‖q) or, with reverse, KL(q‖p)."""
    log_q = log_softmax_reference(student_logits, temperature)           # (N, V)
    log_p = log_softmax_reference(teacher_logits.detach(), temperature)  # (N, V)
    if reverse:
        log_p, log_q = log_q, log_p
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)                   # (N,)
