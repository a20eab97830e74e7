"""Streams Parquet or CSV data as ``Batch``es: split over ranks and workers, shuffled, resumable at a batch.

Rows are read a row group (CSV: a block) at a time and decoded column-wise with numpy/pyarrow into
dense float32 features, 0/1 labels and KeyedJaggedTensors of (possibly hashed) ids; batches are
then cut from the decoded rows, across row group and file boundaries. Files may be local or behind
an fsspec URL (see ``shardrec.data.sources``); the work split, shuffling and workers are in
``shardrec.data.loader``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from shardrec.data.batch import Batch
from shardrec.data.hashing import is_string_type
from shardrec.data.loader import Item, Order, Source, WorkerKind, WorkerStream, round_robin, run_workers, split
from shardrec.data.schema import FeatureSchema
from shardrec.data.sources import CsvSource, DataFile, ParquetSource, csv_header, parquet_metadata, resolve, scan_csv
from shardrec.errors import DataError

_Role = Literal["label", "dense", "numeric", "ids", "cross", "weights"]
BadRows = Literal["error", "skip"]


# ---------------------------------------------------------------------------------------------
# Validation: paths, columns and types, from Parquet footers (CSV: the header and a counting pass).


@dataclass(frozen=True)
class _Column:
    """A column the schema reads, with the YAML key that configures it."""

    name: str
    key: str
    role: _Role
    hashed: bool = False
    sequence: bool = False
    ids: str | None = None
    """For weights: the id column they align with."""
    classes: bool = False
    """For labels: a multiclass label, which may also hold strings."""


def _columns(schema: FeatureSchema, *, labels: bool = True) -> list[_Column]:
    one = schema.single_label
    cols = [_Column(name=t.name, key="features.label" if one else f"features.label[{i}]", role="label", classes=t.type == "multiclass")
            for i, t in enumerate(schema.tasks)]
    cols = cols if labels else []
    cols += [_Column(name=f.name, key=f"features.dense[{i}]", role="dense") for i, f in enumerate(schema.dense)]
    for i, f in enumerate(schema.sparse):
        if f.negatives is not None:
            continue
        key = f"features.sparse[{i}]"
        source_key = f"{key}.source" if f.source else key
        if f.cross:
            cols += [_Column(name=c, key=f"{key}.cross[{j}]", role="cross") for j, c in enumerate(f.cross)]
        elif f.bucketized:
            cols.append(_Column(name=f.column, key=source_key, role="numeric"))
        else:
            cols.append(_Column(name=f.column, key=source_key, role="ids", hashed=f.hash, sequence=f.sequence))
        if f.weights:
            cols.append(_Column(name=f.weights, key=f"{key}.weights", role="weights", ids=f.column))
    return cols


def read_columns(schema: FeatureSchema, *, labels: bool = True) -> list[str]:
    """Every data column the schema reads, each once: labels (unless not ``labels``), dense, then the
    sparse features' columns."""
    return list(dict.fromkeys([*(schema.labels if labels else []), *schema.dense_names, *(c for f in schema.sparse for c in f.columns)]))


def validate_data(path: str | Path, schema: FeatureSchema, *, labels: bool = True) -> list[Path | str]:
    """Resolves a Parquet or CSV data set and checks it against the schema.

    Parquet is checked from the file footers only; CSV from the header and a first pass that
    counts the rows and converts the values (cached per file).

    Args:
        path: a file, a folder of ``*.parquet`` (or ``*.csv``/``*.csv.gz``) files, a glob, or an
            fsspec URL of any of these; files are read in sorted order.
        schema: the features the model reads.
        labels: whether the schema's label columns are required (False: scoring unlabeled rows).

    Returns:
        The data set's files: local ones as Paths, others as URLs.

    Raises:
        DataError: the path is missing or empty, a file is empty, damaged or not of its format, a
            configured column is missing or of an unusable type, or the files disagree on a type.
    """
    return [f.key() for f in open_source(path, schema, labels=labels).files]


