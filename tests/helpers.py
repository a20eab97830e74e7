"""Test helpers: tiny job configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardrec.config import build, to_dict
from shardrec.data.schema import DenseFeature, FeatureSchema, NegativeSampling, SparseFeature, TableConfig, criteo_schema
from shardrec.data.synthetic_signal import generate
from shardrec.job import JobConfig
from shardrec.models import registry

TINY_ROWS = [200, 50, 1000, 8, 300, 120]


def tiny_job_dict(tmp: Path, *, model: str = "dlrm", steps: int = 20, rows: int = 4096, **sections: Any) -> dict[str, Any]:
    """A job dict over a small Criteo-shaped synthetic data set written into ``tmp`` (sequence,
    multi-task and retrieval models: data of their kind)."""
    items = None
    if registry.get(model).retrieval:
        options = RETRIEVAL_DATA.get(model, {})
        schema = retrieval_schema(**options)
        tag = "_".join(sorted(k for k, v in options.items() if v)) or "plain"
        train, held_out, items = tmp / f"ret_{tag}_train.parquet", tmp / f"ret_{tag}_eval.parquet", tmp / f"ret_{tag}_items.parquet"
        if not train.exists():
            write_retrieval_data(rows=rows, path=train, seed=1, **options)
            write_retrieval_data(rows=256, path=held_out, seed=2, **options)
            write_catalogue(items, **options)
    elif registry.get(model).multi_task:
        schema = criteo_schema(num_dense=4, num_sparse=len(TINY_ROWS), rows=TINY_ROWS, dim=8)
        for f in schema.sparse:
            f.hash = False
        train, held_out = tmp / "mt_train.parquet", tmp / "mt_eval.parquet"
        if not train.exists():
            for path, n, seed in ((train, rows, 1), (held_out, 1024, 2)):
                generate(schema, rows=n, path=path, seed=seed, zipf_a=1.2, row_group_size=1024)
                add_funnel_label(path)
        schema.label = ["label", "label2"]
    elif model in SEQUENCE_MODELS:
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
        "data": {"train_path": str(train), "eval_path": str(held_out), "batch_size": 128, "prefetch": 0,
                 **({"items_path": str(items)} if items else {})},
        "sharding": {"compute_device": "cpu"},
        "train": {"steps": steps, "progress_bar": False, "seed": 0, "timeout_s": 120,
                  "dense_optimizer": {"name": "adam", "lr": 0.003}, "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.1}},
        "checkpoint": {"enabled": False},
        "run": {"root": str(tmp / "runs")},
    }
    job["train"].update(MODEL_TRAIN.get(model, {}))
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value}
    return job


def tiny_job(tmp: Path, **kwargs: Any) -> JobConfig:
    """:func:`tiny_job_dict` built into a JobConfig."""
    return build(JobConfig, tiny_job_dict(tmp, **kwargs), key="")


def add_funnel_label(path: Path) -> None:
    """Adds ``label2`` to a synthetic file: ``label`` and an even C1 id, a learnable second step of a funnel."""
    table = pq.read_table(path)
    second = np.asarray(table["label"]) * (np.asarray(table["C1"]) % 2 == 0)
    pq.write_table(table.append_column("label2", pa.array(second.astype(np.int8))), path, row_group_size=1024)


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


# ---------------------------------------------------------------------------------------------
# Retrieval models: users whose histories and next items come from one of 4 item groups.

RETRIEVAL_DATA: dict[str, dict[str, Any]] = {
    "hstu": {"time": True, "negatives": 16},
    "hllm": {"text": True},
    "youtubednn": {"negatives": 16},
    "sasrec": {"negatives": 16},
    "gru4rec": {"negatives": 16},
}
"""Options of :func:`retrieval_schema` each retrieval model's generic tests use (default: none)."""
MODEL_TRAIN: dict[str, dict[str, Any]] = {
    # Trained from scratch, HLLM's item transformer collapses every item onto one vector under large
    # first steps (its config uses these rates too).
    "hllm": {"dense_optimizer": {"name": "adam", "lr": 0.001}, "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.01}},
}
"""Training settings a model's tiny jobs use instead of the common ones."""
TOKENS = 24
TOKENS_PER_ITEM = 4


def retrieval_schema(*, dim: int = 8, time: bool = False, text: bool = False, negatives: int = 0) -> FeatureSchema:
    """``d0``, ``user_id``, ``item_id`` (the next item) and ``history`` over table ``item``; with
    ``time``: raw ``hist_ts``/``ts`` timestamps; with ``text``: ``hist_tokens``/``item_tokens``
    (TOKENS_PER_ITEM token ids per item, table ``token``); with ``negatives``: ``neg_item_ids``."""
    sparse = [
        SparseFeature(name="user_id", table="user"),
        SparseFeature(name="item_id", table="item"),
        SparseFeature(name="history", table="item", sequence=True, max_len=SEQ_MAX_LEN),
    ]
    tables = [TableConfig(name="user", num_embeddings=SEQ_USERS, embedding_dim=dim),
              TableConfig(name="item", num_embeddings=SEQ_ITEMS, embedding_dim=dim)]
    if time:
        sparse += [SparseFeature(name="hist_ts", raw=True, sequence=True, max_len=SEQ_MAX_LEN), SparseFeature(name="ts", raw=True)]
    if text:
        sparse += [SparseFeature(name="item_tokens", table="token", sequence=True, max_len=TOKENS_PER_ITEM),
                   SparseFeature(name="hist_tokens", table="token", sequence=True, max_len=SEQ_MAX_LEN * TOKENS_PER_ITEM)]
        tables.append(TableConfig(name="token", num_embeddings=TOKENS, embedding_dim=dim))
    if negatives:
        sparse.append(SparseFeature(name="neg_item_ids", table="item", negatives=NegativeSampling(num=negatives, of="item_id")))
    return FeatureSchema(dense=[DenseFeature(name="d0", fill_missing=0.0)], sparse=sparse, tables=tables)


def item_tokens(item: int) -> list[int]:
    """An item's "title": TOKENS_PER_ITEM token ids, the third naming its group (0 pads)."""
    return [1 + item % 7, 8 + (item // 7) % 5, 13 + item % 4, 17 + item % 7 if item % 2 else 0]


def write_retrieval_data(*, rows: int, path: Path, seed: int, time: bool = False, text: bool = False, negatives: int = 0) -> Path:
    """``rows`` rows of :func:`retrieval_schema`'s columns: each user's history and next item come
    mostly (80%) from one group of items (id % 4)."""
    del negatives  # drawn during training, no column
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 4, rows)
    lengths = rng.integers(1, SEQ_MAX_LEN + 1, rows)

    def draw(g: int, n: int) -> list[int]:
        own = rng.random(n) < 0.8
        return np.where(own, 4 * rng.integers(0, SEQ_ITEMS // 4, n) + g, rng.integers(0, SEQ_ITEMS, n)).tolist()

    history = [draw(g, n) for g, n in zip(group, lengths)]
    target = [draw(g, 1)[0] for g in group]
    cols: dict[str, Any] = {
        "label": pa.array(np.ones(rows, dtype=np.int8)), "d0": pa.array(rng.random(rows).astype(np.float32)),
        "user_id": pa.array(rng.integers(0, SEQ_USERS, rows)), "item_id": pa.array(target),
        "history": pa.array(history, type=pa.list_(pa.int64())),
    }
    if time:
        stamps = [np.cumsum(rng.integers(1, 5000, n + 1)).tolist() for n in lengths]
        cols["hist_ts"] = pa.array([s[:-1] for s in stamps], type=pa.list_(pa.int64()))
        cols["ts"] = pa.array([s[-1] for s in stamps])
    if text:
        cols["item_tokens"] = pa.array([item_tokens(t) for t in target], type=pa.list_(pa.int64()))
        cols["hist_tokens"] = pa.array([[x for i in h for x in item_tokens(i)] for h in history], type=pa.list_(pa.int64()))
    pq.write_table(pa.table(cols), path, row_group_size=1024)
    return path


def write_catalogue(path: Path, *, text: bool = False, **_: Any) -> Path:
    """The item catalogue of :func:`retrieval_schema`: every item id (and its tokens with ``text``)."""
    cols: dict[str, Any] = {"item_id": pa.array(np.arange(SEQ_ITEMS))}
    if text:
        cols["item_tokens"] = pa.array([item_tokens(i) for i in range(SEQ_ITEMS)], type=pa.list_(pa.int64()))
    pq.write_table(pa.table(cols), path)
    return path


def train_losses(run: "Path") -> dict[int, float]:
    """step -> loss of a run folder's metrics.jsonl train records (empty before the first)."""
    import json

    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}


def checkpoint_weights(step_dir: "Path", out: "Path") -> dict:
    """A DCP checkpoint's model and optimizer tensors by flat name (converted through ``out``)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(step_dir), str(out))
    state = torch.load(out, weights_only=False)
    return {f"model.{k}": v for k, v in state["model"].items()} | {
        f"optim.{k}": v for k, v in _flat(state["optim"]).items() if isinstance(v, torch.Tensor)
    }


def _flat(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def restartable_job(tmp: "Path", *, steps: int, interval: int) -> "Path":
    """A tiny job checkpointing every ``interval`` steps whose plan fits both 2x1 and 1x2 (sharding
    types that do not group shards by node), written to ``tmp/job.yaml``: for the tests that kill
    a rank and compare the resumed weights with an uninterrupted run's."""
    import yaml

    job = tiny_job_dict(
        tmp, steps=steps, checkpoint={"enabled": True, "interval": interval, "keep_last_n": 2}, train={"log_interval": 1},
        sharding={"default": {"sharding_types": ["table_wise", "row_wise"]}},
    )
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    return tmp / "job.yaml"
