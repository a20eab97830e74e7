"""Decoding: a table of one row group (slice) -> numpy arrays per feature, and batches cut from them.

Dense features become float32 columns (nulls filled or rejected, optional log1p), labels 0/1
float32, and each sparse feature int32 lengths and int64 ids (hashed, bounds-checked, bucketized,
crossed, truncated), plus float32 weights for weighted features. ``Assembler`` then cuts batches of
any size from a queue of decoded chunks, across row group and file boundaries.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.batch import Batch
from shardrec.data.hashing import hash_ids
from shardrec.data.schema import FeatureSchema, SparseFeature
from shardrec.errors import DataError

# ---------------------------------------------------------------------------------------------
# Decoding one row group (slice) into numpy arrays.


@dataclass
class Chunk:
    """Decoded rows of one row group slice; sparse arrays are per key, in schema order."""

    dense: np.ndarray
    labels: np.ndarray
    lengths: list[np.ndarray]
    offsets: list[np.ndarray]
    values: list[np.ndarray]

    @property
    def rows(self) -> int:
        return len(self.labels)


def decode(table: pa.Table, schema: FeatureSchema, where: str) -> Chunk:
    """Decodes a table of the schema's columns; ``where`` names the file and row group in errors."""
    lengths, offsets, values = [], [], []
    for i, f in enumerate(schema.sparse):
        n, v = _decode_sparse(table.column(f.name).combine_chunks(), f, i, schema, where)
        lengths.append(n)
        offsets.append(np.concatenate(([0], np.cumsum(n, dtype=np.int64))))
        values.append(v)
    return Chunk(
        dense=_decode_dense(table, schema, where),
        labels=_decode_labels(table.column(schema.label), schema.label, where),
        lengths=lengths,
        offsets=offsets,
        values=values,
    )


def _to_float32(col: pa.ChunkedArray) -> np.ndarray:
    """float32 values with NaN for nulls."""
    return pc.cast(col, pa.float32(), safe=False).to_numpy()


def _decode_dense(table: pa.Table, schema: FeatureSchema, where: str) -> np.ndarray:
    out = np.empty((table.num_rows, len(schema.dense)), dtype=np.float32)
    for i, f in enumerate(schema.dense):
        x = _to_float32(table.column(f.name))
        missing = np.isnan(x)
        if missing.any():
            if f.fill_missing is None:
                raise DataError(
                    f"{where}: column '{f.name}' has {int(missing.sum())} null or NaN values; "
                    f"set features.dense[{i}].fill_missing to the value to use for them"
                )
            x = np.where(missing, np.float32(f.fill_missing), x)
        if f.transform == "log1p":
            x = np.log1p(np.maximum(x, 0))
        out[:, i] = x
    return out


def _decode_labels(col: pa.ChunkedArray, name: str, where: str) -> np.ndarray:
    y = _to_float32(col)
    bad = (y != 0) & (y != 1)
    if bad.any():
        value = y[bad][0]
        shown = "null/NaN" if np.isnan(value) else repr(float(value))
        raise DataError(
            f"{where}: label column '{name}' holds {shown}; "
            "labels must be 0 or 1: fix the data or set features.label to the 0/1 column"
        )
    return y


def _decode_sparse(
    arr: pa.Array, f: SparseFeature, index: int, schema: FeatureSchema, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """int32 lengths per row and int64 ids of one sparse column."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if isinstance(arr, (pa.ListArray, pa.LargeListArray, pa.FixedSizeListArray)):
        lengths, items = _flatten_lists(arr)
    elif arr.null_count:
        lengths = arr.is_valid().to_numpy(zero_copy_only=False).astype(np.int32)
        items = arr.drop_null()
    else:
        lengths, items = np.ones(len(arr), dtype=np.int32), arr
    return lengths, _ids(items, f, index, schema, where)


def _flatten_lists(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Lengths (null list: 0) and the flattened items, dropping null items inside lists."""
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy().astype(np.int32)
    items = pc.list_flatten(arr)
    if pa.types.is_dictionary(items.type):
        items = items.dictionary_decode()
    if items.null_count:
        keep = items.is_valid().to_numpy(zero_copy_only=False)
        parents = np.repeat(np.arange(len(arr)), lengths)
        lengths = np.bincount(parents[keep], minlength=len(arr)).astype(np.int32)
        items = items.filter(keep)
    return lengths, items


def _ids(items: pa.Array, f: SparseFeature, index: int, schema: FeatureSchema, where: str) -> np.ndarray:
    rows = schema.table(f.table).num_embeddings
    if f.hash:
        return hash_ids(items, rows)
    ids = items.to_numpy()
    bad = (ids < 0) | (ids >= rows)
    if bad.any():
        raise DataError(
            f"{where}: feature '{f.name}' (features.sparse[{index}]) has id {ids[bad][0]}, outside [0, {rows}) of "
            f"table '{f.table}'; set features.sparse[{index}].hash: true to hash raw ids, or raise "
            f"num_embeddings of table '{f.table}' in features.tables"
        )
    return ids.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------
# Cutting batches out of decoded chunks.


class Assembler:
    """Queues decoded chunks and cuts batches of any size from their front."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = keys
        self._parts: deque[tuple[Chunk, int]] = deque()
        self.rows = 0

    def add(self, chunk: Chunk) -> None:
        self._parts.append((chunk, 0))
        self.rows += chunk.rows

    def take(self, size: int) -> Batch:
        """Removes the first ``size`` queued rows and returns them as a Batch."""
        spans = self._pop(size)
        num_keys = len(self._keys)
        lengths = [c.lengths[k][a:b] for k in range(num_keys) for c, a, b in spans]
        values = [c.values[k][c.offsets[k][a] : c.offsets[k][b]] for k in range(num_keys) for c, a, b in spans]
        return Batch(
            dense_features=torch.from_numpy(np.concatenate([c.dense[a:b] for c, a, b in spans])),
            sparse_features=KeyedJaggedTensor(
                keys=self._keys,
                values=torch.from_numpy(_cat(values, np.int64)),
                lengths=torch.from_numpy(_cat(lengths, np.int32)),
                stride=size,
            ),
            labels=torch.from_numpy(np.concatenate([c.labels[a:b] for c, a, b in spans])),
        )

    def _pop(self, size: int) -> list[tuple[Chunk, int, int]]:
        assert 0 < size <= self.rows, (size, self.rows)
        spans = []
        while size:
            chunk, start = self._parts.popleft()
            end = min(chunk.rows, start + size)
            spans.append((chunk, start, end))
            if end < chunk.rows:
                self._parts.appendleft((chunk, end))
            size -= end - start
            self.rows -= end - start
        return spans


def _cat(arrays: list[np.ndarray], dtype: type[np.generic]) -> np.ndarray:
    """Concatenation that also accepts no arrays (a schema without sparse features)."""
    return np.concatenate(arrays, dtype=dtype) if arrays else np.empty(0, dtype=dtype)


