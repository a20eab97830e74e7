"""``shardrec plan``: what to plan (a job's model or a table list), for which topology, and the output.

A table list is YAML (``tables:`` entries) or CSV with columns ``name, rows, dim`` and optional
``pooling_factor`` (average ids per sample), ``sharding_types`` and ``compute_kernels``
(``|``-separated lists) and ``precision`` (fp32 or fp16)::

    tables:
      - {name: user, rows: 40000000, dim: 128, pooling_factor: 1, sharding_types: [row_wise], precision: fp16}
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from shardrec.config import build, convert, load_yaml
from shardrec.data.schema import TablePrecision
from shardrec.errors import ConfigError
from shardrec.job import load_job
from shardrec.output import write_atomic
from shardrec.sharding.config import ComputeKernelName, ShardingConfig, ShardingTypeName, TableConstraint
from shardrec.sharding.objectives import Objective, Outcome, plan_for_objective
from shardrec.sharding.plan_file import read_plan_file
from shardrec.sharding.planner import TopologySpec, plan_rows
from shardrec.sharding.report import report_dict
from shardrec.sharding.shardable import fuse_sparse_optimizer, meta_model
from shardrec.sharding.topology import TopologyConfig, parse_topology
from shardrec.train.config import SparseOptimizerConfig


@dataclass(kw_only=True)
class TableSpec:
    """One table of a table list."""

    name: str
    """Table name."""
    rows: int
    """Number of rows."""
    dim: int
    """Row width."""
    pooling_factor: float = 1.0
    """Average ids per sample looked up in this table."""
    sharding_types: list[ShardingTypeName] | None = None
    """Allowed sharding types; unset: any."""
    compute_kernels: list[ComputeKernelName] | None = None
    """Allowed compute kernels; unset: any."""
    precision: TablePrecision = "fp32"
    """Storage precision of the weights: fp32, or fp16 (half the bytes; kept on fused kernels)."""

    def __post_init__(self) -> None:
        if self.rows <= 0 or self.dim <= 0 or self.pooling_factor <= 0:
            raise ConfigError(f"table '{self.name}': rows, dim and pooling_factor must be > 0")
        TableConstraint(sharding_types=self.sharding_types, compute_kernels=self.compute_kernels).check(f"table '{self.name}'")


@dataclass(kw_only=True)
class TableList:
    """The ``tables:`` of a table list file."""

    tables: list[TableSpec] = field(default_factory=list)
    """Tables to plan."""


def read_tables(path: Path) -> list[TableSpec]:
    """Reads a YAML or CSV table list, with errors naming the file and the row."""
    if not path.is_file():
        raise ConfigError(f"--tables: file '{path}' does not exist")
    if path.suffix.lower() == ".csv":
        with path.open() as f:
            specs = [_csv_row(path, i, row) for i, row in enumerate(csv.DictReader(f), start=2)]
    else:
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict) or "tables" not in data:
            raise ConfigError(f"--tables: '{path}' must hold a mapping with a 'tables:' list (or be a .csv file)")
        try:
            specs = build(TableList, data, key="").tables
        except ConfigError as e:
            raise ConfigError(f"--tables '{path}': {e}") from e
    if not specs:
        raise ConfigError(f"--tables: '{path}' lists no tables")
    return specs


def _csv_row(path: Path, line: int, row: dict[str, str]) -> TableSpec:
    missing = [c for c in ("name", "rows", "dim") if not row.get(c)]
    if missing:
        raise ConfigError(f"--tables: '{path}' line {line}: column '{missing[0]}' is empty; columns are name, rows, dim[, pooling_factor, sharding_types, compute_kernels, precision]")
    data: dict[str, Any] = {"name": row["name"]}
    try:
        data["rows"], data["dim"] = int(row["rows"]), int(row["dim"])
        if row.get("pooling_factor"):
            data["pooling_factor"] = float(row["pooling_factor"])
    except ValueError as e:
        raise ConfigError(f"--tables: '{path}' line {line}: {e}") from e
    for key in ("sharding_types", "compute_kernels"):
        if row.get(key):
            data[key] = row[key].split("|")
    if row.get("precision"):
        data["precision"] = row["precision"]
    try:
        return convert(TableSpec, data, key=f"--tables {path} line {line}")
    except ConfigError as e:
        where = f"--tables '{path}' line {line}"
        raise ConfigError(str(e) if where in str(e) or f"{path} line {line}" in str(e) else f"{where}: {e}") from e


def tables_model(specs: list[TableSpec]) -> nn.Module:
    """A meta-device module holding one EmbeddingBagCollection over the tables, with the sparse optimizer fused."""
    ebc = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=t.name, num_embeddings=t.rows, embedding_dim=t.dim, feature_names=[t.name],
                                   data_type=DataType.FP16 if t.precision == "fp16" else DataType.FP32) for t in specs],
        device=torch.device("meta"),
    )
    module = nn.ModuleDict({"ebc": ebc})
    fuse_sparse_optimizer(module, SparseOptimizerConfig())
    return module


def tables_sharding(specs: list[TableSpec]) -> ShardingConfig:
    """The per-table constraints a table list carries."""
    return ShardingConfig(
        tables={
            t.name: TableConstraint(sharding_types=t.sharding_types, compute_kernels=t.compute_kernels)
            for t in specs
            if t.sharding_types or t.compute_kernels
        }
    )


def pooling_factors(specs: list[TableSpec]) -> dict[str, float]:
    """Average ids per sample per table."""
    return {t.name: t.pooling_factor for t in specs}


@dataclass(frozen=True)
class PlanInput:
    """What to plan: a meta-device model, its tables, the job's constraints and pooling factors."""

    model: nn.Module
    tables: dict[str, tuple[int, int]]
    sharding: ShardingConfig
    pooling: dict[str, float] | None


