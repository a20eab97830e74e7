"""Jagged sequences: a batch of variable-length sequences kept as one ``[T, ...]`` tensor of all
their tokens (oldest first within a row, rows one after another) and the rows' lengths ``[B]``,
without padding to the longest row.

Attention over such a batch is computed blockwise (:class:`JaggedBlocks`): each row is cut into
blocks of ``block`` tokens (its last block partly empty), and only the (query block, key block)
pairs of the same row with the key block not after the query block are multiplied. The work is
``O(sum_i L_i^2 + T * block)``, where padding every row to the longest costs ``B * L_max^2``.
Everything is plain tensor indexing and batched matmuls, so it runs on CPU and CUDA and autograd
differentiates it.

The functions here are leaves for the pipeline's tracer (``torch.fx.wrap``): they need concrete
lengths.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx


class JaggedBlocks(NamedTuple):
    """How the tokens of a jagged batch are cut into blocks, and which block pairs attend.

    ``NB`` blocks of ``block`` slots each; ``P`` (query block, key block) pairs.
    """

    token: torch.Tensor
    """``[NB, block]`` index of each slot's token in ``[0, T)``, or ``T`` for an empty slot."""
    valid: torch.Tensor
    """``[NB, block]`` whether a slot holds a token."""
    position: torch.Tensor
    """``[NB, block]`` each slot's position in its row (past the row's length for empty slots)."""
    query: torch.Tensor
    """``[P]`` query block of each pair."""
    key: torch.Tensor
    """``[P]`` key block of each pair: a block of the same row, not after the query block."""


@torch.fx.wrap
def jagged_positions(lengths: torch.Tensor) -> torch.Tensor:
    """``[T]``: each token's position in its row, for rows of ``lengths [B]``."""
    offsets = torch.cumsum(lengths, dim=0) - lengths
    total = int(lengths.sum())
    return torch.arange(total, device=lengths.device) - torch.repeat_interleave(offsets, lengths, output_size=total)


@torch.fx.wrap
def jagged_prefix(values: torch.Tensor, lengths: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row cut to its first ``max_len`` tokens: ``(values [T', ...], lengths [B])``, as
    right-padding to ``max_len`` cuts. Returns the inputs themselves when no row is longer."""
    if not bool((lengths > max_len).any()):
        return values, lengths
    keep = jagged_positions(lengths) < max_len
    return values[keep], lengths.clamp(max=max_len)


@torch.fx.wrap
def jagged_last(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[B, ...]``: each row's last token of ``values [T, ...]`` (zeros for an empty row)."""
    ends = (torch.cumsum(lengths, dim=0) - 1).clamp(min=0)
    picked = values[ends] if values.size(0) else values.new_zeros((lengths.size(0), *values.shape[1:]))
    keep = (lengths > 0).view(-1, *([1] * (values.dim() - 1)))
    return torch.where(keep, picked, torch.zeros_like(picked))


@torch.fx.wrap
def jagged_next(values: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What each token predicts: the next token of its row, and the row's ``target [B, ...]`` after
    its last token. ``values [T, ...]`` -> ``[T, ...]``."""
    if not values.size(0):
        return values
    shifted = torch.cat([values[1:], values[:1]], dim=0)
    ends = torch.cumsum(lengths, dim=0) - 1
    rows = lengths > 0
    return shifted.index_copy(0, ends[rows], target[rows].to(values.dtype))


@torch.fx.wrap
def jagged_blocks(lengths: torch.Tensor, block: int) -> JaggedBlocks:
    """Cuts rows of ``lengths [B]`` into blocks of ``block`` slots; pairs every query block with
    each key block of its row up to itself."""
    device = lengths.device
    lengths = lengths.long()
    total = int(lengths.sum())
    blocks = (lengths + block - 1) // block  # per row
    num_blocks = int(blocks.sum())
    row = torch.repeat_interleave(torch.arange(lengths.size(0), device=device), blocks, output_size=num_blocks)
    first = torch.cumsum(blocks, dim=0) - blocks  # each row's first block
    within = torch.arange(num_blocks, device=device) - first[row]  # block index inside its row
    position = within.unsqueeze(1) * block + torch.arange(block, device=device).unsqueeze(0)
    valid = position < lengths[row].unsqueeze(1)
    offsets = torch.cumsum(lengths, dim=0) - lengths
    token = torch.where(valid, offsets[row].unsqueeze(1) + position, torch.full_like(position, total))
    # Query block ``within`` of a row attends to that row's blocks 0..within.
    count = within + 1
    num_pairs = int(count.sum())
    query = torch.repeat_interleave(torch.arange(num_blocks, device=device), count, output_size=num_pairs)
    start = torch.cumsum(count, dim=0) - count
    key = first[row[query]] + torch.arange(num_pairs, device=device) - start[query]
    return JaggedBlocks(token=token, valid=valid, position=position, query=query, key=key)


@torch.fx.wrap
def to_blocks(values: torch.Tensor, blocks: JaggedBlocks) -> torch.Tensor:
    """``values [T, ...]`` -> ``[NB, block, ...]``, empty slots zero."""
    padded = torch.cat([values, values.new_zeros((1, *values.shape[1:]))], dim=0)
    return padded[blocks.token]


@torch.fx.wrap
def from_blocks(values: torch.Tensor, blocks: JaggedBlocks) -> torch.Tensor:
    """``values [NB, block, ...]`` -> ``[T, ...]``: the slots that hold tokens, in token order."""
    return values[blocks.valid]
