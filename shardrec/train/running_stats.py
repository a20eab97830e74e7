"""Running statistics of a placed model (BatchNorm's running mean and variance, Dice's moving
averages): their true initial values once DistributedModelParallel has materialized the model,
and one value on every rank.

DistributedModelParallel re-creates every meta buffer as zeros and re-initializes only modules
that have parameters, so a running variance of 0 (a division by ~0 in eval) is left wherever
nothing resets it. And it wraps the dense part in DDP with ``broadcast_buffers=False``: each
rank's running statistics follow its own batches. The moving averages are linear in the batch
statistics, which training does not compute from the running ones, so replacing each rank's
values by their mean now and then gives exactly what averaging after every step would; the
trainer does it before each evaluation and checkpoint, so every rank evaluates and the checkpoint
holds the same statistics (bit for bit) that a resumed run restores.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def running_stat_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module with running statistics (a ``reset_running_stats`` method)."""
    return [(n, m) for n, m in model.named_modules() if callable(getattr(m, "reset_running_stats", None))]


@torch.no_grad()
def reset_running_stats(model: nn.Module) -> None:
    """Sets every running statistic to its initial value (mean 0, variance 1, count 0)."""
    for _, module in running_stat_modules(model):
        module.reset_running_stats()


@torch.no_grad()
def sync_running_stats(model: nn.Module) -> None:
    """Replaces every floating-point running statistic by its mean over the ranks of the default
    group, the same bits on every rank; a no-op on one rank or without statistics."""
    buffers = [b for _, m in running_stat_modules(model) for b in m.buffers(recurse=False) if b.is_floating_point()]
    if not buffers or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([b.reshape(-1).double() for b in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    # The rank-0 copy on every rank: equal bits whatever order the reduction summed in.
    dist.broadcast(flat, src=0)
    for b, v in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(v.view_as(b))
