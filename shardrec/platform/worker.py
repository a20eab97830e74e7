"""The per-rank entry point: ``python -m shardrec.platform.worker --config RESOLVED.yaml --run-dir DIR``.

The CLI resolves and checks the job, writes it into the run folder, and starts one of these per
rank (through torchrun, or in-process for a single rank).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from shardrec.errors import ShardrecError
from shardrec.job import JobConfig, load_job
from shardrec.platform.dist import init_distributed, shutdown
from shardrec.platform.quiet import quiet_libraries
from shardrec.platform.trainer import DataPaths, Trainer, TrainResult, summary
from shardrec.sharding.planner import resolve_compute_device


def run(job: JobConfig, *, run_dir: Path, resume: Path | None) -> TrainResult:
    """Trains ``job`` as one rank of the current launch and returns its result."""
    ctx = init_distributed(compute_device=resolve_compute_device(job.sharding), timeout_s=job.train.timeout_s)
    try:
        assert job.data.train_path is not None, "the CLI resolves data paths before launching"
        data = DataPaths(job.data.train_path, job.data.eval_path)
        trainer = Trainer(job, ctx=ctx, run_dir=run_dir, data=data)
        if resume is not None:
            trainer.resume(resume)
        elif job.checkpoint.warm_start is not None:
            trainer.warm_start()
        result = trainer.fit()
        if ctx.is_main:
            (run_dir / "result.json").write_text(json.dumps(summary(result), indent=2) + "\n")
        return result
    finally:
        shutdown()


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Arguments the launcher passes to each rank."""
    p = argparse.ArgumentParser(prog="shardrec-worker")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--resume", type=Path, default=None)
    return p.parse_args(argv)


@record
def main(argv: list[str] | None = None) -> int:
    """Runs one rank; a bad-input error is printed as one line and exits 2."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet_libraries()
    try:
        run(load_job(args.config, []), run_dir=args.run_dir, resume=args.resume)
    except ShardrecError as e:
        print(f"shardrec: error: {e}", file=sys.stderr, flush=True)
        (args.run_dir / "error.txt").write_text(f"{e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
