"""Plan-independent table initialization: any split of a table into slices gives the same values."""

from __future__ import annotations

import math

import pytest
import torch

from shardrec.train.weight_init import table_block, table_slice

ROWS = 70_000  # more than one 65,536-row block
DIM = 4
BLOCK = 65_536


def _full(seed: int = 0, table: str = "t", rows: int = ROWS, dim: int = DIM) -> torch.Tensor:
    return table_slice(seed, table, rows=rows, dim=dim, offsets=[0, 0], sizes=[rows, dim])


def _split(row_cuts: list[int], col_cuts: list[int], *, rows: int = ROWS, dim: int = DIM) -> torch.Tensor:
    """The table rebuilt from the slices between consecutive cuts."""
    bands = []
    for r0, r1 in zip(row_cuts, row_cuts[1:]):
        pieces = [
            table_slice(0, "t", rows=rows, dim=dim, offsets=[r0, c0], sizes=[r1 - r0, c1 - c0])
            for c0, c1 in zip(col_cuts, col_cuts[1:])
        ]
        for piece, (c0, c1) in zip(pieces, zip(col_cuts, col_cuts[1:])):
            assert piece.shape == (r1 - r0, c1 - c0)
        bands.append(torch.cat(pieces, dim=1))
    return torch.cat(bands, dim=0)


def test_full_table_shape_and_blocks() -> None:
    full = _full()
    assert full.shape == (ROWS, DIM) and full.dtype == torch.float32
    # The full table is exactly its blocks one after another.
    blocks = [table_block(0, "t", b, rows=ROWS, dim=DIM) for b in range(2)]
    assert [b.shape[0] for b in blocks] == [BLOCK, ROWS - BLOCK]
    assert torch.equal(full, torch.cat(blocks))


@pytest.mark.parametrize(
    ("row_cuts", "col_cuts"),
    [
        ([0, ROWS], [0, DIM]),  # whole table
        ([0, 17_500, 35_000, 52_500, ROWS], [0, DIM]),  # row-wise over 4 ranks, last crosses the block boundary
        ([0, 65_535, 65_537, ROWS], [0, DIM]),  # two rows straddling the boundary
        ([0, BLOCK, ROWS], [0, DIM]),  # cut exactly at the boundary
        ([0, BLOCK - 1, BLOCK, BLOCK + 1, ROWS], [0, 1, 3, DIM]),  # single-row slices and column splits
        ([0, ROWS], [0, 2, DIM]),  # column-wise
        ([0, 23_334, 46_668, ROWS], [0, 1, 2, 3, DIM]),  # grid
        ([0, 1, 2, ROWS - 1, ROWS], [0, DIM]),
    ],
)
def test_any_split_concatenates_to_the_full_table(row_cuts: list[int], col_cuts: list[int]) -> None:
    assert torch.equal(_split(row_cuts, col_cuts), _full())


def test_random_splits_concatenate_to_the_full_table() -> None:
    gen = torch.Generator().manual_seed(123)
    full = _full()
    for _ in range(5):
        inner = sorted(set(torch.randint(1, ROWS, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()))
        col_inner = sorted(set(torch.randint(1, DIM, (2,), generator=gen).tolist()))
        assert torch.equal(_split([0, *inner, ROWS], [0, *col_inner, DIM]), full)


def test_slice_values_at_offsets() -> None:
    full = _full()
    piece = table_slice(0, "t", rows=ROWS, dim=DIM, offsets=[65_000, 1], sizes=[1_000, 2])
    assert torch.equal(piece, full[65_000:66_000, 1:3])


def test_empty_slice() -> None:
    piece = table_slice(0, "t", rows=ROWS, dim=DIM, offsets=[BLOCK, 0], sizes=[0, DIM])
    assert piece.shape == (0, DIM)


@pytest.mark.parametrize("rows", [1, 10, ROWS])
def test_values_within_bound(rows: int) -> None:
    full = _full(rows=rows)
    bound = math.sqrt(1.0 / rows)
    assert float(full.abs().max()) <= bound
    if rows >= 10:
        # Uniform over the whole range, not a constant or a narrow band.
        assert float(full.max()) > 0.8 * bound and float(full.min()) < -0.8 * bound
        assert float(full.std()) > 0.4 * bound


def test_deterministic() -> None:
    assert torch.equal(_full(seed=7, table="t_C1"), _full(seed=7, table="t_C1"))


def test_tables_and_seeds_differ() -> None:
    base = _full(seed=0, table="t_C1")
    assert not torch.equal(base, _full(seed=1, table="t_C1"))
    assert not torch.equal(base, _full(seed=0, table="t_C2"))
    # Different blocks of one table differ too (each block has its own generator).
    assert not torch.equal(base[:100], base[BLOCK : BLOCK + 100])
    # The fraction of equal entries is what independent draws give: essentially none.
    assert float((base == _full(seed=1, table="t_C1")).float().mean()) < 1e-3


def test_same_table_name_same_values_regardless_of_width_slicing() -> None:
    # The values of a column do not depend on which other columns are requested.
    narrow = table_slice(3, "x", rows=ROWS, dim=DIM, offsets=[0, 2], sizes=[ROWS, 1])
    assert torch.equal(narrow, _full(seed=3, table="x")[:, 2:3])
