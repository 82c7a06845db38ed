"""Data-parallel helpers shared by the trainer (trainer/) and the GRPO update (rl/).

Every function is the identity (or its one-process meaning) when torch.distributed is not
initialised, so the same code runs under `python` and `torchrun`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 modifies the module in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """A new tensor: the sum of `t` over ranks, on `t`'s device (a copy of `t` in one process)."""
    if not distributed():
        return t.clone()
    # NCCL reduces CUDA tensors only, gloo CPU ones (rewards live on the CPU).
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    summed = t.to(device, copy=True)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(t.device)


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (a one-element list in a single process)."""
    if not distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if distributed():
        dist.barrier()


class NonFiniteError(ArithmeticError):
    """A loss or gradient holds NaN or inf: the optimizer step that would apply it must not be taken."""


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients before clipping; clips to max_norm unless it is 0. Raises
    NonFiniteError, gradients untouched, when the norm is NaN or inf (the same on every rank: it is global)."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    if not torch.isfinite(full):
        raise NonFiniteError(f"the gradient norm is {full.item()}")
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return full
