"""``shardrec plan``: what to plan (a job's model or a table list), for which topology, and the output.

A table list is YAML (``tables:`` entries) or CSV with columns ``name, rows, dim`` and optional
``pooling_factor`` (average ids per sample), ``sharding_types`` and ``compute_kernels``
(``|``-separated lists)::

    tables:
      - {name: user, rows: 40000000, dim: 128, pooling_factor: 1, sharding_types: [row_wise]}
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from shardrec.config import build, convert
from shardrec.errors import ConfigError
from shardrec.platform.optim import SparseOptimizerConfig, fuse_sparse_optimizer
from shardrec.sharding.config import ComputeKernelName, ShardingConfig, ShardingTypeName, TableConstraint


@dataclass(kw_only=True)
class TableSpec:
    """One table of a table list."""

    name: str
    """Table name."""
    rows: int
    """Number of rows."""
    dim: int
    """Row width."""
    pooling_factor: float = 1.0
    """Average ids per sample looked up in this table."""
    sharding_types: list[ShardingTypeName] | None = None
    """Allowed sharding types; unset: any."""
    compute_kernels: list[ComputeKernelName] | None = None
    """Allowed compute kernels; unset: any."""

    def __post_init__(self) -> None:
        if self.rows <= 0 or self.dim <= 0 or self.pooling_factor <= 0:
            raise ConfigError(f"table '{self.name}': rows, dim and pooling_factor must be > 0")


@dataclass(kw_only=True)
class TableList:
    """The ``tables:`` of a table list file."""

    tables: list[TableSpec] = field(default_factory=list)
    """Tables to plan."""


def read_tables(path: Path) -> list[TableSpec]:
    """Reads a YAML or CSV table list, with errors naming the file and the row."""
    if not path.is_file():
        raise ConfigError(f"--tables: file '{path}' does not exist")
    if path.suffix.lower() == ".csv":
        return [_csv_row(path, i, row) for i, row in enumerate(csv.DictReader(path.open()), start=2)]
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "tables" not in data:
        raise ConfigError(f"--tables: '{path}' must hold a mapping with a 'tables:' list (or be a .csv file)")
    specs = build(TableList, data, key="").tables
    if not specs:
        raise ConfigError(f"--tables: '{path}' lists no tables")
    return specs


def _csv_row(path: Path, line: int, row: dict[str, str]) -> TableSpec:
    missing = [c for c in ("name", "rows", "dim") if not row.get(c)]
    if missing:
        raise ConfigError(f"--tables: '{path}' line {line}: column '{missing[0]}' is empty; columns are name, rows, dim[, pooling_factor, sharding_types, compute_kernels]")
    data: dict[str, Any] = {"name": row["name"]}
    try:
        data["rows"], data["dim"] = int(row["rows"]), int(row["dim"])
        if row.get("pooling_factor"):
            data["pooling_factor"] = float(row["pooling_factor"])
    except ValueError as e:
        raise ConfigError(f"--tables: '{path}' line {line}: {e}") from e
    for key in ("sharding_types", "compute_kernels"):
        if row.get(key):
            data[key] = row[key].split("|")
    return convert(TableSpec, data, key=f"--tables {path} line {line}")


def tables_model(specs: list[TableSpec]) -> nn.Module:
    """A meta-device module holding one EmbeddingBagCollection over the tables, with the sparse optimizer fused."""
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=t.name, num_embeddings=t.rows, embedding_dim=t.dim, feature_names=[t.name]) for t in specs],
        device=torch.device("meta"),
    )
    module = nn.ModuleDict({"ebc": ebc})
    fuse_sparse_optimizer(module, SparseOptimizerConfig())
    return module


def tables_sharding(specs: list[TableSpec]) -> ShardingConfig:
    """The per-table constraints a table list carries."""
    return ShardingConfig(
        tables={
            t.name: TableConstraint(sharding_types=t.sharding_types, compute_kernels=t.compute_kernels)
            for t in specs
            if t.sharding_types or t.compute_kernels
        }
    )


def pooling_factors(specs: list[TableSpec]) -> dict[str, float]:
    """Average ids per sample per table."""
    return {t.name: t.pooling_factor for t in specs}
