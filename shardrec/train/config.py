"""Config of the train section of a job: steps, pipeline, optimizers, learning-rate schedule, retrieval evaluation.

Only dataclasses here (no torch), so the job config can be read without building anything."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shardrec.errors import ConfigError


@dataclass(kw_only=True)
class SparseOptimizerConfig:
    """Optimizer of the embedding tables, run inside the fused embedding backward."""

    name: Literal["rowwise_adagrad", "adagrad", "adam", "sgd"] = "rowwise_adagrad"
    """Row-wise Adagrad keeps one accumulator per row: the usual choice for large tables."""
    lr: float = 0.05
    """Learning rate."""
    eps: float = 1e-8
    """Denominator epsilon of Adagrad and Adam."""
    weight_decay: float = 0.0
    """L2 penalty."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"train.sparse_optimizer.lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class DenseOptimizerConfig:
    """Optimizer of the dense (MLP) parameters and of data-parallel tables."""

    name: Literal["adam", "adamw", "adagrad", "sgd"] = "adam"
    """torch.optim optimizer."""
    lr: float = 1e-3
    """Learning rate."""
    weight_decay: float = 0.0
    """L2 penalty (decoupled for adamw)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"train.dense_optimizer.lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class LRScheduleConfig:
    """The ``train.lr_schedule`` section: a multiplier on every learning rate, by step."""

    warmup_steps: int = 0
    """Steps over which the rate rises linearly from 1/warmup_steps of its value to all of it."""
    decay: Literal["constant", "linear", "cosine"] = "constant"
    """After warm-up: keep the rate, or decay it linearly or along a half cosine to min_ratio."""
    decay_steps: int | None = None
    """Steps of the decay after warm-up; unset: until the end of training."""
    min_ratio: float = 0.0
    """Fraction of the rate left at the end of the decay."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"train.lr_schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ConfigError(f"train.lr_schedule.decay_steps must be > 0, got {self.decay_steps}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ConfigError(f"train.lr_schedule.min_ratio must be in [0, 1], got {self.min_ratio}")


@dataclass(kw_only=True)
class RetrievalEvalConfig:
    """The ``train.retrieval`` section: full-ranking evaluation of retrieval models."""

    ks: list[int] = field(default_factory=lambda: [10, 50])
    """Cut-offs of recall, hit rate and NDCG; MRR is taken within the largest."""
    exclude_feature: str | None = None
    """Sparse feature (e.g. the history) whose ids are not ranked for the row; unset: rank every item."""
    item_batch_size: int = 4096
    """Catalogue rows embedded per call."""
    score_chunk: int = 65536
    """Items scored at a time against a batch of users (bounds the score matrix)."""
    export_items: bool = True
    """Write ``item_embeddings.parquet`` (id, vector) into the run folder after the final evaluation."""

    def __post_init__(self) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ConfigError(f"train.retrieval.ks must be a non-empty list of positive cut-offs, got {self.ks}")
        if self.item_batch_size <= 0 or self.score_chunk <= 0:
            raise ConfigError("train.retrieval.item_batch_size and train.retrieval.score_chunk must be > 0")

    def check_exclude_feature(self, sparse_names: list[str]) -> None:
        """Raises a ConfigError when ``exclude_feature`` names none of the job's sparse features."""
        if self.exclude_feature is not None and self.exclude_feature not in sparse_names:
            raise ConfigError(f"train.retrieval.exclude_feature names '{self.exclude_feature}', which is not a sparse "
                              f"feature; sparse features: {', '.join(sparse_names)}")


@dataclass(kw_only=True)
class TrainConfig:
    """How long and how the model trains."""

    steps: int | None = 300
    """Optimizer steps to train for; set to null to train for ``epochs`` instead."""
    epochs: int | None = None
    """Passes over the training data, used when ``steps`` is null."""
    eval_interval: int = 0
    """Evaluate every this many steps; 0: only at the end."""
    eval_batches: int | None = None
    """Evaluate on at most this many batches per rank; unset: the whole evaluation set."""
    log_interval: int = 50
    """Append a training record to metrics.jsonl every this many steps."""
    pipeline: Literal["auto", "sparse_dist", "base"] = "auto"
    """Training pipeline; auto: sparse_dist, the faster one on cuda and on cpu (docs/benchmarks.md)."""
    seed: int = 0
    """Seed of initialization; the same seed gives the same run."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision of the models' dense parts: ``bf16`` runs their forward under
    ``torch.autocast`` in bfloat16 (weights, optimizer states, losses and metrics stay fp32; refused on
    a CPU without bf16 support); ``fp16`` is not offered yet (it needs a grad scaler in the
    pipeline): refused. The embedding tables keep their own storage precision
    (``features.table_precision``, fp32 or fp16; docs/precision.md)."""
    progress_bar: bool = True
    """Show a progress bar with samples/s on rank 0."""
    tensorboard: bool = True
    """Write train loss, samples/s, learning rates and every eval metric as TensorBoard scalars
    under ``<run>/tensorboard`` (rank 0; ``tensorboard --logdir <run>/tensorboard``)."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for another rank before the job fails."""
    sparse_optimizer: SparseOptimizerConfig = field(default_factory=SparseOptimizerConfig)
    """Optimizer fused into the embedding tables."""
    dense_optimizer: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig)
    """Optimizer of everything else."""
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    """Warm-up and decay of both optimizers' learning rates."""
    retrieval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)
    """Full-ranking evaluation of retrieval models (ignored by the others)."""

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("set exactly one of train.steps and train.epochs (set the other to null)")
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"train.steps must be > 0, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"train.epochs must be > 0, got {self.epochs}")
        if self.precision == "fp16":
            raise ConfigError("train.precision: fp16 is not offered yet (the training pipeline has no grad scaler); "
                              "use bf16, which needs none, or fp32")
        if self.eval_interval < 0 or self.log_interval <= 0:
            raise ConfigError("train.eval_interval must be >= 0 and train.log_interval > 0")
