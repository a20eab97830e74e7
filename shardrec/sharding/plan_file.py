"""Plan files: a sharding plan written as readable JSON, and read back into a torchrec ShardingPlan.

The file holds the topology the plan was made for and one record per table (module, sharding
type, compute kernel, ranks, shards with offsets, sizes and placement). ``shardrec train
--sharding.plan plan.json`` trains with exactly that plan after checking that it matches the
model's tables and the launch's world size and device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Collection

import torch
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan

from shardrec.errors import PlanError


def read_plan_file(path: Path) -> dict[str, Any]:
    """The JSON of a plan file, with errors that name the file."""
    if not path.is_file():
        raise PlanError(f"plan file '{path}' does not exist; make one with `shardrec plan ... --out {path}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"plan file '{path}' is not valid JSON: {e}") from e
    if not isinstance(data, dict) or "tables" not in data or "topology" not in data:
        raise PlanError(f"plan file '{path}' has no 'tables' and 'topology'; it was not written by shardrec")
    return data


# Sharding types whose shards are grouped by node: valid only for the ranks per node planned for.
_BY_NODE = ("table_row_wise", "table_column_wise", "grid_shard")


def check_plan(
    data: dict[str, Any], *, path: Path, tables: dict[str, tuple[int, int]], world_size: int, compute_device: str,
    local_world_size: int | None = None, half: Collection[str] = (),
) -> None:
    """Raises a PlanError naming what differs between the plan file and this model and launch
    (``local_world_size``, the launch's ranks per node, is checked when given), or an fp16 table
    (named in ``half``) that the plan gives the dense optimizer."""
    topo = data["topology"]
    if topo["world_size"] != world_size:
        raise PlanError(f"plan file '{path}' was made for {topo['world_size']} ranks, this launch has {world_size}; plan again or launch {topo['world_size']} ranks")
    by_node = {r["table"]: r["sharding_type"] for r in data["tables"] if r["sharding_type"] in _BY_NODE}
    if local_world_size is not None and by_node and topo["local_world_size"] != local_world_size:
        layout = f"{world_size // topo['local_world_size']}x{topo['local_world_size']}"
        table, kind = next(iter(by_node.items()))
        raise PlanError(
            f"plan file '{path}' was made for {layout} (nodes x ranks per node), this launch is "
            f"{world_size // local_world_size}x{local_world_size}; its table '{table}' is {kind}, whose shards are "
            f"grouped by node: plan again for this launch, or launch -j {layout}"
        )
    if topo["compute_device"] != compute_device:
        raise PlanError(f"plan file '{path}' was made for {topo['compute_device']}, this launch computes on {compute_device}")
    planned = {r["table"]: (r["rows"], r["dim"]) for r in data["tables"]}
    missing, extra = sorted(set(tables) - set(planned)), sorted(set(planned) - set(tables))
    if missing or extra:
        raise PlanError(f"plan file '{path}' does not match the model's tables: missing {missing or 'none'}, not in the model {extra or 'none'}")
    for name, shape in tables.items():
        if tuple(planned[name]) != tuple(shape):
            raise PlanError(f"plan file '{path}': table '{name}' is {planned[name][0]} x {planned[name][1]} there, {shape[0]} x {shape[1]} in the model")
    dense = [r for r in data["tables"] if r["table"] in half and (r["sharding_type"] == "data_parallel" or r["compute_kernel"] == "dense")]
    if dense:
        r = dense[0]
        raise PlanError(f"plan file '{path}': table '{r['table']}' is fp16 in this job, and the plan gives it {r['sharding_type']} with the "
                        f"{r['compute_kernel']} kernel, which trains it with the dense optimizer (no fp32 master weights): plan again "
                        "for this job (shardrec plan keeps fp16 tables on fused kernels), or set its precision: fp32")


def to_sharding_plan(data: dict[str, Any], *, device_type: str) -> ShardingPlan:
    """Rebuilds the torchrec ShardingPlan of a plan file for ranks computing on ``device_type``."""
    plan: dict[str, EmbeddingModuleShardingPlan] = {}
    for r in data["tables"]:
        module = plan.setdefault(r["module"], EmbeddingModuleShardingPlan())
        spec = None
        if r["shards"]:
            spec = EnumerableShardingSpec(
                [
                    ShardMetadata(shard_offsets=s["offsets"], shard_sizes=s["sizes"], placement=_placement(s["placement"], device_type))
                    for s in r["shards"]
                ]
            )
        module[r["table"]] = ParameterSharding(
            sharding_type=r["sharding_type"], compute_kernel=r["compute_kernel"], ranks=r["ranks"] or None, sharding_spec=spec
        )
    return ShardingPlan(plan)


def _placement(text: str, device_type: str) -> str:
    """``rank:R/cuda:L`` as written on any machine, for this machine's device type."""
    rank = text.split("/")[0]
    local = text.split(":")[-1] if device_type == "cuda" else "0"
    return f"{rank}/{device_type}:{local}" if device_type == "cuda" else f"{rank}/cpu"


def load_plan(
    path: Path, *, tables: dict[str, tuple[int, int]], world_size: int, compute_device: str, local_world_size: int | None = None,
    half: Collection[str] = (),
) -> ShardingPlan:
    """Reads, checks and rebuilds the plan in ``path``; ``half`` names the model's fp16 tables."""
    data = read_plan_file(path)
    check_plan(data, path=path, tables=tables, world_size=world_size, compute_device=compute_device, local_world_size=local_world_size,
               half=half)
    return to_sharding_plan(data, device_type=torch.device(compute_device).type)
