"""A PNG chart of a plan: memory and estimated step time per device."""

from __future__ import annotations

from pathlib import Path

from shardrec.sharding.report import GiB, PlanReport


def save_chart(report: PlanReport, path: Path, *, title: str) -> None:
    """Two bar charts over the ranks: memory against capacity, and estimated compute + comms time."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ranks = [d.rank for d in report.devices]
    fig, (mem, time) = plt.subplots(2, 1, figsize=(max(8, len(ranks) * 0.12), 7), sharex=True)
    mem.bar(ranks, [report.memory(d) / GiB for d in report.devices], color="#4c72b0")
    mem.axhline(report.topology.memory_per_device_bytes / GiB, color="#c44e52", linestyle="--", label="capacity")
    mem.axhline(sum(report.memory(d) for d in report.devices) / len(ranks) / GiB, color="#555555", linestyle=":", label="mean")
    mem.set_ylabel("memory (GiB)")
    mem.legend(loc="upper right")
    compute = [d.fwd_compute_ms + d.bwd_compute_ms for d in report.devices]
    comms = [d.step_ms - c for d, c in zip(report.devices, compute)]
    time.bar(ranks, compute, color="#55a868", label="compute")
    time.bar(ranks, comms, bottom=compute, color="#dd8452", label="comms")
    time.set_ylabel("estimated step (ms)")
    time.set_xlabel("rank")
    time.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
