"""Test helpers: tiny job configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shardrec.config import build, to_dict
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
