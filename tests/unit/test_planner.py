"""Planning without any process group or GPU: hypothetical CPU and CUDA topologies, per-table
constraints, the CPU row-wise sharder, errors that name the fix, and the plan as text and JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ShardingPlan

from shardrec.data.schema import FeatureSchema, criteo_schema
from shardrec.errors import ConfigError, PlanError
from shardrec.models.registry import build_model
from shardrec.train.config import SparseOptimizerConfig
from shardrec.sharding.shardable import fuse_sparse_optimizer
from shardrec.sharding.shardable import TrainModule
from shardrec.sharding.config import ShardingConfig, TableConstraint
from shardrec.sharding.planner import (
    GiB,
    TopologySpec,
    constraints,
    format_plan,
    make_plan,
    plan_rows,
    save_plan,
    topology_spec,
)
from shardrec.sharding.sharders import EmbeddingBagCollectionSharderAnyDevice, default_sharders

ROWS = [1000, 200, 50_000, 10]
DIM = 8
CPU4 = TopologySpec(world_size=4, local_world_size=4, compute_device="cpu", memory_per_device_bytes=8 * GiB)
CUDA16 = TopologySpec(world_size=16, local_world_size=8, compute_device="cuda", memory_per_device_bytes=80 * GiB)


@pytest.fixture(scope="module")
def schema() -> FeatureSchema:
    return criteo_schema(num_dense=3, num_sparse=len(ROWS), rows=ROWS, dim=DIM)


@pytest.fixture(scope="module")
def tables(schema: FeatureSchema) -> dict[str, tuple[int, int]]:
    return {t.name: (t.num_embeddings, t.embedding_dim) for t in schema.tables}


@pytest.fixture(scope="module")
def module(schema: FeatureSchema) -> TrainModule:
    model = build_model("dlrm", {"dense_arch_layer_sizes": [16, DIM]}, schema=schema, device=torch.device("meta"))
    train_module = TrainModule(model)
    fuse_sparse_optimizer(train_module, SparseOptimizerConfig())
    return train_module


def _plan(module: TrainModule, tables: dict[str, tuple[int, int]], topology: TopologySpec,
          cfg: ShardingConfig | None = None) -> ShardingPlan:
    return make_plan(module, cfg=cfg or ShardingConfig(), tables=tables, topology=topology, pg=None).plan


def _by_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["table"]: r for r in rows}


def _check_covers_table(row: dict[str, Any], world_size: int) -> None:
    """Every rank is valid and the shards tile the whole [rows, dim] table exactly once."""
    assert row["ranks"] and all(0 <= r < world_size for r in row["ranks"])
    if row["sharding_type"] == "data_parallel":
        assert row["shards"] == [] and sorted(row["ranks"]) == list(range(world_size))
        return
    covered = torch.zeros(row["rows"], row["dim"], dtype=torch.int32)
    for shard in row["shards"]:
        (r0, c0), (nr, nc) = shard["offsets"], shard["sizes"]
        covered[r0 : r0 + nr, c0 : c0 + nc] += 1
    assert bool((covered == 1).all())


@pytest.mark.parametrize("topology", [CPU4, CUDA16], ids=["cpu-4", "cuda-16x8"])
def test_every_table_is_placed(module: TrainModule, tables: dict[str, tuple[int, int]], topology: TopologySpec) -> None:
    plan = _plan(module, tables, topology)
    rows = plan_rows(plan, tables)
    assert sorted(r["table"] for r in rows) == sorted(tables)
    for r in rows:
        assert (r["rows"], r["dim"]) == tables[r["table"]]
        assert r["module"] == "model.ebc"
        _check_covers_table(r, topology.world_size)


def test_per_table_constraints_are_respected_on_cpu(module: TrainModule, tables: dict[str, tuple[int, int]]) -> None:
    cfg = ShardingConfig(
        default=TableConstraint(sharding_types=["table_wise"]),
        tables={"t_C1": TableConstraint(sharding_types=["row_wise"]),
                "t_C3": TableConstraint(sharding_types=["column_wise"], compute_kernels=["fused"])},
    )
    rows = _by_table(plan_rows(_plan(module, tables, CPU4, cfg), tables))
    assert {name: r["sharding_type"] for name, r in rows.items()} == {
        "t_C1": "row_wise", "t_C2": "table_wise", "t_C3": "column_wise", "t_C4": "table_wise",
    }
    # Row-wise spreads 1000 rows evenly over the 4 ranks.
    assert sorted(r for r in rows["t_C1"]["ranks"]) == [0, 1, 2, 3]
    assert [s["sizes"] for s in rows["t_C1"]["shards"]] == [[250, DIM]] * 4
    assert rows["t_C3"]["compute_kernel"] == "fused"
    for r in rows.values():
        _check_covers_table(r, CPU4.world_size)


def test_per_table_constraints_are_respected_on_cuda(module: TrainModule, tables: dict[str, tuple[int, int]]) -> None:
    cfg = ShardingConfig(tables={"t_C3": TableConstraint(sharding_types=["row_wise"]),
                                 "t_C2": TableConstraint(sharding_types=["data_parallel"])})
    rows = _by_table(plan_rows(_plan(module, tables, CUDA16, cfg), tables))
    assert rows["t_C3"]["sharding_type"] == "row_wise"
    assert sorted(rows["t_C3"]["ranks"]) == list(range(16))
    assert sum(s["sizes"][0] for s in rows["t_C3"]["shards"]) == 50_000
    assert rows["t_C2"]["sharding_type"] == "data_parallel"
    for r in rows.values():
        _check_covers_table(r, CUDA16.world_size)


def test_cpu_sharder_offers_row_wise_where_torchrec_does_not() -> None:
    base = EmbeddingBagCollectionSharder().sharding_types("cpu")
    ours = EmbeddingBagCollectionSharderAnyDevice().sharding_types("cpu")
    assert "row_wise" not in base and "table_row_wise" not in base
    assert {"row_wise", "table_row_wise"} <= set(ours)
    assert ours[: len(base)] == base  # adds, never drops or reorders
    assert len(ours) == len(set(ours))
    # On cuda torchrec already offers them: nothing changes there.
    assert EmbeddingBagCollectionSharderAnyDevice().sharding_types("cuda") == EmbeddingBagCollectionSharder().sharding_types("cuda")
    assert [type(s) for s in default_sharders()] == [EmbeddingBagCollectionSharderAnyDevice, EmbeddingCollectionSharder]


def test_row_wise_on_cpu_plans_only_with_our_sharder(module: TrainModule, tables: dict[str, tuple[int, int]]) -> None:
    cfg = ShardingConfig(tables={"t_C1": TableConstraint(sharding_types=["row_wise"])})
    rows = _by_table(plan_rows(_plan(module, tables, CPU4, cfg), tables))
    assert rows["t_C1"]["sharding_type"] == "row_wise"
    # torchrec's own sharder has no row_wise on cpu, so the same constraint leaves t_C1 with no option.
    with pytest.raises(Exception, match="t_C1"):
        make_plan(module, cfg=cfg, tables=tables, topology=CPU4, pg=None, sharders=[EmbeddingBagCollectionSharder()])


@pytest.mark.parametrize(
    "constraint",
    [TableConstraint(compute_kernels=["fused_uvm"]), TableConstraint(sharding_types=["row_wise"], compute_kernels=["dense"])],
    ids=["uvm-on-cpu", "row_wise-dense"],
)
def test_unsatisfiable_constraint_raises_plan_error(
    module: TrainModule, tables: dict[str, tuple[int, int]], constraint: TableConstraint
) -> None:
    with pytest.raises(PlanError, match="t_C1"):
        _plan(module, tables, CPU4, ShardingConfig(tables={"t_C1": constraint}))


def test_constraints_translate_every_field() -> None:
    cfg = ShardingConfig(
        default=TableConstraint(compute_kernels=["dense"]),
        tables={"a": TableConstraint(sharding_types=["row_wise", "table_row_wise"], compute_kernels=["fused"], min_partition=4)},
    )
    out = constraints(cfg, ["a", "b"])
    assert sorted(out) == ["a", "b"]
    assert out["a"].sharding_types == ["row_wise", "table_row_wise"]
    assert out["a"].compute_kernels == ["fused"] and out["a"].min_partition == 4
    assert out["b"].compute_kernels == ["dense"]
    assert out["b"].min_partition is None


def test_constraints_unknown_table_lists_known_tables() -> None:
    cfg = ShardingConfig(tables={"t_C9": TableConstraint(sharding_types=["row_wise"])})
    with pytest.raises(ConfigError) as info:
        constraints(cfg, ["t_C1", "t_C2"])
    message = str(info.value)
    assert "sharding.tables.t_C9: no table 't_C9'" in message
    assert "known tables: t_C1, t_C2" in message


def test_make_plan_rejects_unknown_table(module: TrainModule, tables: dict[str, tuple[int, int]]) -> None:
    cfg = ShardingConfig(tables={"t_C99": TableConstraint()})
    with pytest.raises(ConfigError, match="known tables: t_C1, t_C2, t_C3, t_C4"):
        _plan(module, tables, CPU4, cfg)


def test_impossible_plan_names_the_largest_table_and_options(module: TrainModule, tables: dict[str, tuple[int, int]]) -> None:
    tiny = TopologySpec(world_size=4, local_world_size=4, compute_device="cpu", memory_per_device_bytes=1000)
    with pytest.raises(PlanError) as info:
        _plan(module, tables, tiny)
    message = str(info.value)
    assert "no sharding plan fits" in message
    # Largest first: t_C3 (50000 x 8) before t_C1 (1000 x 8).
    largest = message.split("largest tables: ")[1]
    assert largest.startswith("t_C3 (") and largest.index("t_C3") < largest.index("t_C1") < largest.index("t_C2")
    assert "available: 4 x" in message and "(cpu)" in message
    assert "options: more devices" in message
    assert "sharding.memory_per_device_gb" in message and "sharding.default.sharding_types" in message


def test_table_wise_only_does_not_fit_where_row_wise_does(module: TrainModule, tables: dict[str, tuple[int, int]]) -> None:
    # 1.6 MB per rank: t_C3 (50000 x 8 floats = 1.6 MB, plus optimizer state) fits only when split.
    topology = TopologySpec(world_size=4, local_world_size=4, compute_device="cpu", memory_per_device_bytes=1_600_000)
    with pytest.raises(PlanError, match="largest tables: t_C3"):
        _plan(module, tables, topology, ShardingConfig(default=TableConstraint(sharding_types=["table_wise"])))
    rows = _by_table(plan_rows(_plan(module, tables, topology), tables))
    assert rows["t_C3"]["sharding_type"] in ("row_wise", "table_row_wise", "column_wise", "table_column_wise")
    assert len(rows["t_C3"]["shards"]) > 1
    _check_covers_table(rows["t_C3"], topology.world_size)


def test_topology_spec_from_config() -> None:
    cfg = ShardingConfig(compute_device="cuda", memory_per_device_gb=2.0)
    assert topology_spec(cfg, world_size=16, local_world_size=8) == TopologySpec(16, 8, "cuda", 2 * GiB)
    cpu = topology_spec(ShardingConfig(compute_device="cpu"), world_size=2, local_world_size=2)
    assert cpu.compute_device == "cpu" and cpu.memory_per_device_bytes > 0


def test_format_plan_has_one_line_per_table(module: TrainModule, tables: dict[str, tuple[int, int]]) -> None:
    cfg = ShardingConfig(tables={"t_C1": TableConstraint(sharding_types=["row_wise"]),
                                 "t_C2": TableConstraint(sharding_types=["data_parallel"])})
    rows = plan_rows(_plan(module, tables, CPU4, cfg), tables)
    lines = format_plan(rows).splitlines()
    assert len(lines) == 2 + len(tables)
    assert lines[0].split() == ["table", "rows", "x", "dim", "sharding", "kernel", "ranks", "shard", "shapes"]
    assert set(lines[1]) <= {"-", " "}
    body = {line.split()[0]: line for line in lines[2:]}
    assert sorted(body) == sorted(tables)
    assert "1000 x 8" in body["t_C1"] and "row_wise" in body["t_C1"] and "0,1,2,3" in body["t_C1"]
    assert body["t_C1"].rstrip().endswith("250x8 250x8 250x8 250x8")
    assert "data_parallel" in body["t_C2"] and body["t_C2"].rstrip().endswith("replicated")
    # Fixed width: each column starts at the same offset on every line.
    sharding_at, kernel_at = lines[0].index("sharding"), lines[0].index("kernel")
    for r in rows:
        assert body[r["table"]][sharding_at:].startswith(r["sharding_type"] + " ")
        assert body[r["table"]][kernel_at:].startswith(r["compute_kernel"] + " ")


def test_save_plan_writes_json_atomically(module: TrainModule, tables: dict[str, tuple[int, int]], tmp_path: Path) -> None:
    rows = plan_rows(_plan(module, tables, CPU4), tables)
    path = tmp_path / "plan.json"
    path.write_text("old\n")
    save_plan(rows, CPU4, path)
    data = json.loads(path.read_text())
    assert {k: data["topology"][k] for k in ("world_size", "local_world_size", "compute_device", "memory_per_device_bytes")} == {
        "world_size": 4, "local_world_size": 4, "compute_device": "cpu", "memory_per_device_bytes": 8 * GiB}
    assert data["tables"] == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_save_plan_failure_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text('{"previous": true}\n')
    with pytest.raises(TypeError):
        save_plan([{"table": "t", "bad": object()}], CPU4, path)
    assert json.loads(path.read_text()) == {"previous": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_storage_reservation_shrinks_what_the_planner_may_fill(module: TrainModule, tables: dict[str, tuple[int, int]]) -> None:
    # t_C3 (50,000 x 8 fp32 + row-wise state) is ~1.8 MB; 3 MB of HBM per device fits it with the
    # default 15% reservation and not with 60% kept free, when no table may be split.
    small = TopologySpec(world_size=4, local_world_size=4, compute_device="cuda", memory_per_device_bytes=3 * 1024**2)
    only_whole = TableConstraint(sharding_types=["table_wise"], compute_kernels=["fused"])
    _plan(module, tables, small, ShardingConfig(default=only_whole))
    with pytest.raises(PlanError, match="t_C3"):
        _plan(module, tables, small, ShardingConfig(default=only_whole, storage_reservation=0.6))


def test_cache_load_factor_reaches_the_constraints() -> None:
    cfg = ShardingConfig(tables={"t": TableConstraint(compute_kernels=["fused_uvm_caching"], cache_load_factor=0.2)})
    got = constraints(cfg, ["t"])["t"]
    assert got.cache_params is not None and got.cache_params.load_factor == 0.2
    with pytest.raises(ConfigError, match=r"'sharding.tables.t.cache_load_factor' must be in \(0, 1\]"):
        ShardingConfig(tables={"t": TableConstraint(cache_load_factor=1.5)})
