"""Hardware topologies: ``NODESxDEVICESxKIND`` specs, presets and overrides, down to torchrec's Topology."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardrec.errors import ConfigError
from shardrec.sharding.config import ShardingConfig
from shardrec.sharding.plan_job import TableSpec, read_topology, tables_model
from shardrec.sharding.planner import from_topology_config, make_plan, torchrec_topology
from shardrec.sharding.report import build_report
from shardrec.sharding.topology import GiB, PRESETS, TopologyConfig, parse_topology

KINDS = "H100, H200, A100-40GB, A100-80GB, L4, CPU"
PER_MS = 1e9 * 1e-3
"""GB/s in torchrec's bytes/ms."""


def test_nodes_devices_kind() -> None:
    cfg = parse_topology("4x8xH100")
    assert (cfg.nodes, cfg.devices_per_node, cfg.world_size) == (4, 8, 32)
    assert cfg.spec() == PRESETS["H100"]


def test_devices_kind_is_one_node() -> None:
    cfg = parse_topology("8xH200")
    assert (cfg.nodes, cfg.devices_per_node, cfg.world_size) == (1, 8, 8)
    assert cfg.spec().hbm_gib == pytest.approx(141e9 / GiB)


@pytest.mark.parametrize(
    ("text", "preset"),
    [("2x4xh100", "H100"), ("2x4xa100", "A100-80GB"), ("2x4xA100-40gb", "A100-40GB"), ("2x4xh200-141gb", "H200"),
     ("2x4xcpu", "CPU"), (" 2x4xl4 ", "L4")],
)
def test_kinds_are_case_insensitive_with_aliases(text: str, preset: str) -> None:
    cfg = parse_topology(text)
    assert cfg.world_size == 8
    assert cfg.spec() == PRESETS[preset]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("fast", ["--topology 'fast'", "NODESxDEVICESxKIND", KINDS]),
        ("4x8xTPU", ["topology.device", "'TPU'", KINDS]),
        ("4x8", ["--topology '4x8'", "NODESxDEVICESxKIND", KINDS]),  # not 4 devices of a kind named '8'
        ("0x8xH100", ["topology", "nodes and devices_per_node must be > 0", "got 0 and 8"]),
        ("4x0xH100", ["topology", "got 4 and 0"]),
    ],
)
def test_bad_specs_name_the_spec_and_the_kinds(text: str, named: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        parse_topology(text)
    for part in named:
        assert part in str(e.value)


def test_batch_size_per_rank_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="topology.batch_size_per_rank must be > 0, got 0"):
        TopologyConfig(batch_size_per_rank=0)


def test_preset_reaches_torchrec_topology_in_bytes_per_ms() -> None:
    cfg = parse_topology("2x4xH100")
    spec = from_topology_config(cfg)
    assert (spec.world_size, spec.local_world_size, spec.compute_device) == (8, 4, "cuda")
    assert spec.memory_per_device_bytes == 80 * GiB
    assert spec.ddr_per_rank_bytes == 2048 * GiB // 4
    assert spec.device_name == "2x4xH100"
    topo = torchrec_topology(spec)
    assert (topo.world_size, topo.local_world_size, topo.compute_device) == (8, 4, "cuda")
    assert [d.storage.hbm for d in topo.devices] == [80 * GiB] * 8
    assert [d.storage.ddr for d in topo.devices] == [2048 * GiB // 4] * 8
    assert topo.intra_host_bw == pytest.approx(450 * PER_MS)
    assert topo.inter_host_bw == pytest.approx(50 * PER_MS)
    assert topo.hbm_mem_bw == pytest.approx(3350 * PER_MS)
    assert topo.ddr_mem_bw == pytest.approx(200 * PER_MS / 4)
    assert topo.hbm_to_ddr_mem_bw == pytest.approx(64 * PER_MS)


def test_overrides_reach_torchrec_topology() -> None:
    cfg = TopologyConfig(nodes=2, devices_per_node=4, device="a100", hbm_gib=40, inter_node_gbs=100,
                         intra_node_gbs=200, ddr_gib_per_node=512, batch_size_per_rank=64)
    spec = from_topology_config(cfg)
    assert spec.memory_per_device_bytes == 40 * GiB
    assert spec.inter_node_bw == pytest.approx(100e9)
    assert spec.batch_size_per_rank == 64
    topo = torchrec_topology(spec)
    assert [d.storage.hbm for d in topo.devices] == [40 * GiB] * 8
    assert [d.storage.ddr for d in topo.devices] == [512 * GiB // 4] * 8
    assert topo.inter_host_bw == pytest.approx(100 * PER_MS)
    assert topo.intra_host_bw == pytest.approx(200 * PER_MS)
    # What was not overridden stays the A100-80GB preset's.
    assert topo.hbm_mem_bw == pytest.approx(2039 * PER_MS)
    assert PRESETS["A100-80GB"].hbm_gib == 80  # the preset itself is untouched


def test_cpu_preset_plans_memory_as_host_memory() -> None:
    spec = from_topology_config(parse_topology("2xCPU"))
    assert spec.compute_device == "cpu"
    assert spec.memory_per_device_bytes == spec.ddr_per_rank_bytes == 256 * GiB // 2
    topo = torchrec_topology(spec)
    assert [(d.storage.hbm, d.storage.ddr) for d in topo.devices] == [(0, 128 * GiB)] * 2

    specs = [TableSpec(name="a", rows=50_000, dim=16), TableSpec(name="b", rows=20_000, dim=16), TableSpec(name="c", rows=300, dim=8)]
    tables = {t.name: (t.rows, t.dim) for t in specs}
    result = make_plan(tables_model(specs), cfg=ShardingConfig(compute_device="cpu"), tables=tables, topology=spec, pg=None)
    report = build_report(result.options, spec)
    assert [d.hbm_bytes for d in report.devices] == [0, 0]
    assert [report.memory(d) for d in report.devices] == [d.ddr_bytes for d in report.devices]
    # At least the weights of both big tables (4 bytes a value) sit in host memory.
    assert sum(d.ddr_bytes for d in report.devices) >= (50_000 + 20_000) * 16 * 4
    assert report.summary()["capacity_gib"] == 128.0


def test_read_topology_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("nodes: 2\ndevices_per_node: 4\ndevice: a100-40gb\nhbm_gib: 32\ninter_node_gbs: 12.5\n")
    cfg = read_topology(str(path))
    assert (cfg.nodes, cfg.devices_per_node, cfg.world_size) == (2, 4, 8)
    spec = from_topology_config(cfg)
    assert spec.memory_per_device_bytes == 32 * GiB
    assert spec.inter_node_bw == pytest.approx(12.5e9)
    assert spec.intra_node_bw == pytest.approx(300e9)  # the A100 preset's


def test_read_topology_spec_text() -> None:
    assert read_topology("3x2xL4").world_size == 6


def test_read_topology_rejects_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yml"
    path.write_text("nodes: 2\ngpus: 4\n")
    with pytest.raises(ConfigError) as e:
        read_topology(str(path))
    assert "unknown config key 'topology.gpus'" in str(e.value)
    assert "devices_per_node" in str(e.value) and "hbm_gib" in str(e.value)


def test_read_topology_rejects_unknown_device_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("device: V100\n")
    with pytest.raises(ConfigError, match=f"topology.device: unknown device 'V100'; known: {KINDS}"):
        read_topology(str(path))
