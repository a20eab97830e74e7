"""Resolves a job's data before launch: synthesizes it on first use and checks it against the schema."""

from __future__ import annotations

import dataclasses

from shardrec.data.reader import validate_data
from shardrec.data.synthetic import ensure_synthetic
from shardrec.job import JobConfig


def resolve_data(job: JobConfig) -> JobConfig:
    """``job`` with concrete data paths, each checked for existence, columns and types.

    Without ``data.train_path`` the job's ``data.synthetic`` section makes train and eval files
    that match the feature schema (cached, so only the first run pays for it).
    """
    data = job.data
    if data.train_path is None:
        train, held_out = ensure_synthetic(data, job.features)
        data = dataclasses.replace(data, train_path=str(train), eval_path=data.eval_path or str(held_out))
    validate_data(data.train_path, job.features)
    if data.eval_path is not None:
        validate_data(data.eval_path, job.features)
    return dataclasses.replace(job, data=data)
