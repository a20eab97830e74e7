"""``shardrec checkpoint inspect``: what a checkpoint holds, read offline from its files alone.

Reads the DCP metadata (no tensor data), the checkpoint's meta.json, and the plan.json and
config.yaml copied in at save time: tables with shapes, the shards they were saved in, their
sharding type, bytes of weights and of optimizer state, the dense parameters, step and job.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from shardrec.checkpoint.safe_read import read_metadata
from shardrec.output import text_table
from shardrec.checkpoint.store import read_meta, table_of_key

@dataclass
class TableEntry:
    """One embedding table in a checkpoint."""

    name: str
    shape: list[int]
    shards: int
    sharding_type: str | None
    weight_bytes: int
    optimizer_state: dict[str, int] = field(default_factory=dict)
    """State name -> bytes (e.g. momentum1 of row-wise Adagrad)."""


@dataclass
class Inspection:
    """A checkpoint's contents."""

    path: str
    step: int
    model: str | None
    world_size: int | None
    tables: list[TableEntry]
    dense_params: int
    dense_bytes: int
    dense_optimizer_bytes: int
    files_bytes: int
    config: dict[str, Any] | None


def _bytes(md: TensorStorageMetadata) -> int:
    n = 1
    for s in md.size:
        n *= s
    return n * md.properties.dtype.itemsize  # type: ignore[union-attr]


def inspect_checkpoint(path: Path) -> Inspection:
    """Reads what the checkpoint at ``path`` holds; raises CheckpointError naming a missing part."""
    meta = read_meta(path)
    metadata = read_metadata(path)
    plan = json.loads((path / "plan.json").read_text()) if (path / "plan.json").is_file() else {"tables": []}
    types = {r["table"]: r["sharding_type"] for r in plan["tables"]}
    tables: dict[str, TableEntry] = {}
    dense = [0, 0, 0]  # params, bytes, optimizer bytes
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        name = table_of_key(key)
        if key.startswith("model.") and name is not None:
            tables[name] = TableEntry(name, list(md.size), len(md.chunks), types.get(name), _bytes(md))
        elif key.startswith("model."):
            dense[0] += _bytes(md) // md.properties.dtype.itemsize  # type: ignore[union-attr]
            dense[1] += _bytes(md)
        elif key.startswith("optim.state.") and name is not None and name in tables:
            tables[name].optimizer_state[key.rsplit(".", 1)[1]] = _bytes(md)
        elif key.startswith("optim.state."):
            dense[2] += _bytes(md)
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else None
    return Inspection(
        path=str(path), step=int(meta["step"]), model=meta.get("model"), world_size=meta.get("world_size"),
        tables=sorted(tables.values(), key=lambda t: t.name), dense_params=dense[0], dense_bytes=dense[1],
        dense_optimizer_bytes=dense[2], files_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        config=config,
    )


def format_inspection(ins: Inspection) -> str:
    """The inspection as text."""
    header = ("table", "shape", "shards", "sharding", "weights MiB", "optimizer state")
    rows = [
        (t.name, "x".join(map(str, t.shape)), str(t.shards), t.sharding_type or "?", f"{t.weight_bytes / 2**20:.3f}",
         ", ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in t.optimizer_state.items()) or "-")
        for t in ins.tables
    ]
    return (
        f"checkpoint {ins.path}\n  step {ins.step}, model {ins.model}, saved by {ins.world_size} ranks, "
        f"{ins.files_bytes / 2**20:.2f} MiB on disk\n"
        f"  dense: {ins.dense_params:,} parameters ({ins.dense_bytes / 2**20:.3f} MiB), optimizer state "
        f"{ins.dense_optimizer_bytes / 2**20:.3f} MiB\n\n" + text_table(header, rows)
    )


def inspection_json(ins: Inspection) -> str:
    """The inspection as JSON."""
    return json.dumps(asdict(ins), indent=2)
