"""Test helpers: tiny job configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardrec.config import build, to_dict
from shardrec.data.schema import DenseFeature, FeatureSchema, SparseFeature, TableConfig, criteo_schema
from shardrec.data.synthetic import generate
from shardrec.job import JobConfig

TINY_ROWS = [200, 50, 1000, 8, 300, 120]


def tiny_job_dict(tmp: Path, *, model: str = "dlrm", steps: int = 20, rows: int = 4096, **sections: Any) -> dict[str, Any]:
    """A job dict over a small Criteo-shaped synthetic data set written into ``tmp``."""
    if model in SEQUENCE_MODELS:
        schema = sequence_schema()
        train, held_out = tmp / "seq_train.parquet", tmp / "seq_eval.parquet"
        if not train.exists():
            write_sequence_data(rows=rows, path=train, seed=1)
            write_sequence_data(rows=1024, path=held_out, seed=2)
    else:
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


SEQUENCE_MODELS = ("din", "bst", "dien")
"""Models that read a history (``sequence: true``) and a target over its table."""
SEQ_ITEMS = 60
SEQ_USERS = 50
SEQ_MAX_LEN = 6


def sequence_schema(*, dim: int = 8) -> FeatureSchema:
    """A dense column, a user id, a target item and the user's item history (sharing table ``item``)."""
    return FeatureSchema(
        dense=[DenseFeature(name="d0", fill_missing=0.0)],
        sparse=[
            SparseFeature(name="user_id", table="user"),
            SparseFeature(name="item_id", table="item"),
            SparseFeature(name="history", table="item", sequence=True, max_len=SEQ_MAX_LEN),
        ],
        tables=[
            TableConfig(name="user", num_embeddings=SEQ_USERS, embedding_dim=dim),
            TableConfig(name="item", num_embeddings=SEQ_ITEMS, embedding_dim=dim),
        ],
    )


def sequence_rows(n: int, seed: int) -> dict[str, np.ndarray | list[list[int]]]:
    """``n`` rows with a planted sequence signal: items fall into 4 groups (id % 4), each history
    is drawn mostly from one group, and the label is 1 when the target is in that group (10% flipped)."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 4, n)
    lengths = rng.integers(0, SEQ_MAX_LEN + 1, n)
    history = []
    for g, length in zip(group, lengths):
        own = rng.random(length) < 0.8
        ids = np.where(own, 4 * rng.integers(0, SEQ_ITEMS // 4, length) + g, rng.integers(0, SEQ_ITEMS, length))
        history.append(ids.tolist())
    target = rng.integers(0, SEQ_ITEMS, n)
    label = ((target % 4 == group) & (lengths > 0)) ^ (rng.random(n) < 0.1)
    return {
        "label": label.astype(np.int8), "d0": rng.random(n).astype(np.float32),
        "user_id": rng.integers(0, SEQ_USERS, n), "item_id": target, "history": history,
    }


def write_sequence_data(*, rows: int, path: Path, seed: int) -> Path:
    """Writes :func:`sequence_rows` (the columns of :func:`sequence_schema`) to one Parquet file."""
    cols = sequence_rows(rows, seed)
    table = pa.table({
        "label": pa.array(cols["label"]), "d0": pa.array(cols["d0"]), "user_id": pa.array(cols["user_id"]),
        "item_id": pa.array(cols["item_id"]), "history": pa.array(cols["history"], type=pa.list_(pa.int64())),
    })
    pq.write_table(table, path, row_group_size=1024)
    return path