def input_from_tables(path: Path) -> PlanInput:
    """A table list file as a PlanInput."""
    specs = read_tables(path)
    return PlanInput(
        model=tables_model(specs),
        tables={t.name: (t.rows, t.dim) for t in specs},
        sharding=tables_sharding(specs),
        pooling=pooling_factors(specs),
    )


def input_from_job(path: Path, overrides: list[str]) -> PlanInput:
    """A job config's model (built on meta, with its sparse optimizer fused) as a PlanInput."""
    job = load_job(path, overrides)
    meta = meta_model(job)
    return PlanInput(model=meta.module, tables=meta.tables, sharding=job.sharding, pooling=None)


def read_topology(text: str) -> TopologyConfig:
    """``--topology``: a spec like 4x8xH100, or a YAML file of TopologyConfig keys."""
    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml"):
        return build(TopologyConfig, load_yaml(path), key="topology")
    return parse_topology(text)


def write_plan_file(outcome: Outcome, topology: TopologySpec, tables: dict[str, tuple[int, int]], path: Path) -> None:
    """Writes the chosen plan (loadable by ``--sharding.plan``) with its report, atomically."""
    assert outcome.result is not None and outcome.report is not None
    data = {
        "topology": dataclasses.asdict(topology),
        "candidate": outcome.candidate.name,
        "tables": plan_rows(outcome.result.plan, tables),
        "report": report_dict(outcome.report),
    }
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def comparison(named: list[tuple[str, dict[str, Any]]]) -> str:
    """Plans' headline numbers side by side; each entry is (label, report summary)."""
    keys = ("topology", "est_step_ms", "critical_rank", "max_memory_gib", "mean_memory_gib", "max_over_mean_memory", "capacity_gib")
    width = max(len(k) for k in keys)
    cols = [max(len(label), 12) for label, _ in named]
    lines = [" " * width + "  " + "  ".join(f"{label:>{w}}" for (label, _), w in zip(named, cols))]
    for k in keys:
        lines.append(f"{k:<{width}}  " + "  ".join(f"{str(s.get(k)):>{w}}" for (_, s), w in zip(named, cols)))
    return "\n".join(lines)


def compare_files(paths: list[Path]) -> str:
    """``shardrec plan --compare A.json B.json``: the plan files' reports side by side."""
    named = []
    for p in paths:
        data = read_plan_file(p)
        if "report" not in data:
            raise ConfigError(f"--compare: '{p}' has no report; make it with `shardrec plan --out`")
        named.append((p.name, data["report"]["summary"]))
    return comparison(named)


def candidates_table(outcomes: list[Outcome], chosen: Outcome) -> str:
    """One line per candidate plan: its estimates, or why it found no plan."""
    lines = [f"{'candidate':<18} {'step ms':>9} {'max/mean mem':>13} {'plan s':>7}"]
    for o in outcomes:
        mark = "  <- chosen" if o is chosen else ""
        if o.report is None:
            lines.append(f"{o.candidate.name:<18} {'no plan':>9} {'':>13} {o.seconds:>7.1f}  {(o.error or '').splitlines()[0]}")
        else:
            s = o.report.summary()
            lines.append(f"{o.candidate.name:<18} {s['est_step_ms']:>9.4f} {s['max_over_mean_memory']:>13.2f} {o.seconds:>7.1f}{mark}")
    return "\n".join(lines)


def plan_command(
    *,
    source: PlanInput,
    topology: TopologyConfig,
    objective: Objective,
    out: Path | None,
    chart: Path | None,
    with_default: bool = False,
    verbose: bool = False,
) -> Outcome:
    """Plans ``source`` for ``topology`` with ``objective``, prints the report and writes the files.

    ``verbose`` shows torchrec's known repeated planner warnings, hidden otherwise."""
    from shardrec.sharding.chart import save_chart
    from shardrec.sharding.planner import from_topology_config, known_planner_noise_hidden
    from shardrec.sharding.report import format_report

    spec = from_topology_config(topology)
    with known_planner_noise_hidden(not verbose):
        chosen, outcomes = plan_for_objective(
            source.model, cfg=source.sharding, tables=source.tables, topology=spec, objective=objective,
            pooling=source.pooling, with_default=with_default,
        )
    assert chosen.report is not None
    print(format_report(chosen.report))
    print(f"\ncandidates ({objective} objective):\n{candidates_table(outcomes, chosen)}")
    if not any(o.candidate.name == "default" for o in outcomes):
        print(f"(torchrec's default planner not run: {len(source.tables)} tables x {spec.world_size} ranks would take "
              "minutes; --with-default runs it)")
    default = next((o for o in outcomes if o.candidate.name == "default" and o.report is not None), None)
    if default is not None and default is not chosen:
        print("\n" + comparison([("torchrec default", default.report.summary()), (f"{objective} ({chosen.candidate.name})", chosen.report.summary())]))
    if out is not None:
        write_plan_file(chosen, spec, source.tables, out)
        print(f"\nplan: {out}")
    if chart is not None:
        save_chart(chosen.report, chart, title=f"{spec.device_name}: {objective} plan ({chosen.candidate.name})")
        print(f"chart: {chart}")
    return chosen
