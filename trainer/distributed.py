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
    """Leave the process group; on return no gloo worker thread is busy, so the interpreter can exit.

    gloo's worker threads outlive destroy_process_group (torch modules keep references to the group:
    torch.distributed.nn's default arguments, DTensor's caches of FSDP2 meshes). After finishing a
    collective a worker still drops its reference to the collective's tensors; when Python has already
    dropped its own (all_gather_object's buffers), that frees a Python object and takes the GIL. A
    thread that takes the GIL while the interpreter finalizes is ended inside a C++ destructor:
    std::terminate, "terminate called without an active exception", SIGABRT. So this returns only once
    every worker (Linux: threads named pt_gloo_runloop) is asleep and has not run over an interval in
    which the GIL was free; it waits at most 10 s (a worker blocked in a peer's collective sleeps too).
    """
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    import time
    from pathlib import Path

    def gloo_workers() -> dict[str, tuple[str, str]]:
        """{thread id: (scheduler state, nanoseconds run)} of this process's gloo worker threads."""
        tasks, found = Path("/proc/self/task"), {}
        if not tasks.is_dir():  # not Linux: nothing to observe
            return found
        for task in tasks.iterdir():
            try:
                if (task / "comm").read_text().strip() == "pt_gloo_runloop":
                    state = (task / "stat").read_text().rpartition(")")[2].split()[0]
                    found[task.name] = (state, (task / "schedstat").read_text().split()[0])
            except OSError:  # the thread ended meanwhile
                continue
        return found

    deadline, seen = time.monotonic() + 10, gloo_workers()
    while seen and time.monotonic() < deadline:
        time.sleep(0.002)  # the GIL is free: a worker that needs it runs now
        now = gloo_workers()
        if now == seen and all(state == "S" for state, _ in now.values()):
            return
        seen = now


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
