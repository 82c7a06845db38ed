"""Selective log-softmax: the log-probability of one target token per row, and cross-entropy.

    token_logprobs(x, t)_n = z_{n,t_n} - lse(z_n),   z = x / T      (GRPO's log π(t | context))
    cross_entropy(x, t)_n  = -token_logprobs(x, t)_n at T = 1
Rows whose target equals ignore_index give 0 and no gradient; a target outside [0, V) gives nan
in the kernel (the reference raises), never a read out of bounds.

Only the (N,) result and lse leave the kernel: no (N, V) log-prob tensor is materialised.
Gradient, with p = softmax(z) and g the incoming gradient of row n:
    d (z_t - lse(z)) / d x_i = (δ_it - p_i) / T    ->    dx_i = g (δ_it - p_i) / T
"""
import torch
from torch.autograd.function import once_differentiable

from kernels.log_softmax import log_softmax_reference
from kernels.online_softmax import contiguous_rows, launch_config, log_softmax_tile, row_logsumexp, tl, triton


@triton.jit
def _token_logprobs_kernel(x_ptr, x_stride, target_ptr, out_ptr, lse_ptr, scale, ignore_index,
                           V: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    if target == ignore_index:
        tl.store(out_ptr + row, 0.0)
    else:
        x_row = x_ptr + row * x_stride
        lse = row_logsumexp(x_row, scale, V, BLOCK_V)
        in_vocab = (target >= 0) & (target < V)
        z_target = tl.load(x_row + target, mask=in_vocab, other=float("nan")).to(tl.float32) * scale
        tl.store(lse_ptr + row, lse)
        tl.store(out_ptr + row, z_target - lse)


@triton.jit
def _token_logprobs_backward_kernel(x_ptr, x_stride, target_ptr, lse_ptr, grad_ptr, dx_ptr, scale, ignore_index,
                                    V: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + row)
    x_row, dx_row = x_ptr + row * x_stride, dx_ptr + row * V
    if target == ignore_index:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(dx_row + cols, tl.zeros([BLOCK_V], dx_ptr.dtype.element_ty), mask=cols < V)
    else:
        lse = tl.load(lse_ptr + row)
        g_scaled = tl.load(grad_ptr + row) * scale
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)                                # (BLOCK_V,)
            p = tl.exp(log_softmax_tile(x_row, cols, V, scale, lse))
            dx = g_scaled * (tl.where(cols == target, 1.0, 0.0) - p)
            tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=cols < V)


class TokenLogprobs(torch.autograd.Function):
    """log softmax(x / T)[t] per row: (N, V), (N,) -> fp32 (N,); 0 where t == ignore_index."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index):
        logits, targets = contiguous_rows(logits), targets.contiguous()
        n, v = logits.shape
        out = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)   # left unset at ignored rows
        _token_logprobs_kernel[(n,)](logits, logits.stride(0), targets, out, lse, 1.0 / temperature, ignore_index,
                                     **launch_config(v))
        ctx.save_for_backward(logits, targets, lse)
        ctx.scale, ctx.ignore_index = 1.0 / temperature, ignore_index
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        dx = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _token_logprobs_backward_kernel[(logits.shape[0],)](
            logits, logits.stride(0), targets, lse, grad.contiguous(), dx, ctx.scale, ctx.ignore_index,
            **launch_config(logits.shape[1]))
        return dx, None, None, None


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
