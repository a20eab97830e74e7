"""Resolves a job's data section before launch: synthesizes it on first use and checks it against the schema."""

from __future__ import annotations

import dataclasses

from shardrec.data.reader import validate_data
from shardrec.data.synthetic_signal import ensure_synthetic
from shardrec.data.config import DataConfig
from shardrec.data.schema import FeatureSchema


def resolve_data(data: DataConfig, features: FeatureSchema) -> DataConfig:
    """``data`` with concrete paths, each checked for existence, columns and types against ``features``.

    Without ``data.train_path`` the ``data.synthetic`` section makes train and eval files that
    match the feature schema (cached, so only the first run pays for it). Callers put the result
    back into their job: ``dataclasses.replace(job, data=resolve_data(job.data, job.features))``.
    """
    if data.train_path is None:
        train, held_out = ensure_synthetic(data, features)
        data = dataclasses.replace(data, train_path=str(train), eval_path=data.eval_path or str(held_out))
    validate_data(data.train_path, features)
    if data.eval_path is not None:
        validate_data(data.eval_path, features)
    return data
