"""Config of the data section of a job: where the Parquet data is, or how to synthesize it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shardrec.errors import ConfigError


@dataclass(kw_only=True)
class SyntheticConfig:
    """Criteo-shaped synthetic data matching the job's feature schema, made on first use."""

    train_rows: int = 200_000
    """Rows of the training file."""
    eval_rows: int = 20_000
    """Rows of the held-out evaluation file (drawn from the same distribution, other rows)."""
    seed: int = 0
    """Seed of ids, dense values, planted weights and labels."""
    zipf_a: float = 1.2
    """Power-law exponent of id frequencies (rank r is drawn with probability ~ r**-zipf_a)."""
    row_group_size: int = 16_384
    """Rows per Parquet row group."""

    def __post_init__(self) -> None:
        if self.train_rows <= 0 or self.eval_rows <= 0:
            raise ConfigError("data.synthetic.train_rows and data.synthetic.eval_rows must be > 0")
        if self.zipf_a <= 0:
            raise ConfigError(f"data.synthetic.zipf_a must be > 0, got {self.zipf_a}")


@dataclass(kw_only=True)
class DataConfig:
    """Where training and evaluation data come from and how they are batched."""

    train_path: str | None = None
    """Parquet or CSV: a file, a folder, a glob, or an fsspec URL of one; unset with ``synthetic``
    set: synthetic data is used."""
    eval_path: str | None = None
    """Held-out Parquet file or folder for periodic evaluation; unset: no evaluation."""
    items_path: str | None = None
    """Item catalogue (Parquet, one row per item: its id and item-side feature columns) that
    retrieval models rank every evaluation row against; required to evaluate them."""
    batch_size: int = 512
    """Rows per batch on each rank."""
    eval_batch_size: int | None = None
    """Rows per evaluation batch on each rank; unset: ``batch_size``."""
    prefetch: int = 2
    """Batches a background thread prepares ahead of training (with workers: per worker); 0: none."""
    num_workers: int = 0
    """Workers per rank reading and decoding; 0: in the training process (its prefetch thread)."""
    worker_kind: Literal["process", "thread"] = "process"
    """``process``: DataLoader worker processes (batches come back through shared memory);
    ``thread``: threads of the training process (no hand-off copy; parallel where pyarrow and
    numpy release the GIL). Same batches, same order, same resume position."""
    pin_memory: bool = True
    """Pin batches in page-locked memory for faster host-to-GPU copies (no effect without CUDA)."""
    shuffle_buffer: int = 0
    """Shuffle training rows within windows of this many rows per rank and worker (seeded by
    train.seed and the epoch); 0: file order."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """A row group that fails to decode (bad id, NaN, label outside 0/1 ...): stop with an error, or
    skip its rows and count them in metrics.jsonl (``skipped_rows``)."""
    feature_stats: str | None = None
    """A statistics file written by ``shardrec data stats`` for the features that need them
    (normalize, fill_missing: mean, num_buckets); unset: the run computes them from ``train_path``."""
    synthetic: SyntheticConfig | None = None
    """Make synthetic data on first use (cached under ``cache_dir``) when ``train_path`` is unset."""
    cache_dir: str = "~/.cache/shardrec"
    """Where synthetic data is cached."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be > 0, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise ConfigError(f"data.eval_batch_size must be > 0, got {self.eval_batch_size}")
        if self.prefetch < 0:
            raise ConfigError(f"data.prefetch must be >= 0, got {self.prefetch}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ConfigError("data.num_workers and data.shuffle_buffer must be >= 0")
        if self.train_path is None and self.synthetic is None:
            raise ConfigError("data.train_path is not set; set it to a Parquet file or folder, or add a data.synthetic section")