def validate_parquet(path: str | Path, schema: FeatureSchema) -> list[Path | str]:
    """``validate_data`` for a data set that must be Parquet.

    Raises:
        DataError: as ``validate_data``, or the path names CSV files.
    """
    files, fmt = resolve(path)
    if fmt != "parquet":
        raise DataError(f"data path '{path}' names CSV files where Parquet is expected; point it at Parquet files, or read it with validate_data")
    return [f.key() for f in _parquet_source(files, schema).files]


def open_source(path: str | Path, schema: FeatureSchema, *, labels: bool = True) -> Source:
    """The validated rows of a data set, ready to be read by row ranges; without ``labels`` the
    label columns are neither required nor read."""
    files, fmt = resolve(path)
    return _parquet_source(files, schema, labels=labels) if fmt == "parquet" else _csv_source(files, schema, labels=labels)


def _parquet_source(files: list[DataFile], schema: FeatureSchema, *, labels: bool = True) -> ParquetSource:
    metadata = _footers(files)
    cols = _columns(schema, labels=labels)
    first: tuple[str, pa.Schema] | None = None
    for f, meta in zip(files, metadata):
        if meta.num_rows == 0:
            raise DataError(f"'{f.name}' holds no rows; remove the empty file from the data set (or write its rows)")
        file_schema = meta.schema.to_arrow_schema()
        for col in cols:
            _check_column(f.name, file_schema, col)
        if first is None:
            first = (f.name, file_schema)
        else:
            _check_same_types(first, (f.name, file_schema), cols)
    return ParquetSource(files, metadata, read_columns(schema, labels=labels))


def _footers(files: list[DataFile]) -> list[pq.FileMetaData]:
    if len(files) > 1 and files[0].fs is not None:  # remote footers: one round trip each, so overlap them
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(parquet_metadata, files))
    return [parquet_metadata(f) for f in files]


def _check_column(file: str, file_schema: pa.Schema, col: _Column) -> None:
    if col.name not in file_schema.names:
        raise DataError(f"'{file}' has no column '{col.name}' (configured by {col.key}); its columns are: {', '.join(file_schema.names)}")
    t = file_schema.field(col.name).type
    ids = file_schema.field(col.ids).type if col.ids and col.ids in file_schema.names else None
    problem = _type_problem(t, col, ids)
    if problem:
        raise DataError(f"'{file}' column '{col.name}' ({col.key}) {problem}")


def _type_problem(t: pa.DataType, col: _Column, ids: pa.DataType | None) -> str | None:
    """What makes type ``t`` unusable for ``col``, in words; None: usable."""
    if col.role in ("label", "dense"):
        ok = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
        if col.classes:
            return None if ok or _id_kind(t) == "str" and not _is_list(t) else f"has type {t}; a multiclass label holds class ids or strings"
        return None if ok else f"has type {t}; a {col.role} column must be numeric or bool"
    if col.role == "numeric":
        return None if _is_number(t) else f"has type {t}; boundaries need a numeric column"
    if col.role == "weights":
        aligned = ids is None or _is_list(t) == _is_list(ids)
        if _is_number(_item_type(t)) and aligned:
            return None
        return (
            f"has type {t} in every row group; weights must be numbers, one per id of column '{col.ids}' "
            "(a list of numbers per row when the ids are lists): write it as list<float>"
        )
    return _ids_problem(t, col)


