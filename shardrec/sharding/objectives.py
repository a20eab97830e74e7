"""Planning objectives: perf, memory or balanced, chosen among candidate plans by their estimates.

torchrec's default planner minimizes the estimated step time of the critical device. With tables
of very different sizes it puts each huge table whole on one device: MLPerf's 40M-row tables on
4x8 H100 leave the fullest device at ~6x the mean memory, so a slightly bigger model no longer
fits while most of the cluster stays empty.

Here the planner is run for candidates that differ in how tables may be split and placed:

- ``default``: torchrec as it is (greedy by perf, any sharding type);
- ``cw<S>/<B>``: every table column-wise in shards of at least S columns, the *big* ones (over
  half of a device's fair share of all table bytes) in shards of at least B columns; shards
  placed greedily by perf (``greedy``) or by torchrec's memory-balanced partitioner within 10% of
  the greedy perf (``mem``). Column shards spread both memory and the output all-to-all, which
  dominates the estimated step, so one plan can be both faster and more even than the default.

Each candidate is judged by the same estimates the report shows (critical device's step time,
fullest device's memory over the mean). ``perf`` takes the fastest, ``memory`` the most even, and
``balanced`` the fastest plan within 10% of the default's step time whose fullest device holds at
most 1.25x the mean memory (else the most even within that time; docs/planning.md).
Tables the job constrains itself are left as the job says.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch.distributed as dist
from torch import nn
from torchrec.distributed.planner.partitioners import MemoryBalancedPartitioner
from torchrec.distributed.planner.types import Proposer, ShardingOption
from torchrec.distributed.types import ModuleSharder

from shardrec.errors import PlanError
from shardrec.sharding.memory_bound import check_memory_bound, memory_bound
from shardrec.sharding.config import ShardingConfig, TableConstraint
from shardrec.sharding.planner import EstimateCache, PlanResult, TopologySpec, make_plan
from shardrec.sharding.report import PlanReport, build_report

Objective = Literal["default", "perf", "memory", "balanced"]
STEP_TOLERANCE = 1.10
"""balanced: the step time a more even plan may cost, relative to torchrec's default plan."""
BALANCE_TARGET = 1.25
"""balanced: fullest device's memory over the mean that counts as even; the fastest such plan wins."""


class BestPerTableProposer(Proposer):
    """Proposes one plan: for each table, its option with the lowest estimated perf.

    The candidates constrain every table to a few options already, so torchrec's greedy proposers
    (hundreds of proposals, one partitioning each) would only spend minutes on large models.
    """

    def __init__(self) -> None:
        self._proposal: list[ShardingOption] | None = None

    def load(self, search_space: list[ShardingOption], enumerator: Any = None) -> None:
        best: dict[str, ShardingOption] = {}
        for option in search_space:
            if option.fqn not in best or option.total_perf < best[option.fqn].total_perf:
                best[option.fqn] = option
        self._proposal = list(best.values())

    def propose(self) -> list[ShardingOption] | None:
        return self._proposal

    def feedback(self, partitionable: bool, plan: Any = None, perf_rating: Any = None, storage_constraint: Any = None) -> None:
        self._proposal = None


@dataclass(frozen=True)
class Candidate:
    """Column-shard widths for all and for big tables (None: torchrec's choice), and the partitioner."""

    name: str
    min_partition: int | None
    big_min_partition: int | None
    memory_balanced: bool


@dataclass
class Outcome:
    """A candidate's plan and report (None: that candidate found no plan)."""

    candidate: Candidate
    result: PlanResult | None
    report: PlanReport | None
    seconds: float
    error: str | None = None


_SPLITS = ((64, 64), (64, 16), (32, 32), (32, 16), (32, 4), (16, 16), (16, 4))
_GREEDY_TOO = {(64, 64), (32, 32), (32, 16)}
DEFAULT_BUDGET = 20_000
"""torchrec's default planner is a candidate when tables x ranks is at most this (it takes
minutes beyond); ``shardrec plan --with-default`` includes it regardless."""


def candidates(*, with_default: bool = True) -> list[Candidate]:
    """The candidates tried: torchrec's default, then column-wise splits (memory-balanced, and a
    few greedy ones, which were never better elsewhere)."""
    out = [Candidate("default", None, None, False)] if with_default else []
    for small, big in _SPLITS:
        if (small, big) in _GREEDY_TOO:
            out.append(Candidate(f"cw{small}/{big}-greedy", small, big, False))
        out.append(Candidate(f"cw{small}/{big}-mem", small, big, True))
    return out


def big_tables(tables: dict[str, tuple[int, int]], world_size: int) -> set[str]:
    """Tables over half of a device's fair share of all table bytes."""
    sizes = {n: r * d for n, (r, d) in tables.items()}
    share = sum(sizes.values()) / world_size
    return {n for n, s in sizes.items() if s > share / 2}


def free_tables(cfg: ShardingConfig, tables: dict[str, tuple[int, int]]) -> list[str]:
    """Tables the job leaves to the planner: none when ``sharding.default`` constrains every table."""
    if cfg.default.sharding_types is not None or cfg.default.compute_kernels is not None:
        return []
    return sorted(n for n in tables if n not in cfg.tables)


