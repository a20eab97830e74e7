"""Configs of ``shardrec export`` (a checkpoint as a serving artifact) and ``shardrec predict`` (scores from one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from shardrec.errors import ConfigError

Quantize = Literal["int8", "int4", "fp16", "none"]
"""Weight dtype of an exported table."""
QUANTIZE_NAMES: tuple[str, ...] = get_args(Quantize)


@dataclass(kw_only=True)
class ExportConfig:
    """What ``shardrec export`` reads and writes."""

    checkpoint: Path
    """A checkpoints/step-N folder, or a run folder (its latest checkpoint)."""
    out: Path
    """Folder to write; must not exist."""
    quantize: Quantize | None = None
    """Weight dtype of every table: int8, int4, fp16, or none (float32); unset: each table as it
    was trained (fp16 for a table of precision fp16, none for the others)."""
    table_quantize: dict[str, Quantize] = field(default_factory=dict)
    """Table name -> its own weight dtype, overriding ``quantize``."""
    config: Path | None = None
    """Job file whose model and features to export; default the checkpoint's own config.yaml."""

    def __post_init__(self) -> None:
        for key, value in [("quantize", self.quantize), *((f"table_quantize.{t}", q) for t, q in self.table_quantize.items())]:
            if value is not None and value not in QUANTIZE_NAMES:
                raise ConfigError(f"invalid value {value!r} for '{key}'; valid choices: {', '.join(QUANTIZE_NAMES)}")


@dataclass(kw_only=True)
class PredictConfig:
    """What ``shardrec predict`` reads and writes."""

    model: Path
    """Folder written by ``shardrec export``."""
    data: str
    """Parquet file, folder, glob or fsspec URL of the rows to score."""
    out: Path
    """Parquet file to write: the id column, then the score columns."""
    id_column: str
    """Column of the data copied next to the scores, to join them back."""
    batch_size: int = 4096
    """Rows per forward."""
    progress_bar: bool = True
    """Show a progress bar with rows/s."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be > 0, got {self.batch_size}")
        if self.out.suffix != ".parquet":
            raise ConfigError(f"--out '{self.out}' must name a .parquet file")
