"""The optimizer state of a table follows it into another layout (sharding type, plan, world size).

DCP reshards tensors whose global shape stays the same; the fused optimizer's per-row state does
not always keep its shape. Row-wise Adagrad keeps one accumulator per row and *per column shard*:
a column-wise table split into S shards holds it as ``[rows * S]`` (shard i, in column order, at
``[i * rows, (i + 1) * rows)``), a table-wise or row-wise one as ``[rows]``, and a data-parallel
table (trained by the non-fused optimizer) as ``sum`` of shape ``[rows, 1]``.

The conversion views every form as one accumulator per (row, column block) and

- merges blocks by their width: a row's accumulator over columns [a, b) is the width-weighted mean
  of the accumulators of the old blocks overlapping [a, b). Row-wise Adagrad adds the *mean*
  squared gradient over a block's columns each step, so merging S column shards into one is exact;
- splits a block by copying its accumulator to each new block (the best estimate there is: the
  mean over part of the columns is not stored).

Element-wise state (Adagrad's ``momentum1`` / ``sum`` of shape ``[rows, dim]``) keeps its shape
and only changes its key between the fused and the data-parallel optimizer; it is copied as is.
A data-parallel table's ``step`` counter, absent from fused state, is set to the checkpoint's step.
State that fits none of these (e.g. another optimizer's) starts from zero, with a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from shardrec.checkpoint.dcp_reader import Box, SavedCheckpoint

OPTIM_PREFIX = "optim.state."
Blocks = list[tuple[int, int]]


@dataclass
class Source:
    """A table's optimizer state in the checkpoint: row-wise (per column block) or element-wise."""

    key: str
    blocks: Blocks
    rows: int
    elementwise: bool

    def rowwise(self, saved: SavedCheckpoint, block: int, r0: int, r1: int) -> torch.Tensor:
        md = saved.tensors[self.key]
        if len(md.size) == 2:  # data-parallel "sum" [rows, 1]
            return saved.read(self.key, ((r0, r1), (0, 1))).flatten()
        base = block * self.rows
        return saved.read(self.key, ((base + r0, base + r1),))


def param_of(key: str) -> str:
    """``optim.state.<param>.<state>`` -> the parameter's model key ``model.<param>`` (tables only)."""
    param = key.removeprefix(OPTIM_PREFIX).split(".weight.", 1)[0] + ".weight"
    return "model." + param


def convert(saved: SavedCheckpoint, flat: dict[str, Any], keys: list[str], *, step: int) -> list[str]:
    """Fills ``flat[k]`` (in place) for each optimizer-state key ``k`` in ``keys`` from the checkpoint's
    state of the same table held in another layout. Returns the keys it could not convert; those
    keep their current (fresh, zero) values."""
    failed = []
    for key in keys:
        value = flat[key]
        source = source_of(saved, param_of(key))
        if key.endswith(".step"):
            _fill(value, lambda box: torch.full([b - a for a, b in box], float(step)))
        elif source is None or not isinstance(value, (torch.Tensor, ShardedTensor)):
            failed.append(key)
        elif source.elementwise and math.prod(value.size()) == math.prod(saved.tensors[source.key].size):
            _fill(value, lambda box, k=source.key: saved.read(k, box).reshape([b - a for a, b in box]))
        elif not source.elementwise and _is_rowwise(value, source.rows):
            blocks = target_blocks(flat[param_of(key)])
            _fill(value, lambda box, s=source, t=blocks: merged(saved, s, t, box))
        else:
            failed.append(key)
    return failed


def source_of(saved: SavedCheckpoint, weight: str) -> Source | None:
    """The checkpoint's optimizer state of the table whose weight has model key ``weight``, if any."""
    weight_md = saved.tensors.get(weight)
    if weight_md is None or len(weight_md.size) != 2:
        return None
    rows, dim = weight_md.size
    blocks = sorted({(c.offsets[1], c.offsets[1] + c.sizes[1]) for c in weight_md.chunks})
    head = OPTIM_PREFIX + weight.removeprefix("model.") + "."
    for k, md in saved.tensors.items():
        if not k.startswith(head) or k.endswith(".step"):
            continue
        size = tuple(md.size)
        if size == (rows, dim):
            return Source(k, [(0, dim)], rows, elementwise=True)
        if size == (rows, 1):
            return Source(k, [(0, dim)], rows, elementwise=False)
        if size == (rows * len(blocks),):
            return Source(k, blocks if len(blocks) > 1 else [(0, dim)], rows, elementwise=False)
    return None


def target_blocks(weight: Any) -> Blocks:
    """Column blocks of the target table: its shards' column ranges (one block if not sharded by column)."""
    if isinstance(weight, ShardedTensor):
        found = sorted({(m.shard_offsets[1], m.shard_offsets[1] + m.shard_sizes[1]) for m in weight.metadata().shards_metadata})
        return found
    return [(0, weight.shape[1])]


def _is_rowwise(value: Any, rows: int) -> bool:
    size = tuple(value.size())
    return len(size) == 1 and size[0] % rows == 0 or size == (rows, 1)


def merged(saved: SavedCheckpoint, source: Source, target: Blocks, box: Box) -> torch.Tensor:
    """Target row-wise state for ``box``: flat positions over (block, row), or ``[rows, 1]``."""
    if len(box) == 2:  # data-parallel "sum" [rows, 1]: one block over all columns
        (r0, r1), _ = box
        return _block_value(saved, source, target[0][0], target[-1][1], r0, r1).unsqueeze(1)
    (g0, g1), = box
    parts = []
    while g0 < g1:
        block, r0 = divmod(g0, source.rows)
        r1 = min(source.rows, r0 + g1 - g0)
        a, b = target[block]
        parts.append(_block_value(saved, source, a, b, r0, r1))
        g0 += r1 - r0
    return torch.cat(parts)


def _block_value(saved: SavedCheckpoint, source: Source, a: int, b: int, r0: int, r1: int) -> torch.Tensor:
    """Width-weighted mean over columns [a, b) of the source blocks' accumulators, rows [r0, r1)."""
    total = torch.zeros(r1 - r0, dtype=torch.float64)
    for i, (c0, c1) in enumerate(source.blocks):
        overlap = min(b, c1) - max(a, c0)
        if overlap > 0:
            total += overlap * source.rowwise(saved, i, r0, r1).double()
    return (total / (b - a)).float()


def _fill(value: Any, compute: Any) -> None:
    """Writes ``compute(box)`` into every local part of ``value`` (a ShardedTensor's shards or a tensor)."""
    if isinstance(value, ShardedTensor):
        for shard in value.local_shards():
            m = shard.metadata
            box = tuple((o, o + n) for o, n in zip(m.shard_offsets, m.shard_sizes))
            shard.tensor.copy_(compute(box).to(shard.tensor.dtype))
    else:
        box = tuple((0, n) for n in value.shape)
        value.copy_(compute(box).to(value.dtype))
