"""Sparse feature decoding: one feature's columns of a row group -> int32 lengths, int64 ids, weights.

Every kind of SparseFeature lands here: single ids and multi-hot lists (hashed or bounds-checked),
weighted ids, sequences cut to their most recent ``max_len`` ids, bucketized numbers and crossed
(combo) ids. Everything is vectorized with numpy/pyarrow: this is on the training input path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardrec.data.hashing import fnv1a64, hash_ids, is_string_type, splitmix64
from shardrec.data.schema import FeatureSchema, SparseFeature
from shardrec.errors import DataError

_LIST_TYPES = (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)


@dataclass
class SparseColumn:
    """One feature's ids for the rows of a chunk."""

    lengths: np.ndarray
    """int32 ids per row."""
    values: np.ndarray
    """int64 ids, row after row."""
    weights: np.ndarray | None = None
    """float32 weight per id, for weighted features."""


@dataclass(frozen=True)
class _Where:
    """Names the place of an error: file and row group, feature and its YAML key."""

    place: str
    feature: SparseFeature
    index: int

    def error(self, problem: str, fix: str) -> DataError:
        f = self.feature
        return DataError(f"{self.place}: feature '{f.name}' (features.sparse[{self.index}]) {problem}; {fix}")


def decode_sparse(table: pa.Table, f: SparseFeature, index: int, schema: FeatureSchema, place: str) -> SparseColumn:
    """Decodes feature ``f`` (``features.sparse[index]``) from ``table``; ``place`` names file and row group."""
    where = _Where(place, f, index)
    if f.negatives is not None:
        # Drawn per training batch (shardrec.data.negatives); empty in the data itself.
        return SparseColumn(np.zeros(table.num_rows, dtype=np.int32), np.zeros(0, dtype=np.int64))
    rows = None if f.raw else schema.table(f.table).num_embeddings  # type: ignore[arg-type]
    if f.cross:
        col = _crossed(table, f.cross, rows, where)
    elif f.bucketized:
        col = _bucketized(_column(table, f.column), f.bucket_boundaries, where)
    else:
        col = _ids_column(table, f, rows, where)
    if f.max_len is not None:
        col = _keep_last(col, f.max_len)
    return col


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()  # combining one chunk still copies
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def _ids_column(table: pa.Table, f: SparseFeature, rows: int | None, where: _Where) -> SparseColumn:
    arr = _column(table, f.column)
    is_list = isinstance(arr, _LIST_TYPES)
    if f.sequence and not is_list:
        raise where.error(f"reads column '{f.column}' of type {arr.type}, not a list", "a sequence feature needs a list column (one history per row)")
    if is_list:
        lengths, items, keep = _flatten(arr)
    else:
        valid = arr.is_valid().to_numpy(zero_copy_only=False)
        lengths, items, keep = valid.astype(np.int32), arr, valid
    ids = _to_ids(items.filter(pa.array(keep)) if not keep.all() else items, f, rows, where)
    weights = _weights(table, f, arr, keep, where) if f.weights else None
    return SparseColumn(lengths, ids, weights)


def _flatten(arr: pa.Array) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """Lengths after dropping null items, all flattened items, and the mask of kept items."""
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy().astype(np.int32)
    items = pc.list_flatten(arr)
    if pa.types.is_dictionary(items.type):
        items = items.dictionary_decode()
    if not items.null_count:  # the usual case: no mask to compute
        return lengths, items, np.ones(len(items), dtype=bool)
    keep = items.is_valid().to_numpy(zero_copy_only=False)
    if not keep.all():
        parents = np.repeat(np.arange(len(arr)), lengths)
        lengths = np.bincount(parents[keep], minlength=len(arr)).astype(np.int32)
    return lengths, items, keep


def _to_ids(items: pa.Array, f: SparseFeature, rows: int | None, where: _Where) -> np.ndarray:
    if f.hash:
        return hash_ids(items, rows)
    if is_string_type(items.type):
        raise where.error("holds strings", f"set features.sparse[{where.index}].hash: true to hash them into the table")
    ids = items.to_numpy()
    if rows is None:  # a raw feature: any integers
        return ids.astype(np.int64, copy=False)
    bad = (ids < 0) | (ids >= rows)
    if bad.any():
        raise where.error(
            f"has id {ids[bad][0]}, outside [0, {rows}) of table '{f.table}'",
            f"set features.sparse[{where.index}].hash: true to hash raw ids, or raise num_embeddings of table "
            f"'{f.table}' in features.tables",
        )
    return ids.astype(np.int64, copy=False)


