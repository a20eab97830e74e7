"""``shardrec checkpoint reshard``: rewrites a checkpoint for another plan, offline.

No process group and no model: the new plan file (``shardrec plan --out``) says how each table is
split, and the checkpoint is rewritten in DCP's own format with one chunk per new shard, stored in
the file of the rank that will own it, so a job started with that plan reads only its own rows.
Each table's optimizer state is converted to its new layout (shardrec/checkpoint/relayout.py);
every other tensor is copied. Shards are streamed a block of rows at a time, and the new
checkpoint appears under its final name only once complete.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from shardrec.errors import CheckpointError
from shardrec.output import atomic_folder
from shardrec.checkpoint import relayout
from shardrec.checkpoint.store import META_FILE, open_for_rewrite, table_of_key
from shardrec.checkpoint.dcp_reader import Box, SavedCheckpoint, find_data
from shardrec.sharding.plan_file import read_plan_file

BLOCK_BYTES = 64 << 20
Fill = Callable[[Box], torch.Tensor]


@dataclass
class _Chunk:
    offsets: list[int]
    sizes: list[int]
    rank: int


class _Writer:
    """Writes tensors into DCP files ``__<rank>_0.distcp`` and the ``.metadata`` that indexes them."""

    def __init__(self, folder: Path, *, block_bytes: int) -> None:
        self.folder, self.block_bytes = folder, block_bytes
        self.files: dict[int, IO[bytes]] = {}
        self.entries: dict[str, Any] = {}
        self.storage: dict[MetadataIndex, _StorageInfo] = {}
        self.paths: dict[str, tuple[str, ...]] = {}

    def tensor(self, key: str, *, size: list[int], dtype: torch.dtype, chunks: list[_Chunk], fill: Fill, path: tuple[str, ...]) -> None:
        """Adds tensor ``key``: each chunk's values come from ``fill(box)``, a block of rows at a time."""
        props = TensorProperties(dtype=dtype)
        self.entries[key] = TensorStorageMetadata(
            properties=props, size=torch.Size(size),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in chunks],
        )
        self.paths[key] = path
        for c in chunks:
            self.storage[MetadataIndex(key, torch.Size(c.offsets))] = self._write_chunk(key, c, dtype, fill)

    def _write_chunk(self, key: str, c: _Chunk, dtype: torch.dtype, fill: Fill) -> _StorageInfo:
        name, f = self._file(c.rank)
        start = f.tell()
        box = tuple((o, o + n) for o, n in zip(c.offsets, c.sizes))
        if not c.sizes:
            torch.save(fill(box), f)
            return _StorageInfo(name, start, f.tell() - start)
        with torch.serialization.skip_data():
            torch.save(torch.empty(c.sizes, dtype=dtype), f)  # a header and room for the bytes below
        end = f.tell()
        f.flush()
        data = find_data(self.folder / name, start, end - start, key=key).data_offset
        row_bytes = max(1, torch.Size(c.sizes[1:]).numel() * torch.empty((), dtype=dtype).element_size())
        step = max(1, self.block_bytes // row_bytes)
        f.seek(data)
        (r0, r1), rest = box[0], box[1:]
        for a in range(r0, r1, step):
            block = fill(((a, min(r1, a + step)), *rest)).to(dtype).contiguous()
            f.write(block.view(torch.uint8).numpy())
        f.seek(end)
        return _StorageInfo(name, start, end - start)

    def raw(self, key: str, md: Any, data: bytes, path: tuple[str, ...]) -> None:
        """Adds a non-tensor entry (bytes as DCP stored them)."""
        name, f = self._file(0)
        start = f.tell()
        f.write(data)
        self.entries[key], self.paths[key] = md, path
        self.storage[MetadataIndex(key)] = _StorageInfo(name, start, len(data))

    def _file(self, rank: int) -> tuple[str, IO[bytes]]:
        name = f"__{rank}_0.distcp"
        if rank not in self.files:
            self.files[rank] = open(self.folder / name, "wb")  # noqa: SIM115 - closed in close()
        return name, self.files[rank]

    def close(self) -> None:
        """Closes the data files and writes ``.metadata`` (as DCP's FileSystemWriter does)."""
        for f in self.files.values():
            f.close()
        metadata = Metadata(state_dict_metadata=self.entries, planner_data=self.paths, storage_data=self.storage, version="1.0.0")
        with open(self.folder / ".metadata", "wb") as f:
            pickle.dump(metadata, f)


def reshard_checkpoint(path: Path, *, plan: Path, out: Path, block_bytes: int = BLOCK_BYTES) -> dict[str, Any]:
    """Writes checkpoint ``path`` (a run or step folder) to ``out``, laid out as plan file ``plan`` says."""
    path, meta, saved = open_for_rewrite(path, out=out, label="output")
    data = read_plan_file(plan)
    records = _match_tables(saved, data, plan=plan)
    with atomic_folder(out) as tmp:
        writer = _Writer(tmp, block_bytes=block_bytes)
        done = _write_tables(saved, writer, records, step=int(meta["step"]))
        planner_data = saved.paths
        for key, md in saved.tensors.items():
            if key not in done:
                writer.tensor(key, size=list(md.size), dtype=md.properties.dtype,
                              chunks=[_Chunk(list(c.offsets), list(c.sizes), 0) for c in md.chunks],
                              fill=lambda box, k=key: saved.read(k, box), path=planner_data.get(key, (key,)))
        for key, md in saved.entries.items():
            if key not in saved.tensors:
                writer.raw(key, md, saved.read_bytes(key), path=planner_data.get(key, (key,)))
        writer.close()
        _attach(path, tmp, meta=meta, plan=plan, world_size=int(data["topology"]["world_size"]))
    return {"checkpoint": str(out), "from": str(path), "plan": str(plan), "tables": len(records)}


def _match_tables(saved: SavedCheckpoint, data: dict[str, Any], *, plan: Path) -> list[tuple[dict[str, Any], str]]:
    """Pairs each plan record with its table's weight key; errors name tables that differ."""
    weights = {table_of_key(k): k for k in saved.tensors if k.startswith("model.") and table_of_key(k) and k.endswith(".weight")}
    planned = {r["table"]: r for r in data["tables"]}
    missing, extra = sorted(set(weights) - set(planned)), sorted(set(planned) - set(weights))
    if missing or extra:
        raise CheckpointError(f"plan file '{plan}' does not match the checkpoint's tables: not planned {missing or 'none'}, "
                              f"not in the checkpoint {extra or 'none'}; plan for this model's tables")
    out = []
    for name, key in sorted(weights.items()):
        r = planned[name]
        if tuple(saved.tensors[key].size) != (r["rows"], r["dim"]):
            raise CheckpointError(f"plan file '{plan}': table '{name}' is {r['rows']} x {r['dim']} there, "
                                  f"{list(saved.tensors[key].size)} in the checkpoint")
        out.append((r, key))
    return out


def _write_tables(saved: SavedCheckpoint, writer: _Writer, records: list[tuple[dict[str, Any], str]], *, step: int) -> set[str]:
    """Writes each table's weight and optimizer state in its new layout; returns the keys written."""
    done: set[str] = set()
    for record, weight in records:
        md = saved.tensors[weight]
        rows, dim = md.size
        dp = record["sharding_type"] == "data_parallel"
        chunks = [_Chunk([0, 0], [rows, dim], 0)] if dp else [
            _Chunk(list(s["offsets"]), list(s["sizes"]), int(s["placement"].split("/")[0].split(":")[1])) for s in record["shards"]
        ]
        param = weight.removeprefix("model.")
        writer.tensor(weight, size=[rows, dim], dtype=md.properties.dtype, chunks=chunks,
                      fill=lambda box, k=weight: saved.read(k, box), path=("model", param))
        done.add(weight)
        done |= {k for k in saved.tensors if k.startswith(f"optim.state.{param}.")}
        _write_state(saved, writer, relayout.source_of(saved, weight), chunks=chunks, param=param, table=record["table"],
                     rows=rows, dim=dim, dp=dp, step=step)
    return done


def _write_state(saved: SavedCheckpoint, writer: _Writer, source: relayout.Source | None, *, chunks: list[_Chunk], param: str,
                 table: str, rows: int, dim: int, dp: bool, step: int) -> None:
    """The table's optimizer state as the new layout's optimizer holds it (nothing if there is none)."""
    if source is None:
        return
    state_key = f"optim.state.{param}.{'sum' if dp else f'{table}.momentum1'}"
    path = ("optim", "state", param, "sum" if dp else f"{table}.momentum1")
    f32 = torch.float32
    if source.elementwise:
        writer.tensor(state_key, size=[rows, dim], dtype=f32, chunks=chunks, fill=lambda box: saved.read(source.key, box), path=path)
    elif dp:
        writer.tensor(state_key, size=[rows, 1], dtype=f32, chunks=[_Chunk([0, 0], [rows, 1], 0)],
                      fill=lambda box: relayout.merged(saved, source, [(0, dim)], box), path=path)
    else:
        blocks = sorted({(c.offsets[1], c.offsets[1] + c.sizes[1]) for c in chunks})
        by_col = sorted(chunks, key=lambda c: c.offsets[1])
        flat = [_Chunk([i * rows], [rows], c.rank) for i, c in enumerate(by_col)] if len(blocks) > 1 else [
            _Chunk([c.offsets[0]], [c.sizes[0]], c.rank) for c in chunks
        ]
        writer.tensor(state_key, size=[rows * len(blocks)], dtype=f32, chunks=flat,
                      fill=lambda box: relayout.merged(saved, source, blocks, box), path=path)
    if dp:
        writer.tensor(f"optim.state.{param}.step", size=[], dtype=f32, chunks=[_Chunk([], [], 0)],
                      fill=lambda box: torch.tensor(float(step)), path=("optim", "state", param, "step"))


def _attach(src: Path, dst: Path, *, meta: dict[str, Any], plan: Path, world_size: int) -> None:
    """meta.json (new world size, where it came from), the new plan, and the job and feature statistics the checkpoint carried."""
    for name in ("config.yaml", "feature_stats.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    shutil.copyfile(plan, dst / "plan.json")
    new_meta = {**meta, "world_size": world_size, "resharded_from": str(src)}
    (dst / META_FILE).write_text(json.dumps(new_meta, indent=2) + "\n")
