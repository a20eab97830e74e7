"""Runs a Python function on N local ranks (gloo on loopback): for tests and benchmarks."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from pathlib import Path
from typing import Any, Callable


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, queue: Any, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(*args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 240) -> list[Any]:
    """Runs picklable ``fn(*args)`` on ``world_size`` spawned ranks; returns their results in rank order.

    A rank that raises fails the call with its traceback; one that hangs past ``timeout`` seconds
    fails it too, and every rank still running is killed.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, queue, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in procs:
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed: {value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


def worker_pid(run_dir: Path, *, rank: int) -> int:
    """The process id of the running worker of ``rank`` that trains into ``run_dir`` (Linux: reads
    /proc); for tests and benchmarks that kill a rank."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"shardrec.train.worker" in cmdline and str(run_dir).encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise LookupError(f"no worker of rank {rank} runs for {run_dir}")
