"""Process-group setup and model wrapping: one code path for `python train.py` and `torchrun`
(the collectives both the trainer and rl/ use are model/parallel.py's).

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them we run as a single process and never
touch torch.distributed. Backend: NCCL on CUDA, gloo on CPU. Multi-node is torchrun's business
(`--nnodes --node_rank --rdzv_endpoint`), nothing here changes.

Both wrappers AVERAGE gradients over ranks (DDP all-reduce mean, FSDP2 reduce-scatter mean); the
trainer therefore multiplies its per-rank loss by world_size (see train.py's normalisation).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun process group if launched by torchrun; pick this rank's device."""
    if "WORLD_SIZE" not in os.environ:
        return Dist(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """DDP (replicated parameters) or FSDP2 (`fully_shard` per block, then the root) across ranks."""
    if not dist.is_initialized():
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block)
        # The root (embedding = tied lm_head, final norm) stays gathered after forward: the fused
        # loss multiplies hidden states by `output_weight` outside the module's forward.
        return fully_shard(model, reshard_after_forward=False)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
