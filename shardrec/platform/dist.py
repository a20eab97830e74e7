"""Process groups from torchrun's environment, or a single process on its own."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """True on rank 0, which prints and writes run files."""
        return self.rank == 0


def init_distributed(*, compute_device: str, timeout_s: float = 600.0) -> DistContext:
    """Joins the process group torchrun describes (nccl on cuda, gloo on cpu), or makes one of size 1."""
    backend = "nccl" if compute_device == "cuda" else "gloo"
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if compute_device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistContext(rank, world_size, local_rank, local_world_size, device, backend)


def shutdown() -> None:
    """Leaves the process group if one is joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
