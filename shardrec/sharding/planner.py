"""One way to shard: (model, topology, constraints) -> plan, and a plan -> a readable table and JSON."""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, get_args

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    Partitioner,
    Proposer,
    PlannerError,
    ShardingOption,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.types import CacheParams, ModuleSharder, ParameterSharding, ShardingPlan
from torchrec.modules.embedding_configs import DataType

from shardrec.errors import ConfigError, PlanError
from shardrec.models.layers.embedding import table_configs
from shardrec.output import text_table, write_atomic
from shardrec.sharding.config import ComputeKernelName, ShardingConfig, ShardingTypeName, TableConstraint
from shardrec.sharding.sharders import default_sharders
from shardrec.sharding.topology import GiB, TopologyConfig

KNOWN_NOISE_WARNING = r"HeuristicalStorageReservation is known to cause issues"
"""torchrec's FutureWarning, issued once per planner (so once per candidate plan)."""
KNOWN_NOISE_LOG = "There is a known issue with TorchRec's dense tensor size calculation in dry run"
"""torchrec's log warning about dense-size estimates on meta models, issued once per plan."""


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return KNOWN_NOISE_LOG not in record.getMessage()


@contextmanager
def known_planner_noise_hidden(hidden: bool = True) -> Iterator[None]:
    """Hides torchrec's two known, repeated planner warnings (matched by category and text; every
    other warning still shows); ``hidden=False`` (``shardrec plan -v``) leaves them all."""
    if not hidden:
        yield
        return
    log, drop = logging.getLogger("torchrec.distributed.planner.storage_reservations"), _DropKnownNoise()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=KNOWN_NOISE_WARNING, category=FutureWarning)
        log.addFilter(drop)
        try:
            yield
        finally:
            log.removeFilter(drop)


@dataclass(frozen=True)
class TopologySpec:
    """The devices a plan is made for. Bandwidths in bytes/s; None: torchrec's default."""

    world_size: int
    local_world_size: int
    compute_device: str
    memory_per_device_bytes: int
    """HBM per device on cuda; host memory per rank on cpu."""
    ddr_per_rank_bytes: int | None = None
    hbm_bw: float | None = None
    ddr_bw: float | None = None
    hbm_to_ddr_bw: float | None = None
    intra_node_bw: float | None = None
    inter_node_bw: float | None = None
    batch_size_per_rank: int = 512
    device_name: str = "local"


def from_topology_config(cfg: TopologyConfig) -> TopologySpec:
    """The TopologySpec of a hypothetical cluster (``--topology 4x8xH100`` or YAML)."""
    d = cfg.spec()
    ddr_per_rank = int(d.ddr_gib_per_node * GiB / cfg.devices_per_node)
    memory = int(d.hbm_gib * GiB) if d.compute_device == "cuda" else ddr_per_rank
    return TopologySpec(
        world_size=cfg.world_size,
        local_world_size=cfg.devices_per_node,
        compute_device=d.compute_device,
        memory_per_device_bytes=memory,
        ddr_per_rank_bytes=ddr_per_rank,
        hbm_bw=d.hbm_bw_gbs * 1e9 or None,
        ddr_bw=d.ddr_bw_gbs * 1e9 / cfg.devices_per_node,
        hbm_to_ddr_bw=d.hbm_to_ddr_gbs * 1e9,
        intra_node_bw=d.intra_node_gbs * 1e9,
        inter_node_bw=d.inter_node_gbs * 1e9,
        batch_size_per_rank=cfg.batch_size_per_rank,
        device_name=f"{cfg.nodes}x{cfg.devices_per_node}x{cfg.device}",
    )


def resolve_compute_device(cfg: ShardingConfig) -> str:
    """``cfg.compute_device`` with auto resolved to cuda or cpu."""
    if cfg.compute_device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.compute_device


