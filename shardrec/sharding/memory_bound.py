"""A memory lower bound checked before the planner searches: an impossible model fails in seconds.

torchrec's planner enumerates every (table, sharding type, kernel) option and partitions them;
with a thousand tables that do not fit it searches for many minutes before it gives up. No plan
can need less than each table's weights (2 bytes a weight in fp16) plus its fused optimizer state, spread over every byte of
the cluster's usable memory: HBM less the storage reservation on cuda (plus host DDR where UVM
kernels are allowed), host memory on cpu, and each rank also holds the dense (replicated) part.
When even that does not fit, no search can succeed, and the report says by how much, how many
hosts of the same kind would be needed and what would help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from shardrec.errors import PlanError
from shardrec.sharding.config import ShardingConfig
from shardrec.sharding.planner import TopologySpec, half_tables
from shardrec.sharding.topology import GiB

FP32 = 4
FP16 = 2
UVM_KERNELS = {"fused_uvm", "fused_uvm_caching"}


@dataclass(frozen=True)
class MemoryBound:
    """The least memory any plan needs, against what the topology offers."""

    tables_bytes: int
    """Every table's weights plus fused optimizer state."""
    dense_bytes: int
    """The replicated dense part, held by every rank."""
    hbm_bytes: int
    """Usable HBM over all ranks (0 on cpu)."""
    ddr_bytes: int
    """Host memory tables may use over all ranks: all of it on cpu, with UVM kernels on cuda."""
    per_host_bytes: int
    """What one host of this kind offers the tables."""
    hosts: int
    """Hosts in the topology."""
    ranks: int
    """Ranks in the topology."""
    largest: list[tuple[str, int]]
    """The five largest tables with their bytes."""

    @property
    def needed_bytes(self) -> int:
        return self.tables_bytes + self.dense_bytes * self.ranks

    @property
    def capacity_bytes(self) -> int:
        return self.hbm_bytes + self.ddr_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.capacity_bytes


def optimizer_state_bytes(optimizer: type | None, rows: int, dim: int) -> int:
    """Bytes of fused optimizer state of one table: per row (row-wise Adagrad), per weight (Adagrad), two per weight (Adam)."""
    name = optimizer.__name__ if optimizer is not None else "SGD"
    if name == "RowWiseAdagrad":
        return rows * FP32
    if name == "Adagrad":
        return rows * dim * FP32
    if name in ("Adam", "AdamW"):
        return 2 * rows * dim * FP32
    return 0


def fused_optimizer(model: nn.Module) -> type | None:
    """The optimizer class fused into the model's embedding tables (shardrec fuses one for all)."""
    for m in model.modules():
        if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)):
            for p in m.parameters():
                classes = getattr(p, "_optimizer_classes", None)
                if classes:
                    return classes[0]
    return None


def dense_bytes(model: nn.Module) -> int:
    """Bytes of the parameters outside embedding collections (replicated on every rank)."""
    embedding = {id(p) for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)) for p in m.parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embedding)


def memory_bound(model: nn.Module, *, tables: dict[str, tuple[int, int]], topology: TopologySpec, cfg: ShardingConfig) -> MemoryBound:
    """The bound for ``model`` (on meta, optimizer fused) with ``tables`` on ``topology``."""
    optimizer = fused_optimizer(model)
    half = half_tables(model)  # fp16 weights: 2 bytes each; the fused optimizer's state stays fp32
    sizes = {name: rows * dim * (FP16 if name in half else FP32) + optimizer_state_bytes(optimizer, rows, dim)
             for name, (rows, dim) in tables.items()}
    world, local = topology.world_size, topology.local_world_size
    if topology.compute_device == "cuda":
        hbm = int(topology.memory_per_device_bytes * (1 - cfg.storage_reservation))
        uvm = all(_uvm_allowed(cfg, t) for t in tables) and topology.ddr_per_rank_bytes is not None
        ddr = (topology.ddr_per_rank_bytes or 0) if uvm else 0
    else:
        hbm, ddr = 0, topology.memory_per_device_bytes
    hosts = max(1, math.ceil(world / max(local, 1)))
    largest = sorted(sizes.items(), key=lambda kv: kv[1], reverse=True)[:5]
    bound = MemoryBound(
        tables_bytes=sum(sizes.values()), dense_bytes=dense_bytes(model), hbm_bytes=hbm * world, ddr_bytes=ddr * world,
        per_host_bytes=(hbm + ddr) * local, hosts=hosts, ranks=world, largest=largest,
    )
    return bound


def _uvm_allowed(cfg: ShardingConfig, table: str) -> bool:
    kernels = cfg.constraint_for(table).compute_kernels
    return kernels is None or bool(UVM_KERNELS & set(kernels))


def check_memory_bound(bound: MemoryBound, *, topology: TopologySpec) -> None:
    """Raises a PlanError with the report when no plan can fit; returns silently otherwise."""
    if bound.fits:
        return
    raise PlanError(describe_shortfall(bound, topology=topology))


def describe_shortfall(bound: MemoryBound, *, topology: TopologySpec) -> str:
    """The report of an impossible model: needed vs offered per memory kind, hosts needed, what helps."""
    ranks, local = bound.ranks, max(topology.local_world_size, 1)
    for_tables = bound.per_host_bytes - bound.dense_bytes * local
    hosts = math.ceil(bound.tables_bytes / for_tables) if for_tables > 0 else None
    largest = ", ".join(f"{name} ({_gib(b)})" for name, b in bound.largest)
    kinds = f"HBM {_gib(bound.hbm_bytes)} + host DDR {_gib(bound.ddr_bytes)}" if topology.compute_device == "cuda" else f"host memory {_gib(bound.ddr_bytes)}"
    return (
        f"no sharding plan fits on {topology.device_name} ({ranks} ranks), whatever the search: the tables alone need at least "
        f"{_gib(bound.tables_bytes)} (weights and fused optimizer state) plus {_gib(bound.dense_bytes)} of dense "
        f"parameters per rank, {_gib(bound.needed_bytes)} in all, but the topology offers {kinds} = {_gib(bound.capacity_bytes)}"
        f" (checked before searching)\n"
        f"  hosts of this kind needed: at least {hosts if hosts is not None else 'none would do: the dense part alone fills a rank'}"
        f" (have {bound.hosts})\n"
        f"  largest tables: {largest}\n"
        "  options: more hosts; UVM caching on cuda (compute_kernels: [fused_uvm_caching]) so tables live in host "
        "memory; fp16 or int8 tables; a per-row optimizer (rowwise_adagrad) instead of adagrad/adam; smaller "
        "num_embeddings (hashing) or embedding_dim"
    )


def _gib(n: float) -> str:
    return f"{n / GiB:,.4g} GiB"

