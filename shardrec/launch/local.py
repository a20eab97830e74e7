"""Runs a resolved job as N local processes through torchrun, or in this process when N is 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def torchrun_command(*, nproc: int, config: Path, run_dir: Path, resume: Path | None) -> list[str]:
    """The torchrun command line that starts ``nproc`` ranks of the worker on this machine."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "shardrec.train.worker", "--config", str(config), "--run-dir", str(run_dir),
    ]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    return cmd


def launch(*, nproc: int, config: Path, run_dir: Path, resume: Path | None) -> int:
    """Starts the ranks and waits for them; returns the exit code (0 on success)."""
    if nproc == 1:
        from shardrec.train.worker import main

        args = ["--config", str(config), "--run-dir", str(run_dir)] + (["--resume", str(resume)] if resume else [])
        return main(args)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(torchrun_command(nproc=nproc, config=config, run_dir=run_dir, resume=resume), env=env).returncode
