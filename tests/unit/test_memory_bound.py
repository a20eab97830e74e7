"""The planner's memory lower bound (an impossible model fails before any search) and its time budget."""

from __future__ import annotations

import logging
import time
import warnings

import pytest
import torch

from shardrec.config import build
from shardrec.errors import ConfigError, PlanError
from shardrec.sharding import objectives
from shardrec.sharding.config import ShardingConfig, TableConstraint
from shardrec.sharding.memory_bound import memory_bound, optimizer_state_bytes
from shardrec.sharding.objectives import plan_for_objective
from shardrec.sharding.plan_job import TableSpec, tables_model
from shardrec.sharding.planner import TopologySpec, from_topology_config, known_planner_noise_hidden, make_plan
from shardrec.sharding.topology import GiB, parse_topology
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

THOUSAND_HUGE = [TableSpec(name=f"t{i}", rows=20_000_000 + i, dim=128) for i in range(1000)]
"""1,000 tables of ~10 GiB each with row-wise Adagrad: ~10 TiB, more than 2x8xH100 hold even with UVM."""


def _spec(text: str) -> TopologySpec:
    return from_topology_config(parse_topology(text))


def test_an_impossible_thousand_table_model_fails_before_searching(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_search(*_: object, **__: object) -> None:
        raise AssertionError("the planner searched a model that cannot fit")

    monkeypatch.setattr(objectives, "make_plan", no_search)
    model, tables = tables_model(THOUSAND_HUGE), {t.name: (t.rows, t.dim) for t in THOUSAND_HUGE}
    start = time.perf_counter()
    with pytest.raises(PlanError) as info:
        plan_for_objective(model, cfg=ShardingConfig(), tables=tables, topology=_spec("2x8xH100"), objective="balanced")
    assert time.perf_counter() - start < 60  # generous: the point is "no search", not a timing
    message = str(info.value)
    assert message.startswith("no sharding plan fits on 2x8xH100 (16 ranks), whatever the search")
    assert "HBM" in message and "host DDR" in message
    # ~10.4 TiB of tables over (8 x 80 GiB x 0.85 + 2 TiB) per host: at least 4 hosts of this kind.
    assert "hosts of this kind needed: at least 4 (have 2)" in message
    assert "largest tables: t999 (" in message
    assert "options: more hosts; UVM caching" in message and "fp16 or int8" in message


def test_the_bound_counts_weights_optimizer_state_and_memory_kinds() -> None:
    model = tables_model([TableSpec(name="a", rows=1000, dim=16), TableSpec(name="b", rows=10, dim=8)])
    tables = {"a": (1000, 16), "b": (10, 8)}
    h100 = _spec("1x8xH100")
    bound = memory_bound(model, tables=tables, topology=h100, cfg=ShardingConfig())
    assert bound.tables_bytes == (1000 * 16 + 1000 + 10 * 8 + 10) * 4  # weights + one row-wise accumulator per row
    assert bound.hbm_bytes == 8 * int(80 * GiB * 0.85)
    assert bound.ddr_bytes == 8 * int(2048 * GiB / 8)
    assert bound.ranks == 8 and bound.hosts == 1 and bound.fits
    fused_only = ShardingConfig(default=TableConstraint(compute_kernels=["fused"]))
    assert memory_bound(model, tables=tables, topology=h100, cfg=fused_only).ddr_bytes == 0  # no UVM: HBM only
    cpu = TopologySpec(world_size=2, local_world_size=2, compute_device="cpu", memory_per_device_bytes=10_000)
    on_cpu = memory_bound(model, tables=tables, topology=cpu, cfg=ShardingConfig())
    assert on_cpu.hbm_bytes == 0 and on_cpu.ddr_bytes == 20_000 and not on_cpu.fits


@pytest.mark.parametrize("name, expected", [("RowWiseAdagrad", 10 * 4), ("Adagrad", 10 * 8 * 4), ("Adam", 2 * 10 * 8 * 4), ("SGD", 0)])
def test_optimizer_state_per_table(name: str, expected: int) -> None:
    classes = {"RowWiseAdagrad": RowWiseAdagrad, "Adagrad": torch.optim.Adagrad, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}
    assert optimizer_state_bytes(classes[name], 10, 8) == expected


def test_fp16_weights_count_two_bytes_and_their_optimizer_state_four() -> None:
    model = tables_model([TableSpec(name="a", rows=1000, dim=16, precision="fp16"), TableSpec(name="b", rows=10, dim=8)])
    bound = memory_bound(model, tables={"a": (1000, 16), "b": (10, 8)}, topology=_spec("1x8xH100"), cfg=ShardingConfig())
    assert bound.tables_bytes == 1000 * 16 * 2 + 1000 * 4 + (10 * 8 + 10) * 4


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("memory", [500_000, 900_000, 1_600_000, 4_000_000])
def test_the_bound_never_rejects_what_the_planner_places(memory: int, precision: str) -> None:
    specs = [TableSpec(name="big", rows=50_000, dim=8, precision=precision), TableSpec(name="small", rows=1000, dim=8)]
    model, tables = tables_model(specs), {t.name: (t.rows, t.dim) for t in specs}
    topology = TopologySpec(world_size=4, local_world_size=4, compute_device="cpu", memory_per_device_bytes=memory)
    try:
        make_plan(model, cfg=ShardingConfig(), tables=tables, topology=topology, pg=None)
    except PlanError:
        return  # the planner found none: the bound may say either
    assert memory_bound(model, tables=tables, topology=topology, cfg=ShardingConfig()).fits


def test_the_search_stops_at_its_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    real, tried = objectives.try_candidate, []

    def slow(candidate: objectives.Candidate, *args: object, **kwargs: object) -> objectives.Outcome:
        tried.append(candidate.name)
        time.sleep(0.05)
        return real(candidate, *args, **kwargs)

    monkeypatch.setattr(objectives, "try_candidate", slow)
    specs = [TableSpec(name=f"t{i}", rows=1000 * (i + 1), dim=8) for i in range(3)]
    model, tables = tables_model(specs), {t.name: (t.rows, t.dim) for t in specs}
    topology = TopologySpec(world_size=2, local_world_size=2, compute_device="cpu", memory_per_device_bytes=1 << 30)
    chosen, outcomes = plan_for_objective(model, cfg=ShardingConfig(search_seconds=0.01), tables=tables,
                                          topology=topology, objective="balanced")
    assert len(tried) == 1 and chosen.candidate.name == tried[0]
    assert len(outcomes) > 1
    assert all("not tried: sharding.search_seconds=0.01 spent" in (o.error or "") for o in outcomes[1:])


def test_search_seconds_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="sharding.search_seconds must be > 0"):
        build(ShardingConfig, {"search_seconds": 0}, key="sharding")


@pytest.mark.parametrize("hidden", [True, False])
def test_known_planner_noise_is_hidden_unless_verbose(hidden: bool, caplog: pytest.LogCaptureFixture) -> None:
    specs = [TableSpec(name="a", rows=1000, dim=8)]
    model, tables = tables_model(specs), {"a": (1000, 8)}
    topology = TopologySpec(world_size=2, local_world_size=2, compute_device="cpu", memory_per_device_bytes=1 << 30)
    logger = "torchrec.distributed.planner.storage_reservations"  # quiet_libraries (other tests) may mute "torchrec"
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING, logger=logger):
        warnings.simplefilter("always")
        with known_planner_noise_hidden(hidden):
            make_plan(model, cfg=ShardingConfig(), tables=tables, topology=topology, pg=None)
            warnings.warn("an unrelated warning", FutureWarning)
    texts = [str(w.message) for w in seen]
    assert "an unrelated warning" in texts  # only the known two are hidden, never a whole category
    assert any("HeuristicalStorageReservation" in s for s in texts) != hidden
    assert any("known issue with TorchRec's dense tensor size" in r.getMessage() for r in caplog.records) != hidden
