"""Checkpoint saving that does not stall training: one DCP save in flight in a background thread.

A save stages the state to host memory (a copy: training may change the weights right after) and
writes it with ``dcp.save`` from a background thread over a gloo group of its own, so its
collectives never interleave with training's. (DCP's own ``async_save`` cannot stage the
ShardedTensors torchrec's state dicts hold, so the staging is done here.) The checkpoint is committed (meta.json written, ``.tmp`` renamed,
old ones pruned) only once every rank's write has finished: at the next save, or at
:meth:`Saver.close`. Until then the previous checkpoint stays the latest, as after a crash.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.optim import Optimizer

from shardrec import __version__
from shardrec.checkpoint.store import FORMAT, META_FILE, committed, rank_file, step_dir


@dataclass
class _Pending:
    future: Future | None
    tmp: Path
    final: Path
    meta: dict[str, Any]
    attach: dict[str, str]


class Saver:
    """Saves checkpoints under ``root``, synchronously or with one asynchronous save in flight."""

    def __init__(self, root: Path, *, is_main: bool, keep_last_n: int, asynchronous: bool, timeout_s: float = 1800.0) -> None:
        self.root, self.is_main, self.keep_last_n, self.asynchronous = root, is_main, keep_last_n, asynchronous
        self._pending: _Pending | None = None
        group_timeout = timedelta(seconds=timeout_s)  # a rank lost mid-save fails the job like any collective
        self._group = dist.new_group(backend="gloo", timeout=group_timeout) if asynchronous and dist.is_initialized() else None
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="shardrec-save", initializer=_lower_priority
        ) if asynchronous else None

    def save(
        self, *, step: int, model: nn.Module, optimizer: Optimizer, meta: dict[str, Any], attach: dict[str, str],
        rank_state: dict[str, Any] | None = None,
    ) -> Path:
        """Starts (or, synchronously, completes) the checkpoint of ``step``; collective over all ranks.

        ``rank_state`` (small: RNG states) is written by each rank to its own file right away."""
        self.wait()
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        if rank_state is not None:
            torch.save(rank_state, rank_file(tmp, dist.get_rank() if dist.is_initialized() else 0))
        state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        future = None
        if self.asynchronous:
            staged = stage(state)
            future = self._pool.submit(dcp.save, staged, checkpoint_id=str(tmp), process_group=self._group)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
        header = {"format": FORMAT, "shardrec_version": __version__, "step": step}
        self._pending = _Pending(future, tmp, final, {**header, **meta}, attach)
        if not self.asynchronous:
            self.wait()
        return final

    def wait(self) -> None:
        """Finishes the save in flight, if any, and commits it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.future is not None:
            pending.future.result()
        _barrier()
        if self.is_main:
            for name, text in pending.attach.items():
                (pending.tmp / name).write_text(text)
            (pending.tmp / META_FILE).write_text(json.dumps(pending.meta, indent=2) + "\n")
            shutil.rmtree(pending.final, ignore_errors=True)
            pending.tmp.rename(pending.final)
            for old in committed(self.root)[: -self.keep_last_n]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    def close(self) -> None:
        """Commits the last save; call before the process group goes away."""
        self.wait()
        if self._pool is not None:
            self._pool.shutdown()


def stage(value: Any) -> Any:
    """A host-memory copy of a state dict: tensors and ShardedTensors' local shards are cloned."""
    if isinstance(value, dict):
        return {k: stage(v) for k, v in value.items()}
    if isinstance(value, list):
        return [stage(v) for v in value]
    if isinstance(value, ShardedTensor):
        shards = [Shard(tensor=s.tensor.detach().to("cpu", copy=True), metadata=s.metadata) for s in value.local_shards()]
        return ShardedTensor._init_from_local_shards_and_global_metadata(  # noqa: SLF001 - the public constructor re-validates collectively
            shards, sharded_tensor_metadata=value.metadata(), process_group=value._process_group  # noqa: SLF001
        )
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return copy.deepcopy(value)


def _lower_priority() -> None:
    """Runs the background writer at the lowest CPU priority: on a busy host its copies into the
    page cache otherwise take CPU from the training ranks, which wait on each other at every
    collective (docs/benchmarks.md, "Checkpoints")."""
    if hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: per-thread nice
        except OSError:
            pass


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
