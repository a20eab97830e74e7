"""Each planning objective's plan against torchrec's default planner, on the same tables and topology.

For every case the candidates are planned once (torchrec's default included, however long it
takes), then each objective's choice is reported with the two figures issue #4 asks for: fullest
device's memory divided by the mean, and the critical device's estimated step time, the latter
also as a ratio to the default's. Usage:

    python bench/plan_objectives.py [--case mlperf-4x8 ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shardrec.train.quiet import quiet_libraries
from shardrec.sharding.objectives import choose, plan_for_objective
from shardrec.sharding.plan_job import input_from_tables
from shardrec.sharding.planner import from_topology_config
from shardrec.sharding.topology import parse_topology

TABLES = Path(__file__).resolve().parent.parent / "configs" / "tables"
CASES = {
    "mlperf-1x8": ("mlperf_dlrm_dcnv2.csv", "1x8xH100"),
    "mlperf-4x8": ("mlperf_dlrm_dcnv2.csv", "4x8xH100"),
    "mlperf-8x8": ("mlperf_dlrm_dcnv2.csv", "8x8xH100"),
    "synthetic500-16x8": ("synthetic_500.csv", "16x8xH100"),
}


def run_case(name: str) -> list[str]:
    """Markdown rows of one case: the default and each objective's choice."""
    tables, topo = CASES[name]
    source = input_from_tables(TABLES / tables)
    spec = from_topology_config(parse_topology(topo))
    start = time.perf_counter()
    _, outcomes = plan_for_objective(
        source.model, cfg=source.sharding, tables=source.tables, topology=spec, objective="balanced",
        pooling=source.pooling, with_default=True,
    )
    total = time.perf_counter() - start
    default = next(o for o in outcomes if o.candidate.name == "default")
    ours = total - default.seconds
    base = default.report.summary()["est_step_ms"]
    rows = []
    for objective in ("default", "perf", "memory", "balanced"):
        o = choose(outcomes, objective)  # type: ignore[arg-type]
        s = o.report.summary()
        seconds = default.seconds if objective == "default" else ours
        rows.append(
            f"| {name} | {objective} | {o.candidate.name} | {s['max_over_mean_memory']:.2f} | {s['max_memory_gib']:.2f} "
            f"| {s['est_step_ms']:.4f} | {s['est_step_ms'] / base:.3f} | {seconds:.1f} |"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--case", action="append", choices=sorted(CASES), help="default: every case")
    args = p.parse_args()
    quiet_libraries()
    print("| case | objective | plan | fullest/mean memory | fullest GiB | est. step ms | step / default | planning s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.case or list(CASES):
        for row in run_case(name):
            print(row, flush=True)


if __name__ == "__main__":
    main()
