"""Plan reports: per table and per device memory and estimated step time, from the planner's options."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchrec.distributed.planner.types import ShardingOption

from shardrec.output import text_table
from shardrec.sharding.planner import TopologySpec

GiB = 1024**3


@dataclass
class DeviceLoad:
    """What one rank holds and does per step, by the planner's estimates (times in ms)."""

    rank: int
    hbm_bytes: int = 0
    ddr_bytes: int = 0
    fwd_compute_ms: float = 0.0
    fwd_comms_ms: float = 0.0
    bwd_compute_ms: float = 0.0
    bwd_comms_ms: float = 0.0
    input_dist_ms: float = 0.0

    @property
    def step_ms(self) -> float:
        """Estimated embedding time of one step on this rank."""
        return self.fwd_compute_ms + self.fwd_comms_ms + self.bwd_compute_ms + self.bwd_comms_ms + self.input_dist_ms


@dataclass
class TableLoad:
    """One table's placement."""

    name: str
    rows: int
    dim: int
    sharding_type: str
    compute_kernel: str
    ranks: list[int]
    shard_shapes: list[list[int]]
    hbm_bytes: int
    ddr_bytes: int
    precision: str = "fp32"
    """Storage precision of the weights (fp32 or fp16: 4 or 2 bytes a weight in the bytes above)."""


@dataclass
class PlanReport:
    """A plan's tables and devices with the totals a person asks about."""

    topology: TopologySpec
    tables: list[TableLoad]
    devices: list[DeviceLoad]

    def memory(self, d: DeviceLoad) -> int:
        """The memory that counts against capacity on ``d``: HBM on cuda, host memory on cpu."""
        return d.hbm_bytes if self.topology.compute_device == "cuda" else d.ddr_bytes

    @property
    def critical(self) -> DeviceLoad:
        """The device with the longest estimated step."""
        return max(self.devices, key=lambda d: d.step_ms)

    @property
    def max_over_mean_memory(self) -> float:
        """Fullest device's memory divided by the mean."""
        used = [self.memory(d) for d in self.devices]
        mean = sum(used) / len(used)
        return max(used) / mean if mean else 1.0

    def summary(self) -> dict[str, Any]:
        """Headline numbers."""
        used = [self.memory(d) for d in self.devices]
        return {
            "topology": self.topology.device_name,
            "world_size": self.topology.world_size,
            "critical_rank": self.critical.rank,
            "est_step_ms": round(self.critical.step_ms, 4),
            "max_memory_gib": round(max(used) / GiB, 3),
            "mean_memory_gib": round(sum(used) / len(used) / GiB, 3),
            "max_over_mean_memory": round(self.max_over_mean_memory, 3),
            "capacity_gib": round(self.topology.memory_per_device_bytes / GiB, 3),
        }


def build_report(options: list[ShardingOption], topology: TopologySpec) -> PlanReport:
    """Sums the planner's per-shard storage and perf estimates per table and per rank."""
    devices = [DeviceLoad(rank=r) for r in range(topology.world_size)]
    tables = []
    for opt in sorted(options, key=lambda o: o.name):
        hbm = ddr = 0
        for shard in opt.shards:
            d = devices[shard.rank]  # type: ignore[index]
            if shard.storage is not None:
                d.hbm_bytes += shard.storage.hbm
                d.ddr_bytes += shard.storage.ddr
                hbm, ddr = hbm + shard.storage.hbm, ddr + shard.storage.ddr
            if shard.perf is not None:
                p = shard.perf
                d.fwd_compute_ms += p.fwd_compute
                d.fwd_comms_ms += p.fwd_comms
                d.bwd_compute_ms += p.bwd_compute
                d.bwd_comms_ms += p.bwd_comms
                d.input_dist_ms += getattr(p, "input_dist_comms", 0.0)
        rows, dim = opt.tensor.shape
        tables.append(
            TableLoad(
                name=opt.name, rows=int(rows), dim=int(dim), sharding_type=opt.sharding_type,
                compute_kernel=opt.compute_kernel, ranks=sorted({s.rank for s in opt.shards}),  # type: ignore[type-var]
                shard_shapes=[list(s.size) for s in opt.shards], hbm_bytes=hbm, ddr_bytes=ddr,
                precision="fp16" if opt.tensor.dtype == torch.float16 else "fp32",
            )
        )
    return PlanReport(topology=topology, tables=tables, devices=devices)


def _gib(n: float) -> str:
    return f"{n / GiB:.3f}"


def format_report(report: PlanReport, *, max_tables: int = 60) -> str:
    """The report as text: tables (the largest ``max_tables``), devices, headline."""
    by_size = sorted(report.tables, key=lambda t: t.hbm_bytes + t.ddr_bytes, reverse=True)
    table_rows = [
        (t.name, f"{t.rows}x{t.dim}", t.precision, t.sharding_type, t.compute_kernel, _ranks(t.ranks),
         _shapes(t.shard_shapes), _gib(t.hbm_bytes), _gib(t.ddr_bytes))
        for t in by_size[:max_tables]
    ]
    cap = report.topology.memory_per_device_bytes
    device_rows = [
        (d.rank, f"{_gib(report.memory(d))} / {_gib(cap)}", f"{100 * report.memory(d) / cap:.1f}%" if cap else "-",
         f"{d.fwd_compute_ms + d.bwd_compute_ms:.3f}", f"{d.fwd_comms_ms + d.bwd_comms_ms + d.input_dist_ms:.3f}",
         f"{d.step_ms:.3f}", "<- critical" if d.rank == report.critical.rank else "")
        for d in report.devices
    ]
    s = report.summary()
    more = f"\n  ({len(report.tables) - max_tables} smaller tables not shown)" if len(report.tables) > max_tables else ""
    return (
        f"tables (largest first, sizes in GiB):\n{text_table(('table', 'rows x dim', 'dtype', 'sharding', 'kernel', 'ranks', 'shards', 'hbm', 'ddr'), table_rows)}{more}\n\n"
        f"devices ({s['topology']}, memory in GiB):\n"
        f"{text_table(('rank', 'memory used / capacity', 'used', 'compute ms', 'comms ms', 'step ms', ''), device_rows)}\n\n"
        f"estimated embedding step: {s['est_step_ms']:.3f} ms on rank {s['critical_rank']}; "
        f"fullest device {s['max_memory_gib']:.3f} GiB = {s['max_over_mean_memory']:.2f} x mean"
    )


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 4 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def _shapes(shapes: list[list[int]]) -> str:
    distinct = sorted({tuple(s) for s in shapes})
    if len(distinct) == 1:
        return f"{len(shapes)} x {'x'.join(map(str, distinct[0]))}"
    return " ".join("x".join(map(str, s)) for s in shapes[:4]) + (" ..." if len(shapes) > 4 else "")


def report_dict(report: PlanReport) -> dict[str, Any]:
    """The report as JSON-friendly data."""
    return {
        "summary": report.summary(),
        "topology": asdict(report.topology),
        "tables": [asdict(t) for t in report.tables],
        "devices": [{**asdict(d), "step_ms": d.step_ms} for d in report.devices],
    }