def topology_spec(cfg: ShardingConfig, *, world_size: int, local_world_size: int, batch_size: int = 512) -> TopologySpec:
    """Topology from the job (device, memory) and the launch (world size, ranks per node)."""
    device = resolve_compute_device(cfg)
    if cfg.memory_per_device_gb is not None:
        memory = int(cfg.memory_per_device_gb * GiB)
    elif device == "cuda":
        memory = torch.cuda.get_device_properties(0).total_memory
    else:
        # Ranks on one host share its memory.
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local_world_size, 1)
    return TopologySpec(world_size, local_world_size, device, memory, batch_size_per_rank=batch_size)


def torchrec_topology(spec: TopologySpec) -> Topology:
    """torchrec Topology of ``spec``; on CPU the planner fills host memory (its 'ddr')."""
    per_ms = 1e-3  # torchrec counts bandwidth in bytes/ms
    memory = spec.memory_per_device_bytes
    if spec.compute_device == "cuda":
        caps: dict[str, Any] = {"hbm_cap_bytes": memory, "ddr_cap_bytes": spec.ddr_per_rank_bytes}
    else:
        caps = {"ddr_cap_bytes": memory}
    bandwidths = {
        "hbm_mem_bw": spec.hbm_bw,
        "ddr_mem_bw": spec.ddr_bw,
        "hbm_to_ddr_mem_bw": spec.hbm_to_ddr_bw,
        "intra_host_bw": spec.intra_node_bw,
        "inter_host_bw": spec.inter_node_bw,
    }
    hardware = HardwareConfig(
        **{k: v for k, v in caps.items() if v is not None},
        **{k: v * per_ms for k, v in bandwidths.items() if v is not None},
    )
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=spec.world_size, local_world_size=spec.local_world_size),
        hardware_config=hardware,
        kernel_config=KernelConfig(compute_device=spec.compute_device, use_hardware_based_bandwidth=True),
    )


def constraints(
    cfg: ShardingConfig, tables: list[str], pooling: dict[str, float] | None = None, half: Collection[str] = ()
) -> dict[str, ParameterConstraints]:
    """torchrec ParameterConstraints for every table, from the job's sharding section.

    ``pooling`` gives average ids per sample per table (1 when not given); ``half`` names the fp16
    tables, which only fused kernels may hold (:func:`fp16_choices`).
    """
    cfg.check_tables(tables)
    out = {}
    for table in tables:
        c = cfg.constraint_for(table)
        kwargs: dict[str, Any] = {}
        if pooling and table in pooling:
            kwargs["pooling_factors"] = [pooling[table]]
        if c.sharding_types is not None:
            kwargs["sharding_types"] = list(c.sharding_types)
        if c.compute_kernels is not None:
            kwargs["compute_kernels"] = list(c.compute_kernels)
        if table in half:
            kwargs.update(fp16_choices(table, c))
        if c.min_partition is not None:
            kwargs["min_partition"] = c.min_partition
        if c.cache_load_factor is not None:
            kwargs["cache_params"] = CacheParams(load_factor=c.cache_load_factor)
        out[table] = ParameterConstraints(**kwargs)
    return out


def half_tables(model: nn.Module) -> set[str]:
    """The tables of ``model`` stored in fp16."""
    return {c.name for c in table_configs(model) if c.data_type == DataType.FP16}


def fp16_choices(table: str, c: TableConstraint) -> dict[str, list[str]]:
    """The sharding types and kernels an fp16 table may have under constraint ``c``: not
    data_parallel and not the dense kernel. Those train the table with the dense optimizer,
    which updates fp16 weights in place without an fp32 master copy (Adam's eps underflows to 0 in
    fp16: the loss turns NaN within 50 steps); the fused kernels keep the optimizer state in fp32
    (and, on CUDA, round each update stochastically).

    Raises:
        ConfigError: the constraint allows nothing else.
    """
    types = [t for t in (c.sharding_types or get_args(ShardingTypeName)) if t != "data_parallel"]
    kernels = [k for k in (c.compute_kernels or get_args(ComputeKernelName)) if k != "dense"]
    if not types or not kernels:
        key = "sharding_types: [data_parallel]" if not types else "compute_kernels: [dense]"
        raise ConfigError(f"table '{table}' is fp16, but sharding.tables.{table} (or sharding.default) allows only {key}, which "
                          "trains it with the dense optimizer (no fp32 master weights); allow a sharded type with a fused kernel, "
                          f"or set features.tables '{table}' precision: fp32")
    return {"sharding_types": types, "compute_kernels": kernels}


