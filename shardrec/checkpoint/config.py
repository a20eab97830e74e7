"""Config of the checkpoint section of a job: when checkpoints are written, how many are kept, warm start."""

from __future__ import annotations

from dataclasses import dataclass, field

from shardrec.errors import ConfigError


@dataclass(kw_only=True)
class WarmStartConfig:
    """Where a new run takes its initial weights from (shardrec/checkpoint/warm_start.py)."""

    path: str
    """A checkpoint (checkpoints/step-N) or a run folder (its latest checkpoint)."""
    tables: dict[str, str] = field(default_factory=dict)
    """New table name -> table name in the checkpoint, for tables that were renamed."""
    optimizer: bool = True
    """Also take the optimizer state (false: fresh optimizers)."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("checkpoint.warm_start.path must name a checkpoint or run folder")


@dataclass(kw_only=True)
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    enabled: bool = True
    """Write checkpoints at all."""
    interval: int = 0
    """Save every this many steps; 0: only at the end of training."""
    keep_last_n: int = 3
    """Committed checkpoints to keep; older ones are removed after a new one commits."""
    async_save: bool = False
    """Write checkpoints in the background (DCP async_save, staged to host memory first, at most one
    in flight) while training goes on; a save commits when the next one starts or training ends."""
    warm_start: WarmStartConfig | None = None
    """Start a new run from another run's checkpoint (ignored with --resume)."""

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ConfigError(f"checkpoint.interval must be >= 0, got {self.interval}")
        if self.keep_last_n < 1:
            raise ConfigError(f"checkpoint.keep_last_n must be >= 1, got {self.keep_last_n}")