def _ids_problem(t: pa.DataType, col: _Column) -> str | None:
    kind = _id_kind(t)
    if kind is None or (col.role == "cross" and _is_list(t)):
        shape = "single integer or string ids" if col.role == "cross" else "integers or strings/bytes, or lists of them"
        return f"has type {t}; a {'crossed' if col.role == 'cross' else 'sparse'} column must hold {shape}"
    if kind == "str" and col.role == "ids" and not col.hashed:
        return f"holds strings ({t}), which need hashing; set {col.key.removesuffix('.source')}.hash: true"
    if col.sequence and not _is_list(t):
        return (
            f"has type {t} in every row group, not a list; a sequence feature needs a list column (one history per row, "
            f"oldest first): write it as list<{t}> or set {col.key.removesuffix('.source')}.sequence: false"
        )
    return None


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _item_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if _is_list(t) else t


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _id_kind(t: pa.DataType) -> Literal["int", "str"] | None:
    """Whether a sparse column holds integer or string ids (directly or in lists); None: neither."""
    t = _item_type(t)
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "int"
    return "str" if is_string_type(t) else None


def _check_same_types(first: tuple[str, pa.Schema], other: tuple[str, pa.Schema], cols: list[_Column]) -> None:
    for col in cols:
        t0, t1 = first[1].field(col.name).type, other[1].field(col.name).type
        if t0 != t1:
            raise DataError(
                f"column '{col.name}' ({col.key}) is {t1} in '{other[0]}' but {t0} in '{first[0]}'; "
                "all files of one data set need the same schema: rewrite them with one type"
            )


def _csv_source(files: list[DataFile], schema: FeatureSchema, *, labels: bool) -> CsvSource:
    cols = _columns(schema, labels=labels)
    for col in cols:
        if col.sequence:
            raise DataError(
                f"'{files[0].name}' column '{col.name}' ({col.key}) is a CSV column, one value per row, but a sequence "
                "feature needs a list per row; write the data as Parquet with a list column"
            )
    types, probe = _csv_types(cols)
    rows, not_int = [], set()
    for f in files:
        header = csv_header(f)
        for col in cols:
            if col.name not in header:
                raise DataError(f"'{f.name}' has no column '{col.name}' (configured by {col.key}); its columns are: {', '.join(header)}")
        scan = scan_csv(f, types, probe, header)
        if scan.rows == 0:
            raise DataError(f"'{f.name}' has a header but no rows; remove the empty file from the data set (or write its rows)")
        rows.append(scan.rows)
        not_int |= scan.not_int
    # One type per column for the whole data set, so an id hashes alike in every file.
    ids = {c: pa.string() if c in not_int else pa.int64() for c in probe}
    return CsvSource(files, rows, {**types, **ids})


def _csv_types(cols: list[_Column]) -> tuple[dict[str, pa.DataType], list[str]]:
    """Types to read CSV columns with, and the hashed id columns whose type the data decides.

    Ids that need no hashing are int64; hashed and crossed ids and multiclass labels int64 if every
    value in the data set is an integer, else strings; every other column float64.
    """
    id_cols = [c for c in cols if c.role in ("ids", "cross") or c.classes]
    types: dict[str, pa.DataType] = {c.name: pa.int64() for c in id_cols if c.role == "ids" and not c.hashed}
    probe = list(dict.fromkeys(c.name for c in id_cols if c.name not in types))
    for c in cols:
        if c.name not in types and c.name not in probe:
            types[c.name] = pa.float64()
    return types, probe


# ---------------------------------------------------------------------------------------------
# The reader.


@dataclass
class _Progress:
    """How far the latest iteration got: batches handed out and rows each worker dropped."""

    consumed: int = 0
    skipped: list[int] = field(default_factory=list)


class _Tracked:
    """The batches of one iteration, counted as they are handed out."""

    def __init__(self, items: Iterator[Item], progress: _Progress) -> None:
        self._items, self._progress = items, progress

    def __iter__(self) -> _Tracked:
        return self

    def __next__(self) -> Batch:
        batch, worker, skipped = next(self._items)
        self._progress.consumed += 1
        self._progress.skipped[worker] = skipped
        return batch

    def close(self) -> None:
        """Stops reading early: ends the prefetch thread or the in-process reading, if any."""
        close = getattr(self._items, "close", None)
        if close is not None:
            close()


