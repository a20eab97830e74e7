"""Decoding: a table of one row group (slice) -> numpy arrays per feature, and batches cut from them.

Dense features become float32 columns (clipped, nulls filled or rejected, optional log1p, normalized
with the training data's statistics), labels 0/1
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
from shardrec.data.schema import DenseFeature, DenseStats, FeatureSchema, LabelConfig
from shardrec.data.sparse import SparseColumn, decode_sparse
from shardrec.errors import ConfigError, DataError

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
    rows = table.num_rows
    stacked, fast = _single_ids(table, schema)
    ones = _ones(rows)
    sparse = [SparseColumn(ones, stacked[fast[i]]) if i in fast else decode_sparse(table, f, i, schema, where)  # type: ignore[index]
              for i, f in enumerate(schema.sparse)]
    # The reader validated every label column present, or read none of them.
    labeled = any(name in table.column_names for name in schema.labels)
    labels = [decode_labels(table.column(t.name), t, where) for t in schema.tasks] if labeled else []
    plain_index = [i for i, f in enumerate(schema.sparse) if not f.weights]
    plain = [sparse[i] for i in plain_index]
    # Key-major stacks let a batch of single-id features be cut with one slice instead of one per key.
    if plain and all(i in fast for i in plain_index) and [fast[i] for i in plain_index] == list(range(len(stacked))):  # type: ignore[arg-type]
        plain_lengths, plain_values = _ones(rows, len(plain)), stacked
    else:
        plain_lengths = np.stack([c.lengths for c in plain]) if plain else None
        single = plain_lengths is not None and plain_lengths.size and plain_lengths.min() == 1 == plain_lengths.max()
        plain_values = np.stack([c.values for c in plain]) if single else None
    counting = _counting(rows)
    return Chunk(
        dense=_decode_dense(table, schema, where),
        labels=_stack_labels(labels, schema, rows=rows),
        sparse=sparse,
        offsets=[counting if c.lengths is ones else np.concatenate(([0], np.cumsum(c.lengths, dtype=np.int64))) for c in sparse],
        plain_lengths=plain_lengths,
        plain_values=plain_values,
    )


_CONSTANTS: dict[tuple[str, int, int], np.ndarray] = {}
"""Read-only arrays every chunk of a size shares (lengths of single ids, their offsets): made once,
not allocated and faulted in again for each row group."""


def _constant(kind: str, rows: int, keys: int) -> np.ndarray:
    key = (kind, rows, keys)
    found = _CONSTANTS.get(key)
    if found is None:
        if len(_CONSTANTS) > 64:  # row groups of many sizes: keep the cache small
            _CONSTANTS.clear()
        found = np.ones((keys, rows), dtype=np.int32) if kind == "ones" else np.arange(rows + 1, dtype=np.int64)
        found.flags.writeable = False
        _CONSTANTS[key] = found
    return found


def _ones(rows: int, keys: int = 0) -> np.ndarray:
    """int32 ones: ``[rows]``, or ``[keys, rows]`` when ``keys``; read-only and shared."""
    return _constant("ones", rows, keys) if keys else _constant("ones", rows, 1)[0]


def _counting(rows: int) -> np.ndarray:
    """``0 .. rows`` as int64 (the offsets of one id per row); read-only and shared."""
    return _constant("counting", rows, 0)


def _single_ids(table: pa.Table, schema: FeatureSchema) -> tuple[np.ndarray | None, dict[int, int]]:
    """The fast path of the commonest features: unhashed single ids in an integer column without
    nulls, every one inside its table. Returns their ids stacked key-major ``[F, rows]`` and each
    such feature's row in the stack (by schema index); None and {} when there are none or one is out
    of range (then the general path decodes them and names the bad id)."""
    picked = [(i, f) for i, f in enumerate(schema.sparse)
              if not (f.negatives is not None or f.cross or f.bucketized or f.weights or f.hash or f.raw or f.sequence)]
    columns, fast = [], {}
    for i, f in picked:
        col = table.column(f.column)
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        if pa.types.is_integer(arr.type) and not arr.null_count:
            fast[i] = len(columns)
            columns.append((arr, schema.table(f.table).num_embeddings))  # type: ignore[arg-type]
    if not columns:
        return None, {}
    stacked = np.empty((len(columns), table.num_rows), dtype=np.int64)
    for k, (arr, _) in enumerate(columns):
        stacked[k] = arr.to_numpy()
    limits = np.array([n for _, n in columns], dtype=np.int64)
    if table.num_rows and ((stacked.min(axis=1) < 0) | (stacked.max(axis=1) >= limits)).any():
        return None, {}
    return stacked, fast


def _stack_labels(labels: list[np.ndarray], schema: FeatureSchema, *, rows: int) -> np.ndarray:
    if not labels:
        return np.zeros((rows, 0), dtype=np.float32)
    return labels[0] if schema.single_label else np.stack(labels, axis=1)


def _to_float32(col: pa.ChunkedArray) -> np.ndarray:
    """float32 values with NaN for nulls."""
    return pc.cast(col, pa.float32(), safe=False).to_numpy()


def _decode_dense(table: pa.Table, schema: FeatureSchema, where: str) -> np.ndarray:
    """``[rows, D]`` float32 model inputs: :func:`transform_dense` of every dense column, done for
    all columns at once (each step over a ``[D, rows]`` array), so the cost per column is one copy."""
    features = schema.dense
    x = np.empty((len(features), table.num_rows), dtype=np.float32)
    for i, f in enumerate(features):
        col = table.column(f.name)
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        if pa.types.is_floating(arr.type):
            x[i] = arr.to_numpy(zero_copy_only=False)  # nulls become NaN
        elif pa.types.is_integer(arr.type) and not arr.null_count:
            x[i] = arr.to_numpy()
        else:
            x[i] = _to_float32(col)
    clip = [i for i, f in enumerate(features) if f.clip is not None]
    if clip:
        lo = np.array([features[i].clip[0] for i in clip], dtype=np.float32)[:, None]  # type: ignore[index]
        hi = np.array([features[i].clip[1] for i in clip], dtype=np.float32)[:, None]  # type: ignore[index]
        x[clip] = np.clip(x[clip], lo, hi)
    missing = np.isnan(x)
    absent = missing.any(axis=1)
    for i, f in enumerate(features):
        if absent[i] and f.fill_missing is None:
            raise DataError(
                f"{where}: column '{f.name}' has {int(missing[i].sum())} null or NaN values; "
                f"set features.dense[{i}].fill_missing to the value to use for them (or 'mean')"
            )
    if absent.any():
        fill = np.array([0.0 if not absent[i] else _stats(f).raw_mean if f.fill_missing == "mean" else f.fill_missing
                         for i, f in enumerate(features)], dtype=np.float32)[:, None]
        x = np.where(missing, fill, x)
    logs = [i for i, f in enumerate(features) if f.takes_log]
    if logs:
        x[logs] = np.log1p(np.maximum(x[logs], 0))
    scaled = [(i, f) for i, f in enumerate(features) if f.normalize != "none"]
    if scaled:
        stats = [_stats(f) for _, f in scaled]
        shift = np.array([s.mean if f.normalize != "minmax" else s.min for (_, f), s in zip(scaled, stats)], dtype=np.float32)
        span = [s.std if f.normalize != "minmax" else s.max - s.min for (_, f), s in zip(scaled, stats)]
        scale = np.array([v if v > 0 else 1.0 for v in span], dtype=np.float32)
        rows = [i for i, _ in scaled]
        x[rows] = (x[rows] - shift[:, None]) / scale[:, None]
    return x.T  # batches copy their rows out (Assembler.take), so the transposed view is never copied whole


def clipped(f: DenseFeature, x: np.ndarray) -> np.ndarray:
    """``x`` clipped into ``f.clip`` (NaN stays NaN)."""
    return x if f.clip is None else np.clip(x, f.clip[0], f.clip[1])


def transform_dense(f: DenseFeature, x: np.ndarray, *, where: str, index: int) -> np.ndarray:
    """Feature ``f``'s float32 model input from its raw float32 column ``x`` (NaN for nulls):
    clip, fill, log, normalize, in that order."""
    x = clipped(f, x)
    missing = np.isnan(x)
    if missing.any():
        if f.fill_missing is None:
            raise DataError(
                f"{where}: column '{f.name}' has {int(missing.sum())} null or NaN values; "
                f"set features.dense[{index}].fill_missing to the value to use for them (or 'mean')"
            )
        fill = _stats(f).raw_mean if f.fill_missing == "mean" else f.fill_missing
        x = np.where(missing, np.float32(fill), x)
    if f.takes_log:
        x = np.log1p(np.maximum(x, 0))
    if f.normalize in ("zscore", "log_zscore"):
        s = _stats(f)
        x = (x - np.float32(s.mean)) / np.float32(s.std if s.std > 0 else 1.0)
    elif f.normalize == "minmax":
        s = _stats(f)
        span = s.max - s.min
        x = (x - np.float32(s.min)) / np.float32(span if span > 0 else 1.0)
    return x.astype(np.float32, copy=False)


def _stats(f: DenseFeature) -> DenseStats:
    if f.stats is None:
        raise ConfigError(f"features.dense '{f.name}': normalize: {f.normalize} / fill_missing: {f.fill_missing} needs "
                          "the training data's statistics; read it with a schema from apply_stats (shardrec train does)")
    return f.stats


_LABEL_RULES = {
    "binary": "labels must be 0 or 1",
    "regression": "regression labels must be finite numbers",
    "multiclass": "multiclass labels must be class ids 0 .. num_classes - 1",
}


def decode_labels(col: pa.ChunkedArray, task: LabelConfig, where: str) -> np.ndarray:
    """float32 values of label column ``col`` for ``task`` (multiclass: the class id), checked
    against the task's type; a DataError names the column, the first bad value and the bad rows."""
    if task.type == "multiclass" and is_strings(col.type):
        return _class_ids(col, task, where)
    y = _to_float32(col)
    if task.type == "binary":
        bad = (y != 0) & (y != 1)
    elif task.type == "regression":
        bad = ~np.isfinite(y)
    else:
        bad = ~np.isfinite(y) | (y < 0) | (y >= task.width) | (y != np.floor(y))
    if bad.any():
        value = y[bad][0]
        shown = "null/NaN" if np.isnan(value) else repr(float(value))
        fix = ("fix the data or set features.label to the 0/1 column (or declare its type: regression or multiclass)"
               if task.type == "binary" else f"fix the data or the label's type (num_classes {task.num_classes})"
               if task.type == "multiclass" else "fix the data (drop or fill those rows)")
        raise DataError(
            f"{where}: label column '{task.name}' holds {shown}; {_LABEL_RULES[task.type]}, and {int(bad.sum())} of "
            f"{len(y)} rows are not: {fix}"
        )
    return y


def is_strings(t: pa.DataType) -> bool:
    t = t.value_type if pa.types.is_dictionary(t) else t
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _class_ids(col: pa.ChunkedArray, task: LabelConfig, where: str) -> np.ndarray:
    """Class ids of string labels: positions in ``task.classes`` (the training data's classes)."""
    if task.classes is None:
        raise ConfigError(f"features.label '{task.name}': string classes need the training data's class list; read it "
                          "with a schema from shardrec.data.feature_stats.apply_stats (shardrec train does)")
    arr = pc.cast(col, pa.string()) if pa.types.is_dictionary(col.type) else col
    ids = pc.index_in(arr, value_set=pa.array(task.classes, pa.string())).to_numpy(zero_copy_only=False)
    unknown = np.isnan(ids.astype(np.float64)) if ids.dtype.kind == "f" else np.zeros(len(ids), dtype=bool)
    if unknown.any():
        first = pc.filter(arr, pa.array(unknown)).to_pylist()[0]
        raise DataError(
            f"{where}: label column '{task.name}' holds {first!r}, a class the training data does not have, in "
            f"{int(unknown.sum())} of {len(ids)} rows; the known classes are {', '.join(task.classes)}: fix the data"
        )
    return ids.astype(np.float32)


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


