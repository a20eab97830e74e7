"""Initialization that does not depend on the sharding plan.

Each rank of a sharded model initializes only its own shards, so by default the initial weights
depend on the plan. Here each table is filled from a generator seeded by (seed, table, row block),
and each rank computes just the row blocks its shards cover: the same table gets the same values
under every plan and world size, and no rank ever materializes a whole table.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from shardrec.train.running_stats import reset_running_stats

_BLOCK_ROWS = 65_536


def table_block(seed: int, table: str, block: int, *, rows: int, dim: int) -> torch.Tensor:
    """Rows ``[block * 65536, ...)`` of table ``table``: uniform in +-sqrt(1/rows), like torchrec's default."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{table}/{block}".encode()))
    n = min(_BLOCK_ROWS, rows - block * _BLOCK_ROWS)
    bound = math.sqrt(1.0 / rows)
    return torch.empty(n, dim).uniform_(-bound, bound, generator=gen)


def table_slice(seed: int, table: str, *, rows: int, dim: int, offsets: list[int], sizes: list[int]) -> torch.Tensor:
    """The ``sizes`` block at ``offsets`` of table ``table`` of shape ``[rows, dim]``."""
    r0, c0 = offsets
    r1, c1 = r0 + sizes[0], c0 + sizes[1]
    parts = []
    for block in range(r0 // _BLOCK_ROWS, (max(r1, 1) - 1) // _BLOCK_ROWS + 1):
        start = block * _BLOCK_ROWS
        t = table_block(seed, table, block, rows=rows, dim=dim)
        parts.append(t[max(r0 - start, 0) : r1 - start, c0:c1])
    return torch.cat(parts) if parts else torch.empty(0, c1 - c0)


@torch.no_grad()
def init_tables(model: nn.Module, *, seed: int, tables: dict[str, tuple[int, int]]) -> None:
    """Fills every embedding table of a (sharded) model in place; ``tables`` maps name -> (rows, dim)."""
    for key, value in model.state_dict().items():
        name = _table_of(key, tables)
        if name is None:
            continue
        rows, dim = tables[name]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                md = shard.metadata
                shard.tensor.copy_(
                    table_slice(seed, name, rows=rows, dim=dim, offsets=md.shard_offsets, sizes=md.shard_sizes)
                )
        else:
            value.copy_(table_slice(seed, name, rows=rows, dim=dim, offsets=[0, 0], sizes=[rows, dim]))


def _table_of(key: str, tables: dict[str, tuple[int, int]]) -> str | None:
    parts = key.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-3] in ("embedding_bags", "embeddings"):
        return parts[-2] if parts[-2] in tables else None
    return None


@torch.no_grad()
def init_dense(model: nn.Module, *, seed: int) -> None:
    """Re-initializes every dense layer with ``reset_parameters`` in module order from ``seed``,
    then every running statistic (BatchNorm's, Dice's) to its initial value, those of modules
    without parameters too (DistributedModelParallel leaves their buffers zero), then lets each
    module with an ``init_pretrained(seed=...)`` load its pretrained weights.

    Same values on every rank and under every plan, since the plan does not change the order.
    """
    torch.manual_seed(seed)
    modules = sorted(model.named_modules(), key=lambda kv: _unwrapped_name(kv[0]))
    for _, module in modules:
        if hasattr(module, "reset_parameters") and not _is_embedding(module):
            if any(p.numel() for p in module.parameters(recurse=False)):
                module.reset_parameters()
    reset_running_stats(model)
    for _, module in modules:
        # Pretrained parts (HLLM's language models and their item buffers) load their own weights.
        if callable(getattr(module, "init_pretrained", None)):
            module.init_pretrained(seed=seed)


def _unwrapped_name(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in ("_dmp_wrapped_module", "module"))


def _is_embedding(module: nn.Module) -> bool:
    return type(module).__name__ in ("EmbeddingBag", "Embedding") or "Sharded" in type(module).__name__