EstimateCache = dict[tuple[Any, ...], tuple[list[tuple[Any, Any]], Any]]
"""Estimates of sharding options already seen: (table, type, kernel, shards, constraint) -> per
shard (perf, storage), and the option's is_weighted."""


class SharedEstimateEnumerator(EmbeddingEnumerator):
    """torchrec's enumerator, estimating each distinct sharding option once across plans.

    A candidate plan differs from another only in the options it allows (sharding types, column
    shard widths); an option's perf and storage estimates depend only on the option itself and on
    its table's constraint, which the cache key holds. On 1,000 tables x 32 ranks the estimates are
    ~80% of a plan's time, so the candidates after the first cost mostly partitioning.
    """

    def __init__(self, *, cache: EstimateCache, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cache = cache

    def _key(self, option: ShardingOption) -> tuple[Any, ...]:
        c = (self._constraints or {}).get(option.name)
        # What of the constraint reaches the estimators; sharding types and min_partition act
        # through the option's type and shards, which the key holds.
        constraint = None if c is None else (
            tuple(c.pooling_factors), tuple(c.num_poolings or ()), tuple(c.batch_sizes or ()), repr(c.cache_params),
            repr(c.key_value_params), c.use_virtual_table, c.enforce_hbm,
        )
        shards = tuple((tuple(s.size), tuple(s.offset)) for s in option.shards)
        return (option.path, option.name, option.sharding_type, option.compute_kernel, shards, option.cache_load_factor,
                tuple(option.input_lengths), option.batch_size, constraint)

    def populate_estimates(self, sharding_options: list[ShardingOption]) -> None:
        keys = [self._key(o) for o in sharding_options]
        misses = [o for o, k in zip(sharding_options, keys) if k not in self._cache]
        super().populate_estimates(misses)
        for option, key in zip(sharding_options, keys):
            if key in self._cache:
                per_shard, weighted = self._cache[key]
                for shard, (perf, storage) in zip(option.shards, per_shard):
                    shard.perf, shard.storage = copy.copy(perf), copy.copy(storage)
                option.is_weighted = weighted
            else:
                self._cache[key] = ([(copy.copy(s.perf), copy.copy(s.storage)) for s in option.shards], option.is_weighted)


@dataclass(frozen=True)
class PlanResult:
    """A plan and the planner's chosen sharding options (shards with storage and perf estimates).

    In a collective plan only rank 0 holds the options.
    """

    plan: ShardingPlan
    options: list[ShardingOption]


def make_plan(
    model: nn.Module,
    *,
    cfg: ShardingConfig,
    tables: dict[str, tuple[int, int]],
    topology: TopologySpec,
    pg: dist.ProcessGroup | None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    pooling: dict[str, float] | None = None,
    partitioner: Partitioner | None = None,
    proposer: Proposer | None = None,
    estimates: EstimateCache | None = None,
) -> PlanResult:
    """Plans ``model`` (built on the meta device) for ``topology``; collective when ``pg`` is given.

    ``tables`` maps every table of the model to (rows, dim). ``estimates`` (shared by plans of the
    same model, topology and pooling) reuses the estimates of options an earlier plan saw.
    """
    torchrec_topo = torchrec_topology(topology)
    half = half_tables(model)
    table_constraints = constraints(cfg, list(tables), pooling, half=half)
    enumerator = None
    if estimates is not None:
        enumerator = SharedEstimateEnumerator(
            cache=estimates, topology=torchrec_topo, batch_size=topology.batch_size_per_rank, constraints=table_constraints
        )
    planner = EmbeddingShardingPlanner(
        topology=torchrec_topo,
        batch_size=topology.batch_size_per_rank,
        constraints=table_constraints,
        **({"enumerator": enumerator} if enumerator is not None else {}),
        storage_reservation=HeuristicalStorageReservation(percentage=cfg.storage_reservation),
        **({"partitioner": partitioner} if partitioner is not None else {}),
        **({"proposer": proposer} if proposer is not None else {}),
    )
    sharders = sharders or default_sharders()
    try:
        plan = planner.collective_plan(model, sharders, pg) if pg is not None else planner.plan(model, sharders)
        return PlanResult(plan=plan, options=list(planner._best_plan or []))  # noqa: SLF001 - no public getter
    except PlannerError as e:
        raise PlanError(_plan_failure(e, tables, topology, half=half)) from e
    except RuntimeError as e:
        # torchrec raises a bare RuntimeError when constraints leave a table no option at all.
        raise PlanError(
            f"the sharding constraints leave some table no valid (sharding type, compute kernel) pair on "
            f"{topology.compute_device}: {e}\n  fix: widen sharding.default or sharding.tables.<name>; "
            "fused_uvm kernels need cuda, and row-wise types need a fused kernel"
        ) from e


def _plan_failure(error: PlannerError, tables: dict[str, tuple[int, int]], topology: TopologySpec, *,
                  half: Collection[str] = ()) -> str:
    weights = {name: rows * dim * (2 if name in half else 4) for name, (rows, dim) in tables.items()}
    by_size = sorted(weights.items(), key=lambda kv: kv[1], reverse=True)[:5]
    sizes = ", ".join(f"{name} ({_gib(n)})" for name, n in by_size)
    total = sum(weights.values())
    return (
        f"no sharding plan fits: {error}\n"
        f"  largest tables: {sizes}; all tables need {_gib(total)} of weights before optimizer state\n"
        f"  available: {topology.world_size} x {_gib(topology.memory_per_device_bytes)} ({topology.compute_device})\n"
        "  options: more devices; UVM caching on cuda (compute_kernels: [fused_uvm_caching], tables stay in host "
        "memory with a device cache); allow row_wise/table_row_wise/column_wise under sharding.default.sharding_types; "
        "raise sharding.memory_per_device_gb; features.table_precision: fp16 (half the weight bytes); or smaller "
        "num_embeddings/embedding_dim"
    )


def _gib(n: int) -> str:
    return f"{n / GiB:.3g} GiB"


def plan_rows(plan: ShardingPlan, tables: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """One record per sharded table: name, shape, sharding type, kernel, ranks, shards."""
    rows = []
    for module_path, module_plan in plan.plan.items():
        for param, ps in module_plan.items():  # type: ignore[union-attr]
            shape = tables.get(param, (None, None))
            rows.append(
                {
                    "module": module_path,
                    "table": param,
                    "rows": shape[0],
                    "dim": shape[1],
                    "sharding_type": ps.sharding_type,
                    "compute_kernel": ps.compute_kernel,
                    "ranks": list(ps.ranks or []),
                    "shards": _shards(ps),
                }
            )
    return rows


def _shards(ps: ParameterSharding) -> list[dict[str, Any]]:
    spec = ps.sharding_spec
    if spec is None:
        return []
    return [
        {"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes), "placement": str(s.placement)}
        for s in spec.shards  # type: ignore[attr-defined]
    ]


def format_plan(rows: list[dict[str, Any]]) -> str:
    """The plan as a fixed-width text table, one line per table (a model without tables says so)."""
    if not rows:
        return "(no embedding tables: every parameter is dense, replicated on each rank)"
    header = ("table", "rows x dim", "sharding", "kernel", "ranks", "shard shapes")
    lines = [
        (
            r["table"],
            f"{r['rows']} x {r['dim']}",
            r["sharding_type"],
            r["compute_kernel"],
            ",".join(map(str, r["ranks"])) or "all",
            " ".join("x".join(map(str, s["sizes"])) for s in r["shards"]) or "replicated",
        )
        for r in rows
    ]
    return text_table(header, lines)


def save_plan(rows: list[dict[str, Any]], topology: TopologySpec, path: Path) -> None:
    """Writes the plan as JSON, atomically."""
    write_atomic(path, json.dumps({"topology": topology.__dict__, "tables": rows}, indent=2) + "\n")
