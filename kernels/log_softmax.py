"""Row-wise log-softmax and logsumexp over the vocabulary (Triton kernels + plain-torch references).

    lse(x)            = log Σ_j exp(x_j)
    log_softmax(x)_i  = z_i - lse(z),   z = x / T

Gradients, with p = softmax(z) and g the incoming gradient:
    d lse(x) / d x_i            = p_i                         (T = 1)
    d Σ_k g_k log_softmax_k / dx_i = (g_i - p_i Σ_k g_k) / T  (since d log p_k / d z_i = δ_ki - p_i)
The forward pass saves only the input and lse (N,), not the (N, V) fp32 output: the backward pass
recomputes p = exp(z - lse) tile by tile, which reads bf16 logits instead of fp32 log-probs.
"""
import torch
from torch.autograd.function import once_differentiable

from kernels.online_softmax import contiguous_rows, launch_config, log_softmax_tile, row_logsumexp, tl, triton


@triton.jit
def _logsumexp_kernel(x_ptr, x_stride, lse_ptr, V: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tl.store(lse_ptr + row, row_logsumexp(x_ptr + row * x_stride, 1.0, V, BLOCK_V))


@triton.jit
def _logsumexp_backward_kernel(x_ptr, x_stride, lse_ptr, grad_ptr, dx_ptr,
                               V: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)                                    # (BLOCK_V,)
        p = tl.exp(log_softmax_tile(x_ptr + row * x_stride, cols, V, 1.0, lse))
        tl.store(dx_ptr + row * V + cols, (g * p).to(dx_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _log_softmax_kernel(x_ptr, x_stride, out_ptr, lse_ptr, scale, V: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    lse = row_logsumexp(x_row, scale, V, BLOCK_V)
    tl.store(lse_ptr + row, lse)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)                                    # (BLOCK_V,)
        tl.store(out_ptr + row * V + cols, log_softmax_tile(x_row, cols, V, scale, lse), mask=cols < V)


@triton.jit
def _log_softmax_backward_kernel(x_ptr, x_stride, lse_ptr, grad_ptr, grad_stride, dx_ptr, scale,
                                 V: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, g_row = x_ptr + row * x_stride, grad_ptr + row * grad_stride
    lse = tl.load(lse_ptr + row)
    g_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)                                    # (BLOCK_V,)
        g_sum += tl.sum(tl.load(g_row + cols, mask=cols < V, other=0.0).to(tl.float32), axis=0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        p = tl.exp(log_softmax_tile(x_row, cols, V, scale, lse))
        g = tl.load(g_row + cols, mask=cols < V, other=0.0).to(tl.float32)   # (BLOCK_V,)
        dx = (g - p * g_sum) * scale
        tl.store(dx_ptr + row * V + cols, dx.to(dx_ptr.dtype.element_ty), mask=cols < V)


class LogSumExp(torch.autograd.Function):
    """lse per row: (N, V) -> fp32 (N,), gradient p = softmax(x)."""

    @staticmethod
    def forward(ctx, logits):
        logits = contiguous_rows(logits)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        _logsumexp_kernel[(logits.shape[0],)](logits, logits.stride(0), lse, **launch_config(logits.shape[1]))
        ctx.save_for_backward(logits, lse)
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, lse = ctx.saved_tensors
        dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _logsumexp_backward_kernel[(logits.shape[0],)](logits, logits.stride(0), lse, grad.contiguous(), dx,
                                                       **launch_config(logits.shape[1]))
        return dx


class LogSoftmax(torch.autograd.Function):
    """log softmax(x / T) per row: (N, V) -> fp32 (N, V)."""

    @staticmethod
    def forward(ctx, logits, temperature):
        logits = contiguous_rows(logits)
        n, v = logits.shape
        out = torch.empty((n, v), dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        _log_softmax_kernel[(n,)](logits, logits.stride(0), out, lse, 1.0 / temperature, **launch_config(v))
        ctx.save_for_backward(logits, lse)
        ctx.scale = 1.0 / temperature
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, lse = ctx.saved_tensors
        grad = contiguous_rows(grad)   # a broadcast gradient (from .sum()) has stride 0 along V
        dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _log_softmax_backward_kernel[(logits.shape[0],)](logits, logits.stride(0), lse, grad, grad.stride(0), dx,
                                                         ctx.scale, **launch_config(logits.shape[1]))
        return dx, None


def logsumexp_reference(logits: torch.Tensor) -> torch.Tensor:
    """log Σ_j exp(x_j) per row in fp32: (N, V) -> (N,)."""
    return torch.logsumexp(logits.float(), dim=-1)                 # (N,)


def log_softmax_reference(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(x / T) per row in fp32: (N, V) -> (N, V)."""
    z = logits.float() if temperature == 1.0 else logits.float() / temperature  # (N, V) T = 1 skips a pass
    # z - lse, not torch.log_softmax: on CPU that sums exp(z - max) in one fp32 SIMD register, each lane adding
    # V/8 terms (AVX2; V/16 on AVX512) mostly far below its total, whose low bits are dropped: its lse comes out
    # 1e-5 to 5e-5 low at V = 151,936 (every p that much too high). torch.logsumexp sums with torch.sum's cascade:
    # off by its fp32 rounding only (~1e-6). Twice the time of torch.log_softmax (one more exp pass).
    return z - torch.logsumexp(z, dim=-1, keepdim=True)                          # (N, V)
