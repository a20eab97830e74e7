"""Streams Parquet data as ``Batch``es: rank-split, resumable at a batch, optionally prefetched.

Rows are read one row group at a time and decoded column-wise with numpy/pyarrow into dense
float32 features, 0/1 labels and a KeyedJaggedTensor of (possibly hashed) ids; batches are then
cut from the decoded row groups, across row group and file boundaries.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from shardrec.data.batch import Batch
from shardrec.data.decode import Assembler, Chunk, decode
from shardrec.data.hashing import is_string_type
from shardrec.data.schema import FeatureSchema
from shardrec.errors import DataError

_Role = Literal["label", "dense", "sparse"]


# ---------------------------------------------------------------------------------------------
# Validation: paths, columns and types, from the Parquet footers only.


@dataclass(frozen=True)
class _Column:
    """A column the schema reads, with the YAML key that configures it."""

    name: str
    key: str
    role: _Role
    hashed: bool = False


def _columns(schema: FeatureSchema) -> list[_Column]:
    cols = [_Column(name=schema.label, key="features.label", role="label")]
    cols += [_Column(name=f.name, key=f"features.dense[{i}]", role="dense") for i, f in enumerate(schema.dense)]
    cols += [_Column(name=f.name, key=f"features.sparse[{i}]", role="sparse", hashed=f.hash) for i, f in enumerate(schema.sparse)]
    return cols


def validate_parquet(path: str | Path, schema: FeatureSchema) -> list[Path]:
    """Resolves a Parquet data set and checks it against the schema, reading no row data.

    Args:
        path: a ``.parquet`` file or a folder of ``*.parquet`` files (read in sorted order).
        schema: the features the model reads.

    Returns:
        The data set's files.

    Raises:
        DataError: the path is missing or empty, a file is not Parquet, a configured column is
            missing or of an unusable type, or the files disagree on a column's type.
    """
    files = _resolve_files(Path(path))
    first: tuple[Path, pa.Schema] | None = None
    for f in files:
        file_schema = _read_schema(f)
        for col in _columns(schema):
            _check_column(f, file_schema, col)
        if first is None:
            first = (f, file_schema)
        else:
            _check_same_types(first, (f, file_schema), schema)
    return files


def _resolve_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(
            f"data path '{path}' does not exist; set data.train_path (or data.eval_path) to a Parquet file "
            "or a folder of *.parquet files"
        )
    if path.is_file():
        return [path]
    files = sorted(p for p in path.glob("*.parquet") if p.is_file())
    if not files:
        raise DataError(f"data folder '{path}' holds no *.parquet files; point the data path at a folder of .parquet files")
    return files


def _read_schema(file: Path) -> pa.Schema:
    try:
        return pq.read_schema(file)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"'{file}' is not a readable Parquet file ({e}); remove it from the data folder or rewrite it as Parquet") from e


def _check_column(file: Path, file_schema: pa.Schema, col: _Column) -> None:
    if col.name not in file_schema.names:
        raise DataError(
            f"'{file}' has no column '{col.name}' (configured by {col.key}); "
            f"its columns are: {', '.join(file_schema.names)}"
        )
    t = file_schema.field(col.name).type
    if col.role != "sparse":
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise DataError(f"'{file}' column '{col.name}' ({col.key}) has type {t}; a {col.role} column must be numeric or bool")
        return
    kind = _id_kind(t)
    if kind is None:
        raise DataError(
            f"'{file}' column '{col.name}' ({col.key}) has type {t}; a sparse column must hold integers or "
            "strings/bytes, or lists of them"
        )
    if kind == "str" and not col.hashed:
        raise DataError(
            f"'{file}' column '{col.name}' ({col.key}) holds strings ({t}), which need hashing; "
            f"set {col.key}.hash: true"
        )


def _id_kind(t: pa.DataType) -> Literal["int", "str"] | None:
    """Whether a sparse column holds integer or string ids (directly or in lists); None: neither."""
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "int"
    return "str" if is_string_type(t) else None


def _check_same_types(first: tuple[Path, pa.Schema], other: tuple[Path, pa.Schema], schema: FeatureSchema) -> None:
    for col in _columns(schema):
        t0, t1 = first[1].field(col.name).type, other[1].field(col.name).type
        if t0 != t1:
            raise DataError(
                f"column '{col.name}' ({col.key}) is {t1} in '{other[0]}' but {t0} in '{first[0]}'; "
                "all files of one data set need the same schema: rewrite them with one type"
            )


# ---------------------------------------------------------------------------------------------
# The reader.


@dataclass(frozen=True)
class _RowGroup:
    file: Path
    index: int
    start: int
    """Global index of the row group's first row, counted over all files."""
    rows: int


def _row_groups(files: list[Path]) -> list[_RowGroup]:
    out, start = [], 0
    for f in files:
        meta = pq.read_metadata(f)
        for i in range(meta.num_row_groups):
            rows = meta.row_group(i).num_rows
            out.append(_RowGroup(file=f, index=i, start=start, rows=rows))
            start += rows
    return out


