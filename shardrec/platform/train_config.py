"""Config of the train section of a job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shardrec.errors import ConfigError
from shardrec.platform.optim import DenseOptimizerConfig, SparseOptimizerConfig
from shardrec.platform.retrieval_eval import RetrievalEvalConfig
from shardrec.platform.schedule import LRScheduleConfig


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
    progress_bar: bool = True
    """Show a progress bar with samples/s on rank 0."""
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
        if self.eval_interval < 0 or self.log_interval <= 0:
            raise ConfigError("train.eval_interval must be >= 0 and train.log_interval > 0")
