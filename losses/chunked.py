"""Per-token losses over a huge vocabulary without materialising the [N, V] logits.

Every loss in losses/ is a *per-token* function of fp32 logits, `token_fn(logits [n, V], *rows) -> [n]`,
plus a reduction over valid tokens. `reduce_tokens` applies any such function to either

- full logits [..., V] (a plain tensor), or
- a `Head(hidden [..., d], weight [V, d])`, the final hidden states and the lm_head matrix, in which
  case logits exist only `chunk_size` tokens at a time: [chunk, V] instead of [N, V]
  (8 x 4096 tokens x 151,936 vocab is ~20 GB of fp32 logits before any log-softmax copy).

Two autograd Functions share one chunk loop (`_chunked_backprop`), because the reductions need
different things from autograd:

1. reduction "sum"/"mean" -> `FusedLinearSum`, the fused-linear trick of Liger-Kernel
   (Hsu et al. 2024, arXiv:2410.10989): the loss is a scalar L = sum_i w_i * l_i, so its gradient can be
   computed *during the forward pass*, chunk by chunk, and the chunk's logits freed at once:
       z_c = h_c W^T                       (chunk logits)
       g_c = dL/dz_c                        (closed form, or autograd through token_fn on the chunk)
       dL/dh_c = g_c W,   dL/dW += g_c^T h_c
   backward() only multiplies the stored gradients by the incoming scalar. Three matmuls per chunk,
   the same as the unchunked forward + backward, so no recomputation.
2. reduction "none" -> `FusedLinearRows`: per-token values with a gradient (e.g. GRPO's log-probs
   feed a nonlinear loss built later). The upstream gradient differs per token, so dL/dW cannot be
   summed in the forward pass; backward runs the same chunk loop with w_i = dLoss/dl_i, recomputing
   each chunk's logits (one extra matmul per chunk).

Both paths drop the rows with zero weight (prompt tokens, padding) before chunking, so masked tokens
cost nothing. Row arguments (`rows`) are constants sliced alongside the tokens: tensors with a
leading token dimension, or a `Head` (a teacher), projected per chunk under no_grad.

The chunk's logits live in one [chunk, V] buffer reused from chunk to chunk, and a token function
that knows its gradient in closed form (`value_and_grad_`: softmax - onehot for cross-entropy, q - p
for forward KL) writes dL/dz over that buffer instead of going through autograd. That matters on
CPU, where every fresh [chunk, V] tensor is page-faulted in anew (51 ms to allocate and zero a
[128, 151936] fp32 tensor vs 12 ms to zero an existing one, one core) and autograd through a
log-softmax allocates four per chunk. On CUDA the Triton kernels' autograd path is used instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

import kernels

TokenFn = Callable[..., torch.Tensor]  # (logits [n, V] fp32, *rows) -> [n] fp32
# optionally with .value_and_grad_(logits [n, V], weights [n] | None, *rows) -> [n]: the values, and
# d(sum_i weights_i * l_i)/dlogits written over `logits` (closed form, no autograd); weights None: values
# only (logits are overwritten all the same)
REDUCTIONS = ("none", "sum", "mean")
DEFAULT_CHUNK_SIZE = 128  # [128, 151936] fp32 = 78 MB per live logits-sized tensor


@dataclass(frozen=True)
class Head:
    """Logits that are computed on demand: logits = hidden @ weight.T (the model's lm_head).

    hidden: [..., d] final normed hidden states; weight: [V, d] (the embedding when tied).
    Indexing selects token rows and keeps the weight: head[rows] -> Head(hidden[rows], weight).
    """

    hidden: torch.Tensor
    weight: torch.Tensor

    def __post_init__(self):
        if self.weight.dim() != 2 or self.hidden.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"Head: hidden {tuple(self.hidden.shape)} and weight {tuple(self.weight.shape)} "
                             "do not match: expected hidden [..., d] and weight [V, d]")

    @property
    def shape(self) -> torch.Size:
        """The shape the logits would have: [..., V]."""
        return self.hidden.shape[:-1] + self.weight.shape[:1]

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def __getitem__(self, rows) -> "Head":
        return Head(self.hidden[rows], self.weight)

    def logits(self) -> torch.Tensor:
        return upcast(self.hidden @ self.weight.T)  # (n, V)


Logits = torch.Tensor | Head


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to fp32 for the softmax math; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def as_logits(x):
    """A row argument as the token function sees it: a Head (a teacher) becomes its logits."""
    return x.logits() if isinstance(x, Head) else x


def softmax_(logits: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Overwrite logits [n, V] with softmax(scale * logits) row by row and return logsumexp(scale * logits)
    [n], with no [n, V] temporary (scale > 0): for the closed-form gradients of the token functions."""
    top = logits.amax(-1, keepdim=True)  # (n, 1)
    logits.sub_(top).mul_(scale).exp_()
    total = logits.sum(-1, keepdim=True)  # (n, 1)
    logits.div_(total)
    return (scale * top + total.log()).squeeze(1)  # (n,)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype: the autocast dtype when autocast is on (as nn.Linear would use), else hidden's."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """out += a @ b; in place (no [V, d] temporary) when the dtypes agree, else through one."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out.add_(a @ b)


def _chunked_backprop(token_fn, hidden, weight, rows, weights, chunk_size, need_h: bool, need_w: bool):
    """Per-token values l_i = token_fn(hidden_i @ weight.T, *rows_i) [n] (detached) and the gradients of
    sum_i weights_i * l_i w.r.t. hidden and weight (None where not needed), one [chunk, V] block at a time.
    The weight gradient accumulates in fp32 (fp64 for fp64 inputs)."""
    dtype = _compute_dtype(hidden)
    acc_dtype = torch.promote_types(dtype, torch.float32)
    grad_hidden = torch.empty_like(hidden) if need_h else None  # every row is written below
    grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_w else None
    w = weight.to(dtype)  # (V, d), a copy only when autocast lowers the precision
    buffer = w.new_empty(min(chunk_size, hidden.shape[0]), w.shape[0])  # (chunk, V) every chunk's logits
    values = []
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        row_args = [as_logits(r[chunk]) for r in rows]  # a teacher Head projects under the caller's autocast
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit below
            h = hidden[chunk].to(dtype)  # (c, d)
            logits = upcast(torch.matmul(h, w.T, out=buffer[:len(h)]))  # (c, V)
            chunk_values, g = _chunk_values_and_grad(token_fn, logits, row_args, weights[chunk], need_h or need_w)
            g = None if g is None else g.to(dtype)  # (c, V) the gradient matmuls run in the compute dtype
            if need_h:
                grad_hidden[chunk] = g @ w  # (c, d)
            if need_w:
                _accumulate(grad_weight, g.T, h)  # (V, d)
        values.append(chunk_values.clone())  # a token function may return a view of the reused buffer
    values = torch.cat(values) if values else hidden.new_zeros(0, dtype=acc_dtype)
    return values, grad_hidden, grad_weight


def _chunk_values_and_grad(token_fn, logits, row_args, weights, need_grad: bool):
    """token_fn on one chunk's logits [c, V] and the gradient of sum_i weights_i * l_i w.r.t. them (None
    when not needed): in closed form over `logits` when the token function has one, else by autograd."""
    # On CUDA the Triton kernels take the autograd path: one fused pass each way, where the closed form is
    # ~6 torch passes over the chunk (and CUDA's caching allocator makes fresh tensors cheap).
    if hasattr(token_fn, "value_and_grad_") and not kernels.uses_triton(logits):
        values = token_fn.value_and_grad_(logits, weights if need_grad else None, *row_args)
        return values, (logits if need_grad else None)
    logits.requires_grad_(need_grad)
    with torch.enable_grad():
        values = token_fn(logits, *row_args)  # (c,)
        if not need_grad:
            return values, None
        g = torch.autograd.grad((values * weights).sum(), logits)[0]  # (c, V) dL/dlogits
    logits.requires_grad_(False)  # the buffer is reused by the next chunk
    return values.detach(), g


class FusedLinearSum(torch.autograd.Function):
    """L = sum_i weights_i * token_fn(hidden_i @ weight.T, *rows_i), its gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, weights, token_fn, rows, chunk_size):
        values, grad_hidden, grad_weight = _chunked_backprop(token_fn, hidden, weight, rows, weights, chunk_size,
                                                             *ctx.needs_input_grad[:2])
        ctx.weight_dtype = weight.dtype
        ctx.grads = (grad_hidden, grad_weight)  # intermediates, not inputs: kept on ctx, scaled in place below
        return (values * weights).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("FusedLinearSum: backward ran twice; the gradients computed in forward are scaled "
                               "in place (no second [V, d] copy), so retain_graph=True is not supported")
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None
        if grad_hidden is not None:
            grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


class FusedLinearRows(torch.autograd.Function):
    """l_i = token_fn(hidden_i @ weight.T, *rows_i) per token [n]. The upstream gradient is per token,
    so backward recomputes each chunk's logits (under the forward's autocast state) and accumulates
    the gradients of sum_i grad_output_i * l_i in place: one extra matmul per chunk, no [n, V] kept."""

    @staticmethod
    def forward(ctx, hidden, weight, token_fn, rows, chunk_size):
        kind = hidden.device.type
        ctx.autocast = dict(device_type=kind, dtype=torch.get_autocast_dtype(kind),
                            enabled=torch.is_autocast_enabled(kind))
        ctx.token_fn, ctx.rows, ctx.chunk_size, ctx.weight_dtype = token_fn, rows, chunk_size, weight.dtype
        ctx.save_for_backward(hidden, weight)
        ones = torch.ones(hidden.shape[0], device=hidden.device)
        return _chunked_backprop(token_fn, hidden, weight, rows, ones, chunk_size, False, False)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        hidden, weight = ctx.saved_tensors
        with torch.autocast(**ctx.autocast):
            _, grad_hidden, grad_weight = _chunked_backprop(ctx.token_fn, hidden, weight, ctx.rows, grad_output,
                                                            ctx.chunk_size, *ctx.needs_input_grad[:2])
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _token_values(token_fn, logits: Logits, rows, chunk_size) -> torch.Tensor:
    """Per-token values [n] with their graph (chunked for a Head)."""
    if isinstance(logits, Head):
        return FusedLinearRows.apply(logits.hidden, logits.weight, token_fn, rows, chunk_size)
    return token_fn(upcast(logits), *[as_logits(r) for r in rows])


def flatten_tokens(x, lead: torch.Size, name: str):
    """[*lead, ...] -> [n, ...] for a tensor, or Head hidden [*lead, d] -> [n, d]."""
    n = lead.numel()
    if tuple(x.shape[:len(lead)]) != tuple(lead):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected leading dims {tuple(lead)}")
    if isinstance(x, Head):
        return Head(x.hidden.reshape(n, -1), x.weight)
    return x.reshape(n, *x.shape[len(lead):])


def _token_weights(mask, lead: torch.Size, device: torch.device):
    """Per-token weights [n] and the indices of the tokens that count (None when all do)."""
    if mask is None:
        return torch.ones(lead.numel(), device=device), None
    weights = flatten_tokens(mask, lead, "mask").float()
    keep = weights.nonzero().squeeze(1)
    return weights, (None if len(keep) == lead.numel() else keep)


def reduce_tokens(token_fn: TokenFn, logits: Logits, rows=(), mask: torch.Tensor | None = None,
                  reduction: str = "mean", chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Apply a per-token loss to logits [..., V] or a Head, weight the tokens by `mask`, and reduce.

    token_fn(logits [n, V] fp32, *rows) -> [n]; rows: tensors [..., *] or Heads sharing the leading
    dims of `logits`, treated as constants. mask: [...] bool (True = the token counts) or float
    per-token weights w_i; None = every token counts with w_i = 1.
    reduction: "none" -> w_i * l_i with the leading shape (0 at masked tokens);
    "sum" -> sum_i w_i * l_i; "mean" -> sum_i w_i * l_i / sum_i w_i (0 when no token counts).
    chunk_size: tokens per chunk when `logits` is a Head (ignored for a logits tensor).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = logits.shape[:-1]
    n = lead.numel()
    logits = flatten_tokens(logits, lead, "logits")
    rows = [flatten_tokens(r, lead, f"row argument {i}") for i, r in enumerate(rows)]
    weights, keep = _token_weights(mask, lead, logits.device)
    if keep is not None:  # drop masked tokens before any vocabulary-sized work
        logits, rows, weights = logits[keep], [r[keep] for r in rows], weights[keep]
    if reduction == "none":
        values = _token_values(token_fn, logits, rows, chunk_size) * weights  # (n_kept,)
        if keep is not None:
            values = values.new_zeros(n).index_put((keep,), values)  # (n,)
        return values.reshape(lead)
    if isinstance(logits, Head) and torch.is_grad_enabled():  # no_grad (eval): values only, one matmul per chunk
        total = FusedLinearSum.apply(logits.hidden, logits.weight, weights, token_fn, rows, chunk_size)
    else:
        total = (_token_values(token_fn, logits, rows, chunk_size) * weights).sum()
    if reduction == "mean" and len(weights):
        total = total / weights.sum()
    return total
