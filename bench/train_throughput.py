"""Training samples/s reading synthetic Parquet vs stepping over pre-built in-memory batches.

Both runs use the same sharded model (the default job's DLRM), the same ranks and the same
pipeline; the only difference is where batches come from: streamed from Parquet (reader with its
prefetch thread) or cycled from 32 batches built in memory before the first step. Ratio = parquet / in-memory, measured
in one run for each pipeline. Usage:

    python bench/train_throughput.py [--steps 200] [--repeats 2] [--nproc 2]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import statistics
from pathlib import Path
from typing import Iterator

from shardrec.data.batch import Batch
from shardrec.data.prepare import resolve_data
from shardrec.job import JobConfig, load_job
from shardrec.launch.spawn import run_ranks
from shardrec.train.dist import init_distributed, shutdown
from shardrec.train.quiet import quiet_libraries
from shardrec.train.trainer import DataPaths, Trainer


IN_MEMORY_BATCHES = 32


class InMemoryTrainer(Trainer):
    """Cycles over 32 batches built before the first step, instead of streaming from Parquet."""

    def batches(self, start_step: int) -> Iterator[Batch]:
        ready = list(itertools.islice(super().batches(start_step), IN_MEMORY_BATCHES))
        yield from itertools.cycle(ready)


def _rank(job: JobConfig, source: str, run_dir: Path) -> float:
    quiet_libraries()
    ctx = init_distributed(compute_device="cpu")
    try:
        cls = InMemoryTrainer if source == "memory" else Trainer
        with contextlib.redirect_stdout(io.StringIO()):  # the plan, printed by every run
            trainer = cls(job, ctx=ctx, run_dir=run_dir, data=DataPaths(job.data.train_path or "", None))
            return trainer.fit().samples_per_s
    finally:
        shutdown()


def measure(job: JobConfig, source: str, run_dir: Path, *, nproc: int, repeats: int = 1) -> float:
    """Median global training samples/s of ``job`` on ``nproc`` ranks with ``source`` batches."""
    return statistics.median(run_ranks(_rank, job, source, run_dir, world_size=nproc, timeout=900)[0] for _ in range(repeats))


def bench_job(steps: int, pipeline: str, run_dir: Path) -> JobConfig:
    """The default job with ``pipeline``, no evaluation, checkpoints or progress bar."""
    job = load_job(None, [f"train.steps={steps}", f"train.pipeline={pipeline}", "train.progress_bar=false",
                          "checkpoint.enabled=false", f"run.root={run_dir}"])
    return dataclasses.replace(job, data=dataclasses.replace(resolve_data(job.data, job.features), eval_path=None))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--run-dir", type=Path, default=Path("/tmp/shardrec-bench"))
    args = p.parse_args()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    print("| pipeline | parquet samples/s | in-memory samples/s | ratio |")
    print("|---|---|---|---|")
    for pipeline in ("base", "sparse_dist"):
        job = bench_job(args.steps, pipeline, args.run_dir)
        rates: dict[str, list[float]] = {"parquet": [], "memory": []}
        for _ in range(args.repeats):  # interleaved, so drifts of the machine hit both alike
            for source in ("parquet", "memory"):
                rates[source].append(measure(job, source, args.run_dir, nproc=args.nproc))
        parquet, memory = statistics.median(rates["parquet"]), statistics.median(rates["memory"])
        print(f"| {pipeline} | {parquet:,.0f} | {memory:,.0f} | {parquet / memory:.3f} |", flush=True)


if __name__ == "__main__":
    main()
