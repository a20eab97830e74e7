"""Process groups from torchrun's environment, or a single process on its own."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from shardrec.errors import RankLostError


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


# What gloo says when a peer went away or a collective outlived the process group's timeout (NCCL's
# watchdog raises DistBackendError, a DistError, or ends the process itself).
_PEER_LOST = re.compile(r"Timed out waiting|timeout caused pair closure|Connection (closed|reset) by peer|gloo/transport/tcp")


@contextmanager
def lost_ranks_as_errors(*, rank: int, timeout_s: float) -> Iterator[None]:
    """Turns a collective that timed out or lost a peer into a RankLostError that says what happened.

    A rank that crashed, ran out of data or hangs leaves the others waiting in a collective; the
    process group's timeout (``train.timeout_s``) ends the wait and this names the likely causes.
    """
    try:
        yield
    except RuntimeError as e:
        if not (isinstance(e, dist.DistError) or _PEER_LOST.search(str(e))):
            raise
        lines = str(e).strip().splitlines() or [type(e).__name__]
        detail = re.sub(r"^\[[^\]]*\]\s*", "", lines[-1])[:300]  # drop gloo's "[file.cc:78]" prefix
        raise RankLostError(
            f"rank {rank} stopped waiting for the other ranks in a collective ({detail}); the collective "
            f"timeout is train.timeout_s={timeout_s:g}. Another rank crashed, ran out of data or hangs: its own "
            "error comes first in the log (and in its torchelastic error file); if the ranks are only slow "
            "(a long first batch, a slow file system), raise train.timeout_s"
        ) from e
