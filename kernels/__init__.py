"""Fused log-softmax family over the vocabulary: Triton on CUDA, plain torch elsewhere.

Every op takes logits (N, V) of any vocabulary size V and dtype (bf16/fp16/fp32), computes in fp32,
returns fp32 per-row values (no reduction: losses/ masks and normalises) and is differentiable with
respect to the (student) logits. Each op lives in kernels/<op>.py as Triton kernels, an
autograd.Function and a `<op>_reference` in plain torch; this module picks one per call:
the Triton path for CUDA tensors when Triton imports, the reference otherwise (CPU, macOS).

The two paths agree to fp32 rounding (1e-5) in value; gradients come back in the logits' dtype, so
for bf16/fp16 logits they agree to that dtype's resolution. Rows are (N, V) with any strides;
targets are int (N,) in [0, V) or ignore_index. Logits must be finite except -inf for masked tokens.
"""
import torch

from kernels.kl_div import KLDiv, kl_div_reference
from kernels.log_softmax import LogSoftmax, LogSumExp, log_softmax_reference, logsumexp_reference
from kernels.online_softmax import HAS_TRITON
from kernels.token_logprobs import TokenLogprobs, cross_entropy_reference, token_logprobs_reference

__all__ = ["HAS_TRITON", "uses_triton", "log_softmax", "logsumexp", "cross_entropy", "token_logprobs", "kl_div"]


def uses_triton(logits: torch.Tensor) -> bool:
    """Whether the ops run their Triton kernels on these logits (CUDA and triton importable)."""
    return HAS_TRITON and logits.is_cuda


def _check(logits: torch.Tensor, temperature: float = 1.0) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be (N,) = {tuple(logits.shape[:1])}, got {tuple(targets.shape)}")


def log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) per row: (N, V) -> fp32 (N, V)."""
    _check(logits, temperature)
    if uses_triton(logits):
        return LogSoftmax.apply(logits, temperature)
    return log_softmax_reference(logits, temperature)


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """log Σ_j exp(logits_j) per row: (N, V) -> fp32 (N,)."""
    _check(logits)
    if uses_triton(logits):
        return LogSumExp.apply(logits)
    return logsumexp_reference(logits)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   ignore_index: int = -100) -> torch.Tensor:
    """log softmax(logits / T)[target] per row: (N, V), (N,) -> fp32 (N,); 0 at ignore_index rows."""
    _check(logits, temperature)
    _check_targets(logits, targets)
    if uses_triton(logits):
        return TokenLogprobs.apply(logits, targets, temperature, ignore_index)
    return token_logprobs_reference(logits, targets, temperature, ignore_index)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """-log softmax(logits)[target] per row: (N, V), (N,) -> fp32 (N,); 0 at ignore_index rows."""
    _check(logits)
    _check_targets(logits, targets)
    if uses_triton(logits):
        return -TokenLogprobs.apply(logits, targets, 1.0, ignore_index)
    return cross_entropy_reference(logits, targets, ignore_index)


def kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
           reverse: bool = False) -> torch.Tensor:
    """Per-row KL(p_teacher ‖ q_student), or KL(q_student ‖ p_teacher) with reverse, both at
    temperature T: (N, V), (N, V) -> fp32 (N,). The teacher gets no gradient."""
    _check(student_logits, temperature)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} must have the same shape")
    if uses_triton(student_logits):
        return KLDiv.apply(student_logits, teacher_logits, temperature, reverse)
    return kl_div_reference(student_logits, teacher_logits, temperature, reverse)
