"""The candidates of one planner search share their estimates: each distinct sharding option is
estimated once, and the plans equal those of searches that estimate everything themselves."""

from __future__ import annotations


import pytest
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.types import ShardingOption

from shardrec.sharding.objectives import candidates, free_tables, plan_for_objective, try_candidate
from shardrec.sharding.plan_job import PlanInput, input_from_tables
from shardrec.sharding.planner import SharedEstimateEnumerator, TopologySpec, from_topology_config
from shardrec.sharding.topology import parse_topology

# Big tables (one forced row-wise), one forced table-wise, small free ones: every candidate kind.
TABLES = """name,rows,dim,pooling_factor,sharding_types
big0,20000000,128,1,
big1,20000000,128,2,row_wise
t3,100000,64,1,table_wise
t4,50000,64,1,
t5,20000,32,1,
t6,10000,32,3,
t7,1000,16,1,
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> PlanInput:
    path = tmp_path_factory.mktemp("tables") / "tables.csv"
    path.write_text(TABLES)
    return input_from_tables(path)


@pytest.fixture(scope="module")
def h100x16() -> TopologySpec:
    return from_topology_config(parse_topology("2x8xH100"))


def _estimated(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """Records every option torchrec's estimators are run on, keyed as the shared cache keys them."""
    seen: list[tuple[object, ...]] = []
    original = EmbeddingEnumerator.populate_estimates

    def counting(self: EmbeddingEnumerator, options: list[ShardingOption]) -> None:
        seen.extend(SharedEstimateEnumerator._key(self, o) for o in options)
        original(self, options)

    monkeypatch.setattr(EmbeddingEnumerator, "populate_estimates", counting)
    return seen


def test_candidates_estimate_each_distinct_option_once(monkeypatch: pytest.MonkeyPatch, source: PlanInput, h100x16: TopologySpec) -> None:
    seen = _estimated(monkeypatch)
    _, all_outcomes = plan_for_objective(
        source.model, cfg=source.sharding, tables=source.tables, topology=h100x16, objective="balanced", pooling=source.pooling
    )
    assert len(all_outcomes) == len(candidates()) and all(o.report is not None for o in all_outcomes)
    assert seen and len(seen) == len(set(seen))  # every candidate after the first reuses what it can


def test_shared_estimates_give_the_plans_of_independent_searches(source: PlanInput, h100x16: TopologySpec) -> None:
    free, shared = free_tables(source.sharding, source.tables), {}
    for candidate in candidates():
        kwargs = dict(cfg=source.sharding, tables=source.tables, topology=h100x16, free=free, pooling=source.pooling, sharders=None)
        alone = try_candidate(candidate, source.model, **kwargs)
        reused = try_candidate(candidate, source.model, **kwargs, estimates=shared)
        assert reused.result.plan.plan == alone.result.plan.plan, candidate.name
        assert reused.report.summary() == alone.report.summary(), candidate.name
        assert [(s.perf, s.storage) for o in reused.result.options for s in o.shards] == [
            (s.perf, s.storage) for o in alone.result.options for s in o.shards
        ], candidate.name
    assert shared  # the cache was used