class ParquetReader:
    """Iterable of ``Batch``es over one rank's contiguous share of a Parquet data set.

    With ``N`` rows in all, rank ``r`` reads rows ``[r*n, (r+1)*n)`` where ``n = N // world_size``
    (the few leftover rows are dropped), in ``ceil(n / batch_size)`` batches, the last one partial.
    Every rank yields the same number of batches, and every ``iter()`` starts over.

    Example::

        reader = ParquetReader("data/train", schema=schema, batch_size=512, rank=0, world_size=2)
        for batch in reader:  # len(reader) batches
            batch.dense_features  # float32 [B, len(schema.dense)]
            batch.sparse_features  # KJT, keys schema.sparse_names, int64 values, int32 lengths
            batch.labels  # float32 [B]

    Args:
        path: a ``.parquet`` file or a folder of them.
        schema: the features to read.
        batch_size: rows per batch.
        rank: this rank.
        world_size: number of ranks sharing the data.
        start_batch: batches to skip at the start of every iteration (exact resume); the row
            groups before it are not read.
        prefetch: batches a background thread prepares ahead; 0 reads in the caller's thread.
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
    ) -> None:
        if batch_size <= 0 or prefetch < 0 or start_batch < 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"ParquetReader: need batch_size > 0, prefetch >= 0, start_batch >= 0 and 0 <= rank < world_size; "
                f"got batch_size={batch_size}, prefetch={prefetch}, start_batch={start_batch}, rank={rank}, world_size={world_size}"
            )
        self._schema = schema
        self._batch_size = batch_size
        self._start_batch = start_batch
        self._prefetch = prefetch
        self._columns = list(dict.fromkeys([schema.label, *schema.dense_names, *schema.sparse_names]))
        self._row_groups = _row_groups(validate_parquet(path, schema))
        self._first_row, self._end_row = self._rank_range(path, rank, world_size)
        self._num_batches = math.ceil((self._end_row - self._first_row) / batch_size)
        if start_batch > self._num_batches:
            raise DataError(
                f"start_batch {start_batch} is past the end of '{path}': rank {rank} of {world_size} has "
                f"{self._num_batches} batches of {batch_size} rows; resume with the data and batch size the checkpoint was made with"
            )

    def _rank_range(self, path: str | Path, rank: int, world_size: int) -> tuple[int, int]:
        total = sum(g.rows for g in self._row_groups)
        n = total // world_size
        if n == 0:
            raise DataError(
                f"'{path}' has {total} rows, fewer than the world size {world_size}: every rank would read nothing; "
                "use more data or fewer ranks"
            )
        return rank * n, (rank + 1) * n

    def __len__(self) -> int:
        return self._num_batches - self._start_batch

    def __iter__(self) -> Iterator[Batch]:
        if self._prefetch:
            return _Prefetcher(self._batches(), depth=self._prefetch)
        return self._batches()

    def _batches(self) -> Generator[Batch, None, None]:
        assembler = Assembler(self._schema)
        for chunk in self._chunks():
            assembler.add(chunk)
            while assembler.rows >= self._batch_size:
                yield assembler.take(self._batch_size)
        if assembler.rows:
            yield assembler.take(assembler.rows)

    def _chunks(self) -> Iterator[Chunk]:
        """Decoded slices of the row groups that overlap this rank's rows from ``start_batch`` on."""
        first = self._first_row + self._start_batch * self._batch_size
        end = self._end_row
        needed = [g for g in self._row_groups if g.start < end and g.start + g.rows > first and g.rows]
        for file, groups in itertools.groupby(needed, key=lambda g: g.file):
            with pq.ParquetFile(file) as pf:
                for g in groups:
                    lo, hi = max(first, g.start) - g.start, min(end, g.start + g.rows) - g.start
                    table = pf.read_row_group(g.index, columns=self._columns).slice(lo, hi - lo)
                    yield decode(table, self._schema, where=f"'{file}' row group {g.index}")


# ---------------------------------------------------------------------------------------------
# Prefetching in a background thread.


_END = object()


@dataclass
class _Failure:
    error: BaseException


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Puts ``item`` unless ``stop`` is set first; returns whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(batches: Generator[Batch, None, None], q: queue.Queue, stop: threading.Event) -> None:
    # Holds no reference to the _Prefetcher, so dropping the consumer's iterator collects it and
    # its __del__ sets ``stop``.
    try:
        for batch in batches:
            if not _put(q, batch, stop):
                return
        last: object = _END
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
        last = _Failure(e)
    finally:
        batches.close()
    _put(q, last, stop)


class _Prefetcher:
    """Iterator over batches made ahead by a daemon thread into a queue of ``depth`` batches."""

    def __init__(self, batches: Generator[Batch, None, None], *, depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce, args=(batches, self._queue, self._stop), name="shardrec-prefetch", daemon=True
        )
        self._thread.start()
        self._done = False

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        item = self._get()
        if isinstance(item, Batch):
            return item
        self.close()
        if isinstance(item, _Failure):
            raise item.error
        raise StopIteration

    def _get(self) -> object:
        while True:
            try:
                return self._queue.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("shardrec prefetch thread ended without a result") from None

    def close(self) -> None:
        """Stops the background thread and waits briefly for it to end."""
        self._done = True
        self._stop.set()
        self._thread.join(timeout=5.0)

    def __del__(self) -> None:
        self._stop.set()
