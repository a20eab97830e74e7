"""Test helpers: tiny job configs and a runner of functions on N gloo ranks."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from pathlib import Path
from typing import Any, Callable

from shardrec.config import build
from shardrec.data.schema import criteo_schema
from shardrec.data.synthetic import generate
from shardrec.job import JobConfig

TINY_ROWS = [200, 50, 1000, 8, 300, 120]


def tiny_job_dict(tmp: Path, *, model: str = "dlrm", steps: int = 20, rows: int = 4096, **sections: Any) -> dict[str, Any]:
    """A job dict over a small Criteo-shaped synthetic data set written into ``tmp``."""
    schema = criteo_schema(num_dense=4, num_sparse=len(TINY_ROWS), rows=TINY_ROWS, dim=8)
    for f in schema.sparse:
        f.hash = False
    train, held_out = tmp / "train.parquet", tmp / "eval.parquet"
    if not train.exists():
        generate(schema, rows=rows, path=train, seed=1, zipf_a=1.2, row_group_size=1024)
        generate(schema, rows=1024, path=held_out, seed=2, zipf_a=1.2, row_group_size=1024)
    from shardrec.config import to_dict

    job: dict[str, Any] = {
        "model": {"name": model, **({"dense_arch_layer_sizes": [16, 8]} if model == "dlrm" else {})},
        "features": to_dict(schema),
        "data": {"train_path": str(train), "eval_path": str(held_out), "batch_size": 128, "prefetch": 0},
        "sharding": {"compute_device": "cpu"},
        "train": {"steps": steps, "progress_bar": False, "seed": 0, "timeout_s": 120,
                  "dense_optimizer": {"name": "adam", "lr": 0.003}, "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.1}},
        "checkpoint": {"enabled": False},
        "run": {"root": str(tmp / "runs")},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value}
    return job


def tiny_job(tmp: Path, **kwargs: Any) -> JobConfig:
    """:func:`tiny_job_dict` built into a JobConfig."""
    return build(JobConfig, tiny_job_dict(tmp, **kwargs), key="")


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
    """Runs ``fn(*args)`` on ``world_size`` spawned gloo ranks; returns each rank's result in rank order."""
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
                raise AssertionError(f"rank {rank} failed: {value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
