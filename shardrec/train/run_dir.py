"""Run folders: where a run writes its config, plan, metrics and checkpoints, and how to resume one."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from shardrec.errors import CheckpointError
from shardrec.job import JobConfig, dump_job
from shardrec.output import write_atomic
from shardrec.checkpoint import store as checkpoint


@dataclass(frozen=True)
class RunPaths:
    """A run folder and the checkpoint it resumes from, if any."""

    run_dir: Path
    config: Path
    resume: Path | None


def runs_of(job: JobConfig) -> Path:
    """Folder holding every run of this job's name."""
    return Path(job.run.root) / (job.run.name or job.model_name)


def new_run(job: JobConfig) -> Path:
    """A fresh timestamped run folder."""
    base = runs_of(job) / time.strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def find_resume(job: JobConfig, resume: str | None) -> Path:
    """The checkpoint to resume: from ``resume`` (a run or checkpoint folder) or the newest run's latest."""
    if resume:
        return checkpoint.resolve_resume(Path(resume))
    runs = sorted((p for p in runs_of(job).glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for run in runs:
        found = checkpoint.latest(run / "checkpoints")
        if found is not None:
            return found
    raise CheckpointError(
        f"--resume: no run under '{runs_of(job)}' has a complete checkpoint; train without --resume first, "
        "or pass --resume PATH"
    )


def ensure_config(job: JobConfig, run_dir: Path) -> None:
    """Writes the resolved job into ``run_dir`` unless its launcher did (a job torchx started directly)."""
    if not (run_dir / "config.yaml").exists():
        write_atomic(run_dir / "config.yaml", dump_job(job))


def prepare(job: JobConfig, *, resume: Path | None) -> RunPaths:
    """Creates (or reopens, when resuming checkpoint ``resume``) the run folder and writes the resolved config into it."""
    run_dir = resume.parent.parent if resume is not None else new_run(job)
    run_dir.mkdir(parents=True, exist_ok=True)
    # A resumed run keeps the first config.yaml; each resume's resolved job is kept beside it.
    config = run_dir / ("config.yaml" if resume is None else f"config.resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    write_atomic(config, dump_job(job))
    return RunPaths(run_dir=run_dir, config=config, resume=resume)


def mark_interrupted(run_dir: Path) -> Path | None:
    """Writes ``result.json`` of a run stopped by Ctrl-C: its latest committed checkpoint, from
    which ``shardrec train --resume RUN`` goes on. Returns that checkpoint (None: none yet)."""
    last = checkpoint.latest(run_dir / "checkpoints")
    step = int(checkpoint.read_meta(last)["step"]) if last is not None else 0
    result = {"status": "interrupted", "step": step, "checkpoint": str(last) if last is not None else None}
    write_atomic(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    return last
