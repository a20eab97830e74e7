"""``shardrec checkpoint export``: a checkpoint's tables as plain, unsharded tensor files.

One ``<table>.pt`` per embedding table (a ``[rows, dim]`` tensor that ``torch.load(f,
weights_only=True)`` reads, ``mmap=True`` without reading it all), ``dense.pt`` with every other
model tensor, and ``manifest.json``. Tables are streamed a block of rows at a time: the tensor
file's header is written first with an unallocated placeholder (``torch.serialization.skip_data``),
then its bytes are filled in place from the checkpoint's shards, so a table larger than memory is
never held whole. The folder appears under its final name only once complete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from shardrec.output import atomic_folder
from shardrec.checkpoint.store import open_for_rewrite, table_of_key
from shardrec.checkpoint.dcp_reader import SavedCheckpoint, find_data

BLOCK_BYTES = 64 << 20
"""Rows are copied in blocks of about this many bytes: the exporter's working memory."""
MANIFEST = "manifest.json"


def export_checkpoint(path: Path, out: Path, *, block_bytes: int = BLOCK_BYTES) -> dict[str, Any]:
    """Writes the tables and dense tensors of checkpoint ``path`` (a run or step folder) to ``out``."""
    path, meta, saved = open_for_rewrite(path, out=out, label="export folder")
    tables = _table_keys(saved)
    with atomic_folder(out) as tmp:
        manifest = {"checkpoint": str(path), "step": meta.get("step"), "model": meta.get("model"), "tables": {}}
        for name, key in tables.items():
            rows, dim = saved.tensors[key].size
            file = f"{_safe(name)}.pt"
            stream_table(saved, key, tmp / file, block_bytes=block_bytes)
            manifest["tables"][name] = {"file": file, "key": key.removeprefix("model."), "rows": rows, "dim": dim,
                                        "dtype": str(saved.tensors[key].properties.dtype).removeprefix("torch.")}
        dense = {k.removeprefix("model."): saved.read(k) for k in saved.tensors if k.startswith("model.") and k not in tables.values()}
        torch.save(dense, tmp / "dense.pt")
        manifest["dense"] = {"file": "dense.pt", "tensors": sorted(dense)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def stream_table(saved: SavedCheckpoint, key: str, file: Path, *, block_bytes: int) -> None:
    """Writes tensor ``key`` of ``saved`` to ``file`` in torch.save format, a block of rows at a time."""
    md = saved.tensors[key]
    rows, dim = md.size
    placeholder = torch.empty(rows, dim, dtype=md.properties.dtype)  # never touched: costs no memory
    with torch.serialization.skip_data():
        torch.save(placeholder, file)
    stored = find_data(file, 0, file.stat().st_size, key=key)
    row_bytes = dim * placeholder.element_size()
    step = max(1, block_bytes // max(row_bytes, 1))
    with open(file, "r+b") as f:
        f.seek(stored.data_offset)
        for r0 in range(0, rows, step):
            block = saved.read(key, ((r0, min(rows, r0 + step)), (0, dim)))
            f.write(block.contiguous().view(torch.uint8).numpy())


def _table_keys(saved: SavedCheckpoint) -> dict[str, str]:
    """Table name -> model key of its weight; the full key names a table whose name repeats."""
    keys = [k for k in saved.tensors if k.startswith("model.") and k.endswith(".weight") and table_of_key(k) is not None]
    names = [table_of_key(k) for k in keys]
    return {(n if names.count(n) == 1 else k.removeprefix("model.")): k for n, k in zip(names, keys)}  # type: ignore[misc]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