def _weights(table: pa.Table, f: SparseFeature, ids: pa.Array, keep: np.ndarray, where: _Where) -> np.ndarray:
    """Weights aligned with the kept ids; lists must match the id lists row by row."""
    w = _column(table, f.weights)  # type: ignore[arg-type]
    if isinstance(ids, _LIST_TYPES) != isinstance(w, _LIST_TYPES):
        raise where.error(f"has weights column '{f.weights}' of type {w.type} for ids of type {ids.type}", "give one weight per id: a list column for list ids")
    if isinstance(w, _LIST_TYPES):
        id_len = pc.list_value_length(ids).fill_null(0).to_numpy()
        w_len = pc.list_value_length(w).fill_null(0).to_numpy()
        if (id_len != w_len).any():
            row = int(np.argmax(id_len != w_len))
            raise where.error(f"row {row} has {id_len[row]} ids but {w_len[row]} weights in '{f.weights}'", "give one weight per id")
        w = pc.list_flatten(w)
    if not pa.types.is_floating(w.type) and not pa.types.is_integer(w.type):
        raise where.error(f"has weights column '{f.weights}' of type {w.type}", "weights must be numbers")
    values = pc.cast(w, pa.float32()).fill_null(0.0).to_numpy(zero_copy_only=False)
    return values[keep]


def _bucketized(arr: pa.Array, boundaries: list[float], where: _Where) -> SparseColumn:
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise where.error(f"bucketizes column of type {arr.type}", "boundaries need a numeric column")
    x = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    valid = ~np.isnan(x)
    ids = np.searchsorted(np.asarray(boundaries, dtype=np.float64), x[valid], side="right").astype(np.int64)
    return SparseColumn(valid.astype(np.int32), ids)


_CROSS_MULT = np.uint64(0x9E3779B97F4A7C15)


def _crossed(table: pa.Table, columns: list[str], rows: int, where: _Where) -> SparseColumn:
    """Hash of the row's values of every ``columns`` entry; rows with a null part get no id."""
    h = np.zeros(table.num_rows, dtype=np.uint64)
    valid = np.ones(table.num_rows, dtype=bool)
    for name in columns:
        arr = _column(table, name)
        if isinstance(arr, _LIST_TYPES):
            raise where.error(f"crosses list column '{name}'", "cross single-id columns only")
        valid &= arr.is_valid().to_numpy(zero_copy_only=False)
        part = arr.fill_null("" if is_string_type(arr.type) else 0)
        raw = fnv1a64(part) if is_string_type(arr.type) else splitmix64(part.to_numpy())
        with np.errstate(over="ignore"):
            h = splitmix64(h * _CROSS_MULT + raw)
    ids = (h[valid] % np.uint64(rows)).astype(np.int64)
    return SparseColumn(valid.astype(np.int32), ids)


def _keep_last(col: SparseColumn, max_len: int) -> SparseColumn:
    """Cuts every row to its last ``max_len`` ids (the most recent, for a history ordered oldest first)."""
    if not len(col.lengths) or col.lengths.max(initial=0) <= max_len:
        return col
    starts = np.cumsum(col.lengths, dtype=np.int64) - col.lengths
    excess = col.lengths.astype(np.int64) - max_len
    cut = excess > 0
    # +1 where a long row's dropped ids begin, -1 where its kept ones begin: a running sum marks the dropped.
    marks = np.zeros(len(col.values) + 1, dtype=np.int32)
    marks[starts[cut]] += 1
    marks[starts[cut] + excess[cut]] -= 1
    keep = np.cumsum(marks[:-1]) == 0
    new_len = np.minimum(col.lengths, max_len).astype(np.int32)
    return SparseColumn(new_len, col.values[keep], None if col.weights is None else col.weights[keep])
