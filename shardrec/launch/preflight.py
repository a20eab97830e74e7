"""Checks a whole job in the launching process, before any rank starts.

``shardrec train`` and ``shardrec submit`` call :func:`check_job` after the job has loaded and its
data have been checked against the schema: it builds the model on the meta device (the model
against the schema, the sparse optimizer against the compute device), checks a plan file against
the world size and tables, the tables' memory lower bound against the ranks' memory, a resume
checkpoint against the model, and a given feature statistics file against the schema. Each failure is a ShardrecError the CLI prints as one line (exit 2),
raised before the run folder is created.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from shardrec.checkpoint.dcp_reader import SavedCheckpoint
from shardrec.checkpoint.store import first_problems, read_meta, resolve_resume
from shardrec.data.feature_stats import apply_stats, read_stats
from shardrec.errors import CheckpointError
from shardrec.job import JobConfig
from shardrec.sharding.memory_bound import check_memory_bound, memory_bound
from shardrec.sharding.plan_file import load_plan
from shardrec.sharding.planner import TopologySpec, topology_spec
from shardrec.sharding.shardable import MetaModel, meta_model


@dataclass(frozen=True)
class Launch:
    """Where the ranks of a job will run, as far as the launching process knows it."""

    world_size: int
    local_world_size: int
    compute_device: str
    """cpu or cuda: what the ranks compute on (not necessarily what this process has)."""


def check_job(job: JobConfig, launch: Launch, *, resume: Path | None = None) -> MetaModel:
    """Raises the first problem of ``job`` on ``launch`` as a ShardrecError; returns the meta model."""
    meta = meta_model(job, device_type=launch.compute_device)
    if job.sharding.plan is not None:
        load_plan(
            Path(job.sharding.plan), tables=meta.tables, world_size=launch.world_size,
            compute_device=launch.compute_device, local_world_size=launch.local_world_size,
        )
    topology = _topology(job, launch)
    if topology is not None:
        check_memory_bound(memory_bound(meta.module, tables=meta.tables, topology=topology, cfg=job.sharding), topology=topology)
    if resume is not None:
        check_resume(resume, meta)
    warm = job.checkpoint.warm_start
    if warm is not None:
        read_meta(resolve_resume(Path(warm.path)))  # exists, committed, of a format this version reads
    given = job.data.feature_stats
    if given is not None and job.features.needs_stats:
        apply_stats(job.features, read_stats(Path(given)), where=f"data.feature_stats '{given}'")
    return meta


def _topology(job: JobConfig, launch: Launch) -> TopologySpec | None:
    """The ranks' topology, or None when this process cannot know their memory (cuda ranks, no
    ``sharding.memory_per_device_gb``, and no GPU here)."""
    cfg = job.sharding
    if launch.compute_device == "cuda" and cfg.memory_per_device_gb is None and not torch.cuda.is_available():
        return None
    if launch.compute_device != cfg.compute_device:
        cfg = dataclasses.replace(cfg, compute_device=launch.compute_device)
    return topology_spec(cfg, world_size=launch.world_size, local_world_size=launch.local_world_size,
                         batch_size=job.data.batch_size)


def check_resume(path: Path, meta: MetaModel) -> None:
    """Raises a CheckpointError when checkpoint ``path`` cannot restore ``meta``'s model: a tensor
    missing, extra or of another global shape, or a data file missing or truncated."""
    read_meta(path)
    saved = SavedCheckpoint(path)
    saved.check_files()
    model = {f"model.{k}": tuple(v.shape) for k, v in meta.module.state_dict().items()}
    stored = {k: tuple(v.size) for k, v in saved.tensors.items() if k.startswith("model.")}
    problems = [f"{k[6:]}: not in the checkpoint" for k in model if k not in stored]
    problems += [f"{k[6:]}: shape {list(stored[k])} in the checkpoint, {list(s)} in the model"
                 for k, s in model.items() if k in stored and stored[k] != s]
    problems += [f"{k[6:]}: in the checkpoint, not in the model" for k in sorted(stored) if k not in model]
    if problems:
        raise CheckpointError(
            f"checkpoint '{path}' was written by a different model: {first_problems(problems)}; resume with the job "
            "that wrote it (its config.yaml), or start a new run (warm start: checkpoint.warm_start)"
        )