def _config(cfg: ShardingConfig, candidate: Candidate, free: list[str], big: set[str]) -> ShardingConfig:
    if candidate.min_partition is None:
        return cfg
    split = {
        n: TableConstraint(
            sharding_types=["column_wise"], min_partition=candidate.big_min_partition if n in big else candidate.min_partition
        )
        for n in free
    }
    return dataclasses.replace(cfg, tables={**cfg.tables, **split})


def try_candidate(
    candidate: Candidate,
    model: nn.Module,
    *,
    cfg: ShardingConfig,
    tables: dict[str, tuple[int, int]],
    topology: TopologySpec,
    free: list[str],
    pooling: dict[str, float] | None,
    sharders: list[ModuleSharder[nn.Module]] | None,
    estimates: EstimateCache | None = None,
) -> Outcome:
    """Plans one candidate (in this process only) and reports it; ``estimates`` is shared by the
    candidates of one search."""
    start = time.perf_counter()
    big = big_tables(tables, topology.world_size)
    try:
        result = make_plan(
            model, cfg=_config(cfg, candidate, free, big), tables=tables, topology=topology, pg=None, sharders=sharders,
            pooling=pooling, partitioner=MemoryBalancedPartitioner(tolerance=0.1) if candidate.memory_balanced else None,
            proposer=None if candidate.min_partition is None else BestPerTableProposer(), estimates=estimates,
        )
    except PlanError as e:
        return Outcome(candidate, None, None, time.perf_counter() - start, error=str(e))
    return Outcome(candidate, result, build_report(result.options, topology), time.perf_counter() - start)


def choose(outcomes: list[Outcome], objective: Objective) -> Outcome:
    """The outcome ``objective`` prefers; raises the default's PlanError when none found a plan."""
    ok = [o for o in outcomes if o.report is not None]
    if not ok:
        raise PlanError(outcomes[0].error or "no candidate found a plan")
    default = next((o for o in ok if o.candidate.name == "default"), None)
    if objective == "default" and default is not None:
        return default
    step = lambda o: o.report.summary()["est_step_ms"]  # noqa: E731
    balance = lambda o: o.report.max_over_mean_memory  # noqa: E731
    if objective == "perf":
        return min(ok, key=lambda o: (round(step(o), 6), balance(o)))
    if objective == "memory":
        return min(ok, key=lambda o: (round(balance(o), 3), step(o)))
    # The reference is the default's step, or the fastest candidate's when the default was not planned.
    reference = step(default) if default is not None else min(step(o) for o in ok)
    within = [o for o in ok if step(o) <= reference * STEP_TOLERANCE] or ok
    even = [o for o in within if balance(o) <= BALANCE_TARGET]
    if even:
        return min(even, key=lambda o: (round(step(o), 6), balance(o)))
    return min(within, key=lambda o: (round(balance(o), 2), step(o)))


def plan_for_objective(
    model: nn.Module,
    *,
    cfg: ShardingConfig,
    tables: dict[str, tuple[int, int]],
    topology: TopologySpec,
    objective: Objective,
    pooling: dict[str, float] | None = None,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    with_default: bool = False,
) -> tuple[Outcome, list[Outcome]]:
    """Plans every candidate and returns the chosen outcome and all of them."""
    free = free_tables(cfg, tables)
    with_default = with_default or objective == "default" or len(tables) * topology.world_size <= DEFAULT_BUDGET
    todo = candidates(with_default=with_default) if free and objective != "default" else candidates()[:1]
    check_memory_bound(memory_bound(model, tables=tables, topology=topology, cfg=cfg), topology=topology)
    start, outcomes, estimates = time.perf_counter(), [], {}
    for c in todo:
        spent = time.perf_counter() - start
        if spent > cfg.search_seconds and any(o.report is not None for o in outcomes):
            outcomes.append(Outcome(c, None, None, 0.0, error=f"not tried: sharding.search_seconds={cfg.search_seconds:g} "
                                    f"spent ({spent:.0f} s); raise it to search further"))
            continue
        outcomes.append(try_candidate(c, model, cfg=cfg, tables=tables, topology=topology, free=free, pooling=pooling,
                                      sharders=sharders, estimates=estimates))
    return choose(outcomes, objective), outcomes


def collective_plan_for_objective(model: nn.Module, *, pg: dist.ProcessGroup, **kwargs: object) -> PlanResult:
    """:func:`plan_for_objective` on rank 0, its plan broadcast to every rank of ``pg``."""
    box: list[object] = [None]
    if dist.get_rank(pg) == 0:
        try:
            chosen, _ = plan_for_objective(model, **kwargs)  # type: ignore[arg-type]
            box[0] = chosen.result
        except PlanError as e:  # every rank must leave the broadcast, then all raise
            box[0] = e
    dist.broadcast_object_list(box, src=0, group=pg)
    if isinstance(box[0], PlanError):
        raise box[0]
    return box[0]  # type: ignore[return-value]
