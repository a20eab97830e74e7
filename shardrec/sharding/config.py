"""Config of the sharding section of a job: topology overrides and per-table constraints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shardrec.errors import ConfigError

ShardingTypeName = Literal[
    "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel"
]
ComputeKernelName = Literal["fused", "dense", "fused_uvm", "fused_uvm_caching"]


@dataclass(kw_only=True)
class TableConstraint:
    """What the planner may choose for one table."""

    sharding_types: list[ShardingTypeName] | None = None
    """Allowed sharding types; unset: any the sharder offers."""
    compute_kernels: list[ComputeKernelName] | None = None
    """Allowed compute kernels; unset: any the sharder offers on the compute device."""
    min_partition: int | None = None
    """Smallest column-shard width for column-wise sharding."""
    cache_load_factor: float | None = None
    """fused_uvm_caching: the fraction of the table's rows cached in device memory (e.g. 0.2)."""

    def check(self, key: str) -> None:
        """Raises a ConfigError naming ``key`` if a list is empty."""
        for name in ("sharding_types", "compute_kernels"):
            if getattr(self, name) == []:
                raise ConfigError(f"'{key}.{name}' must list at least one choice, or be left unset")
        if self.cache_load_factor is not None and not 0 < self.cache_load_factor <= 1:
            raise ConfigError(f"'{key}.cache_load_factor' must be in (0, 1], got {self.cache_load_factor}")


@dataclass(kw_only=True)
class ShardingConfig:
    """How tables are placed on devices."""

    compute_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device the ranks compute on; auto: cuda when available, else cpu."""
    memory_per_device_gb: float | None = None
    """Memory the planner may fill on each device (HBM on cuda, host memory on cpu); unset: detected."""
    storage_reservation: float = 0.15
    """Fraction of each GPU's HBM kept free for dense parameters, activations and buffers (torchrec
    applies it to HBM only; on cpu, lower memory_per_device_gb instead)."""
    default: TableConstraint = field(default_factory=TableConstraint)
    """Constraint for every table not named under ``tables``."""
    tables: dict[str, TableConstraint] = field(default_factory=dict)
    """Per-table constraints, keyed by table name (DeepFM and WideDeep add ``<table>_linear`` tables)."""
    plan: str | None = None
    """A plan file from ``shardrec plan --out``: train with exactly that plan instead of planning."""
    search_seconds: float = 30.0
    """Time budget of the planner's search over candidate settings: once spent, the best plan found so
    far is used and the candidates left are reported as not tried (each candidate runs to its end)."""
    objective: Literal["balanced", "perf", "memory", "default"] = "balanced"
    """What the planner optimizes among its candidates (shardrec/sharding/objectives.py); default:
    torchrec's planner alone."""

    def __post_init__(self) -> None:
        if self.memory_per_device_gb is not None and self.memory_per_device_gb <= 0:
            raise ConfigError(f"sharding.memory_per_device_gb must be > 0, got {self.memory_per_device_gb}")
        if self.search_seconds <= 0:
            raise ConfigError(f"sharding.search_seconds must be > 0, got {self.search_seconds}")
        if not 0 <= self.storage_reservation < 1:
            raise ConfigError(f"sharding.storage_reservation must be in [0, 1), got {self.storage_reservation}")
        self.default.check("sharding.default")
        for name, constraint in self.tables.items():
            constraint.check(f"sharding.tables.{name}")

    def constraint_for(self, table: str) -> TableConstraint:
        """The constraint that applies to ``table``."""
        return self.tables.get(table, self.default)

    def check_tables(self, known: list[str]) -> None:
        """Raises a ConfigError if ``tables`` names a table the model does not have."""
        for name in self.tables:
            if name not in known:
                raise ConfigError(
                    f"sharding.tables.{name}: no table '{name}' in features.tables; known tables: {', '.join(known)}"
                )
