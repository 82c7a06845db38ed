"""Per-token KL divergence between two softened next-token distributions.

With p = softmax(teacher / T) and q = softmax(student / T) (Hinton et al. 2015):
    forward KL(p ‖ q) = Σ_i p_i (log p_i - log q_i)   (mode covering, classic KD)
    reverse KL(q ‖ p) = Σ_i q_i (log q_i - log p_i)   (mode seeking, MiniLLM / GKD)
The teacher is a constant: it gets no gradient. Hinton's T² factor belongs to losses/.

One kernel computes KL(A ‖ B) = Σ_i a_i (log a_i - log b_i) for a = softmax(z_A), b = softmax(z_B):
forward KL is A = teacher, B = student; reverse KL swaps them. Since Σ a_i = 1,
    KL(A ‖ B) = Σ_i a_i (z_A,i - z_B,i) - lse(z_A) + lse(z_B)
and Σ_i a_i (z_A,i - z_B,i) = Σ_i exp(z_A,i - m) (z_A,i - z_B,i) / d rides the online softmax of z_A
(rescaled by the same exp(m - m') as d), so both rows are read once. Terms with a_i = 0 count 0
(0 log 0 = 0): a teacher may mask tokens with -inf logits in forward KL.

Gradients w.r.t. the student logits x (z = x / T, g the incoming gradient):
    forward, student = B:  d KL / d z_B,i = b_i - a_i
    reverse, student = A:  d KL / d z_A,i = a_i (log a_i - log b_i - KL)
        (d/dz_A,i of Σ_j a_j (z_A,j - z_B,j) - lse(z_A) is a_i (z_A,i - z_B,i) - a_i Σ_j a_j (z_A,j - z_B,j))
and dx = g · dKL/dz / T.
"""
import torch
from torch.autograd.function import once_differentiable

from kernels.log_softmax import log_softmax_reference
from kernels.online_softmax import (contiguous_rows, launch_config, load_tile, log_softmax_tile,
                                    online_softmax_step, tl, triton)


@triton.jit
def _kl_div_kernel(a_ptr, a_stride, b_ptr, b_stride, kl_ptr, lse_a_ptr, lse_b_ptr, scale,
                   V: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row, b_row = a_ptr + row * a_stride, b_ptr + row * b_stride
    m_a, d_a, m_b, d_b = -3.0e38, 0.0, -3.0e38, 0.0
    cross = 0.0   # Σ exp(z_A - m_a) (z_A - z_B), rescaled with d_a
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)                                    # (BLOCK_V,)
        z_a, z_b = load_tile(a_row, cols, V, scale), load_tile(b_row, cols, V, scale)
        m_a, d_a, alpha, e_a = online_softmax_step(m_a, d_a, z_a)
        m_b, d_b, _, _ = online_softmax_step(m_b, d_b, z_b)
        cross = cross * alpha + tl.sum(tl.where(e_a > 0.0, e_a * (z_a - z_b), 0.0), axis=0)
    lse_a, lse_b = m_a + tl.log(d_a), m_b + tl.log(d_b)
    tl.store(lse_a_ptr + row, lse_a)
    tl.store(lse_b_ptr + row, lse_b)
    tl.store(kl_ptr + row, cross / d_a - lse_a + lse_b)


@triton.jit
def _kl_div_backward_kernel(a_ptr, a_stride, b_ptr, b_stride, kl_ptr, lse_a_ptr, lse_b_ptr, grad_ptr, dx_ptr,
                            scale, STUDENT_IS_A: tl.constexpr, V: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row, b_row, dx_row = a_ptr + row * a_stride, b_ptr + row * b_stride, dx_ptr + row * V
    lse_a, lse_b = tl.load(lse_a_ptr + row), tl.load(lse_b_ptr + row)
    kl, g_scaled = tl.load(kl_ptr + row), tl.load(grad_ptr + row) * scale
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)                                    # (BLOCK_V,)
        log_a = log_softmax_tile(a_row, cols, V, scale, lse_a)
        log_b = log_softmax_tile(b_row, cols, V, scale, lse_b)
        if STUDENT_IS_A:
            dx = g_scaled * tl.exp(log_a) * (log_a - log_b - kl)
        else:
            dx = g_scaled * (tl.exp(log_b) - tl.exp(log_a))
        tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=cols < V)


class KLDiv(torch.autograd.Function):
    """Per-row forward KL(p_teacher ‖ q_student) or reverse KL(q_student ‖ p_teacher) at temperature T."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature, reverse):
        student, teacher = contiguous_rows(student_logits), contiguous_rows(teacher_logits)
        a, b = (student, teacher) if reverse else (teacher, student)
        n, v = student.shape
        kl, lse_a, lse_b = (torch.empty(n, dtype=torch.float32, device=student.device) for _ in range(3))
        _kl_div_kernel[(n,)](a, a.stride(0), b, b.stride(0), kl, lse_a, lse_b, 1.0 / temperature,
                             **launch_config(v))
        ctx.save_for_backward(a, b, kl, lse_a, lse_b)
        ctx.scale, ctx.reverse = 1.0 / temperature, reverse
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, b, kl, lse_a, lse_b = ctx.saved_tensors
        student = a if ctx.reverse else b
        dx = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        _kl_div_backward_kernel[(student.shape[0],)](
            a, a.stride(0), b, b.stride(0), kl, lse_a, lse_b, grad.contiguous(), dx, ctx.scale,
            STUDENT_IS_A=ctx.reverse, **launch_config(student.shape[1]))
        return dx, None, None, None


def kl_div_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 1.0, reverse: bool = False) -> torch.Tensor:
    """KL per row in fp32: (N, V), (N, V) -> (N,); forward KL(p‖q) or, with reverse, KL(q‖p)."""
    log_q = log_softmax_reference(student_logits, temperature)           # (N, V)
    log_p = log_softmax_reference(teacher_logits.detach(), temperature)  # (N, V)
    if reverse:
        log_p, log_q = log_q, log_p
    p = log_p.exp()                                                      # (N, V)
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)      # (N,) 0 log 0 = 0
