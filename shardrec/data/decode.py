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
from shardrec.data.schema import FeatureSchema
from shardrec.data.sparse import SparseColumn, decode_sparse
from shardrec.errors import DataError

# ---------------------------------------------------------------------------------------------
# Decoding one row group (slice) into numpy arrays.


@dataclass
class Chunk:
    """Decoded rows of one row group slice; sparse columns in schema order."""

    dense: np.ndarray
    labels: np.ndarray
    """``[rows]`` for one label, ``[rows, tasks]`` for several, ``[rows, 0]`` when read without labels."""
    sparse: list[SparseColumn]
    offsets: list[np.ndarray]
    """Per sparse column: row offsets into its values (rows + 1 entries)."""
    plain_lengths: np.ndarray | None = None
    """``[unweighted features, rows]`` lengths, key-major like a KJT: a batch is one slice of it."""
    plain_values: np.ndarray | None = None
    """``[unweighted features, rows]`` ids when every such feature has exactly one id per row."""

    @property
    def rows(self) -> int:
        return len(self.labels)


def decode(table: pa.Table, schema: FeatureSchema, where: str) -> Chunk:
    """Decodes a table of the schema's columns; ``where`` names the file and row group in errors.

    A table read without the label columns (``ParquetReader(labels=False)``) gets ``[rows, 0]`` labels.
    """
    sparse = [decode_sparse(table, f, i, schema, where) for i, f in enumerate(schema.sparse)]
    # The reader validated every label column present, or read none of them.
    labeled = any(name in table.column_names for name in schema.labels)
    labels = [_decode_labels(table.column(name), name, where) for name in schema.labels] if labeled else []
    plain = [c for c, f in zip(sparse, schema.sparse) if not f.weights]
    # Key-major stacks let a batch of single-id features be cut with one slice instead of one per key.
    plain_lengths = np.stack([c.lengths for c in plain]) if plain else None
    single = plain_lengths is not None and plain_lengths.size and plain_lengths.min() == 1 == plain_lengths.max()
    return Chunk(
        dense=_decode_dense(table, schema, where),
        labels=_stack_labels(labels, schema, rows=table.num_rows),
        sparse=sparse,
        offsets=[np.concatenate(([0], np.cumsum(c.lengths, dtype=np.int64))) for c in sparse],
        plain_lengths=plain_lengths,
        plain_values=np.stack([c.values for c in plain]) if single else None,
    )


def _stack_labels(labels: list[np.ndarray], schema: FeatureSchema, *, rows: int) -> np.ndarray:
    if not labels:
        return np.zeros((rows, 0), dtype=np.float32)
    return labels[0] if isinstance(schema.label, str) else np.stack(labels, axis=1)


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


# ---------------------------------------------------------------------------------------------
# Cutting batches out of decoded chunks.


class Assembler:
    """Queues decoded chunks and cuts batches of any size from their front."""

    def __init__(self, schema: FeatureSchema) -> None:
        weighted = [f.weights is not None for f in schema.sparse]
        self._plain = [(i, f.name) for i, f in enumerate(schema.sparse) if not weighted[i]]
        self._weighted = [(i, f.name) for i, f in enumerate(schema.sparse) if weighted[i]]
        self._parts: deque[tuple[Chunk, int]] = deque()
        self.rows = 0

    def add(self, chunk: Chunk) -> None:
        self._parts.append((chunk, 0))
        self.rows += chunk.rows

    def take(self, size: int) -> Batch:
        """Removes the first ``size`` queued rows and returns them as a Batch."""
        spans = self._pop(size)
        return Batch(
            dense_features=torch.from_numpy(np.concatenate([c.dense[a:b] for c, a, b in spans])),
            sparse_features=_plain_kjt(self._plain, spans, size),
            labels=torch.from_numpy(np.concatenate([c.labels[a:b] for c, a, b in spans])),
            weighted_features=_kjt(self._weighted, spans, size, weighted=True) if self._weighted else None,
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


def _plain_kjt(keys: list[tuple[int, str]], spans: list[tuple[Chunk, int, int]], size: int) -> KeyedJaggedTensor:
    """The KJT of the unweighted features, cut from the chunks' key-major stacks where they have them."""
    if not keys or any(c.plain_lengths is None for c, _, _ in spans):
        return _kjt(keys, spans, size, weighted=False)
    lengths = np.concatenate([c.plain_lengths[:, a:b] for c, a, b in spans], axis=1).ravel()  # type: ignore[index]
    if all(c.plain_values is not None for c, _, _ in spans):
        values = np.concatenate([c.plain_values[:, a:b] for c, a, b in spans], axis=1).ravel()  # type: ignore[index]
    else:
        values = _cat([c.sparse[k].values[c.offsets[k][a] : c.offsets[k][b]] for k, _ in keys for c, a, b in spans], np.int64)
    return KeyedJaggedTensor(
        keys=[name for _, name in keys],
        values=torch.from_numpy(values.astype(np.int64, copy=False)),
        lengths=torch.from_numpy(lengths.astype(np.int32, copy=False)),
        stride=size,
    )


def _kjt(keys: list[tuple[int, str]], spans: list[tuple[Chunk, int, int]], size: int, *, weighted: bool) -> KeyedJaggedTensor:
    """The KJT of the features ``keys`` (index in the schema, name) over ``spans`` of chunks."""
    lengths = [c.sparse[k].lengths[a:b] for k, _ in keys for c, a, b in spans]
    values = [c.sparse[k].values[c.offsets[k][a] : c.offsets[k][b]] for k, _ in keys for c, a, b in spans]
    weights = None
    if weighted:
        parts = [c.sparse[k].weights[c.offsets[k][a] : c.offsets[k][b]] for k, _ in keys for c, a, b in spans]  # type: ignore[index]
        weights = torch.from_numpy(_cat(parts, np.float32))
    return KeyedJaggedTensor(
        keys=[name for _, name in keys],
        values=torch.from_numpy(_cat(values, np.int64)),
        lengths=torch.from_numpy(_cat(lengths, np.int32)),
        weights=weights,
        stride=size,
    )


def _cat(arrays: list[np.ndarray], dtype: type[np.generic]) -> np.ndarray:
    """Concatenation that also accepts no arrays (a schema without sparse features)."""
    return np.concatenate(arrays, dtype=dtype) if arrays else np.empty(0, dtype=dtype)