class ParquetReader:
    """Iterable of ``Batch``es over one rank's contiguous share of a Parquet or CSV data set.

    With ``N`` rows in all, rank ``r`` reads rows ``[r*n, (r+1)*n)`` where ``n = N // world_size``
    (the few leftover rows are dropped), in ``ceil(n / batch_size)`` batches, the last one partial.
    Every rank yields the same number of batches of the same sizes, and every ``iter()`` starts
    over at ``start_batch`` (or the position ``load_state_dict`` set).

    The batches are split into ``W = max(num_workers, 1)`` contiguous runs, one per worker; a
    DataLoader hands them over in round-robin order (run 0's first batch, run 1's first, ...), so the
    order depends on ``num_workers`` but not on timing. Each row is read exactly once per epoch.

    Example::

        reader = ParquetReader("data/train", schema=schema, batch_size=512, rank=0, world_size=2)
        for batch in reader:  # len(reader) batches
            batch.dense_features  # float32 [B, len(schema.dense)]
            batch.sparse_features  # KJT, keys schema.unweighted_names, int64 values, int32 lengths
            batch.labels  # float32 [B] (or [B, T] for T labels; [B, 0] with labels=False)

    Args:
        path: a Parquet or CSV file, a folder of them, a glob, or an fsspec URL of any of these.
        schema: the features to read.
        batch_size: rows per batch.
        rank: this rank.
        world_size: number of ranks sharing the data.
        start_batch: batches to skip at the start of every iteration (exact resume). Without
            shuffle the row groups before it are not read; with a shuffle buffer reading starts at
            the buffer window holding it; with ``on_bad_rows="skip"`` the epoch is replayed.
        prefetch: batches a background thread prepares ahead (0: read in the caller's thread);
            with ``num_workers`` > 0, batches each worker prepares ahead (at least 1).
        epoch: the epoch, which seeds the shuffle.
        num_workers: workers that read and decode; 0: none (this process, or its prefetch thread).
        worker_kind: ``process`` (DataLoader worker processes) or ``thread`` (threads of this
            process); the batches and their order are the same.
        pin_memory: hand out batches in pinned memory for faster copies to a GPU; a no-op without CUDA.
        shuffle_buffer: rows shuffled together (0: off): each worker reads its rows in windows of
            this many and hands them out in an order drawn from (seed, epoch, rank, worker, window).
        seed: seed of the shuffle.
        on_bad_rows: "error" raises on rows that fail to read or decode; "skip" drops every row
            decoded together with them (the row group's or CSV block's rows in this worker's
            share; with a shuffle buffer, those in the window), counts them in ``skipped_rows``,
            and fills the planned batches with as many rows re-read from the start of the
            worker's share, so batch counts and sizes stay those of every other rank.
        labels: read the schema's label columns; False: the data need not have them (scoring
            unlabeled rows) and every batch's ``labels`` is an empty ``[B, 0]`` tensor, so
            ``batch.size`` holds and a loss over it fails on the shape instead of training on made-up labels.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        schema: FeatureSchema,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        prefetch: int = 0,
        epoch: int = 0,
        num_workers: int = 0,
        worker_kind: WorkerKind = "process",
        pin_memory: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        on_bad_rows: BadRows = "error",
        labels: bool = True,
    ) -> None:
        _check_args(
            batch_size=batch_size, prefetch=prefetch, start_batch=start_batch, rank=rank, world_size=world_size,
            epoch=epoch, num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed, on_bad_rows=on_bad_rows,
        )  # fmt: skip
        self._path, self._rank, self._world_size = path, rank, world_size
        self._batch_size, self._prefetch = batch_size, prefetch
        self._num_workers, self._pin_memory, self._worker_kind = num_workers, pin_memory, worker_kind
        self._shuffle_buffer, self._seed, self._on_bad_rows = shuffle_buffer, seed, on_bad_rows
        self._schema = schema
        self._source = open_source(path, schema, labels=labels)
        first, end = self._rank_range()
        self._shares = split(first, end, batch_size=batch_size, workers=max(num_workers, 1))
        self._num_batches = math.ceil((end - first) / batch_size)
        self._progress = _Progress()
        self._epoch, self._start = epoch, self._checked_start(start_batch, "start_batch")

    def _rank_range(self) -> tuple[int, int]:
        n = self._source.rows // self._world_size
        if n == 0:
            raise DataError(
                f"'{self._path}' has {self._source.rows} rows, fewer than the world size {self._world_size}: every rank "
                "would read nothing; use more data or fewer ranks"
            )
        return self._rank * n, (self._rank + 1) * n

    def _checked_start(self, start: int, name: str) -> int:
        if start > self._num_batches:
            raise DataError(
                f"{name} {start} is past the end of '{self._path}': rank {self._rank} of {self._world_size} has "
                f"{self._num_batches} batches of {self._batch_size} rows; resume with the data and batch size the checkpoint was made with"
            )
        return start

    def __len__(self) -> int:
        return self._num_batches - self._start

    def __iter__(self) -> Iterator[Batch]:
        self._progress = _Progress(skipped=[0] * len(self._shares))
        if not len(self):
            return iter(())
        done, rotation = round_robin([s.batches for s in self._shares], self._start)
        order = Order(
            schema=self._schema, shuffle_buffer=self._shuffle_buffer, seed=self._seed, epoch=self._epoch,
            rank=self._rank, on_bad_rows=self._on_bad_rows,
        )  # fmt: skip
        streams = [WorkerStream(self._source, s, order, worker=w, start=done[w]) for w, s in enumerate(self._shares)]
        items = run_workers(streams, rotation=rotation, num_workers=self._num_workers, prefetch=self._prefetch,
                            pin_memory=self._pin_memory, worker_kind=self._worker_kind)
        return _Tracked(items, self._progress)

    @property
    def skipped_rows(self) -> int:
        """Rows dropped by ``on_bad_rows="skip"`` in the latest iteration so far (replayed ones included)."""
        return sum(self._progress.skipped)

    def state_dict(self) -> dict[str, int]:
        """Where the latest iteration stands: its epoch and the batches handed out (``start_batch``
        included), with the layout they depend on; the same on every rank."""
        return {"epoch": self._epoch, "batches": self._start + self._progress.consumed, **self._layout()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Makes the next ``iter()`` yield exactly the batches that followed ``state`` in its epoch.

        Raises:
            DataError: the state was saved with other data, batch size, ranks, workers, shuffle
                buffer or seed, or is past the end of the epoch.
        """
        changed = [f"{k} {state.get(k)} then, {v} now" for k, v in self._layout().items() if state.get(k) != v]
        if changed:
            raise DataError(
                f"reader state does not match this reader ({'; '.join(changed)}); resume with the data, batch size, "
                "world size, num_workers, shuffle_buffer and seed the state was saved with"
            )
        self._epoch, self._start = int(state["epoch"]), self._checked_start(int(state["batches"]), "batch")
        self._progress = _Progress()

    def _layout(self) -> dict[str, int]:
        return {
            "rows": self._source.rows,
            "batch_size": self._batch_size,
            "world_size": self._world_size,
            "workers": len(self._shares),
            "shuffle_buffer": self._shuffle_buffer,
            "seed": self._seed,
        }


def _check_args(*, batch_size: int, rank: int, world_size: int, on_bad_rows: str, **counts: int) -> None:
    bad = [f"{k}={v}" for k, v in counts.items() if v < 0]
    if batch_size <= 0:
        bad.append(f"batch_size={batch_size}")
    if not 0 <= rank < world_size:
        bad.append(f"rank={rank} of world_size={world_size}")
    if on_bad_rows not in ("error", "skip"):
        bad.append(f"on_bad_rows={on_bad_rows!r}")
    if bad:
        raise ValueError(
            f"ParquetReader: got {', '.join(bad)}; need batch_size > 0, 0 <= rank < world_size, on_bad_rows 'error' or "
            f"'skip', and {', '.join(counts)} >= 0"
        )
