"""Where data files are and how their rows are read: local paths and fsspec URLs, Parquet and CSV.

A data path is a file, a folder (its ``*.parquet`` files, else its ``*.csv``/``*.csv.gz`` files) or
a glob, on the local disk or behind an fsspec URL (``memory://``, ``file://``, ``s3://`` with s3fs,
...); files are read in sorted order. Both formats are cut into *pieces* with a global first row:
a Parquet row group, or a whole CSV file. ``ParquetSource``/``CsvSource.read(lo, hi)`` then yield
the rows ``[lo, hi)`` of the data set as Arrow tables of the needed columns, with a ``where`` that
names the file and row group (CSV: the rows) for error messages.

CSV files have a header row and are streamed in blocks; their rows are counted in a first pass
(cached per file and content). A reader that starts mid-file parses and discards the rows before
its share, so large CSV data sets read fastest as many files (or converted to Parquet).
"""

from __future__ import annotations

import glob as globlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from shardrec.errors import DataError

Format = Literal["parquet", "csv"]

_CSV_SUFFIXES = (".csv", ".csv.gz")
_CSV_BLOCK_BYTES = 8 << 20
_SKIP_HINT = "or set data.on_bad_rows: skip to drop these rows"


@dataclass(frozen=True)
class DataFile:
    """One file of a data set: a local path (``fs`` None, read by pyarrow directly) or an fsspec one."""

    path: str
    fs: AbstractFileSystem | None = None

    @property
    def name(self) -> str:
        """How messages name the file: the local path or the full URL."""
        return self.path if self.fs is None else self.fs.unstrip_protocol(self.path)

    @property
    def format(self) -> Format:
        return "csv" if self.path.lower().endswith(_CSV_SUFFIXES) else "parquet"

    def key(self) -> Path | str:
        """A local file as a Path, any other as its URL."""
        return Path(self.path) if self.fs is None else self.name

    def filesystem(self) -> AbstractFileSystem:
        return self.fs or LocalFileSystem()

    def size(self) -> int:
        return os.path.getsize(self.path) if self.fs is None else self.fs.size(self.path)


# ---------------------------------------------------------------------------------------------
# Resolving a data path into files.


def resolve(path: str | os.PathLike[str]) -> tuple[list[DataFile], Format]:
    """The files a data path names, sorted, and their format.

    Raises:
        DataError: nothing is there, a folder or glob holds no data files, or it mixes formats.
    """
    text = os.fspath(path)
    if "://" in text or "::" in text:
        fs, root = _url_to_fs(text)
        if not isinstance(fs, LocalFileSystem):
            return _single_format(_list_remote(fs, root, text), text)
        text = root
    return _single_format(_list_local(text), text)


def _url_to_fs(url: str) -> tuple[AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise DataError(f"data path '{url}' cannot be opened: {e}; install the fsspec package of its protocol (s3fs for s3://, gcsfs for gs://)") from e


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _missing(shown: str) -> DataError:
    return DataError(
        f"data path '{shown}' does not exist; set data.train_path (or data.eval_path) to a Parquet or CSV file, "
        "a folder of *.parquet or *.csv files, a glob, or an fsspec URL (s3://bucket/prefix/)"
    )


def _list_local(path: str) -> list[DataFile]:
    if _has_magic(path):
        return _matched([DataFile(p) for p in sorted(globlib.glob(path)) if os.path.isfile(p)], path)
    p = Path(path)
    if not p.exists():
        raise _missing(path)
    if p.is_file():
        return [DataFile(str(p))]
    return _folder([DataFile(str(f)) for f in sorted(p.iterdir()) if f.is_file()], path)


def _list_remote(fs: AbstractFileSystem, root: str, shown: str) -> list[DataFile]:
    if _has_magic(root):
        found = fs.glob(root, detail=True)
        return _matched([DataFile(n, fs) for n, info in sorted(found.items()) if info.get("type") == "file"], shown)
    if not fs.exists(root):
        raise _missing(shown)
    if not fs.isdir(root):
        return [DataFile(root, fs)]
    entries = fs.ls(root, detail=True)
    return _folder([DataFile(e["name"], fs) for e in sorted(entries, key=lambda e: e["name"]) if e.get("type") == "file"], shown)


def _matched(files: list[DataFile], pattern: str) -> list[DataFile]:
    if not files:
        raise DataError(f"data path '{pattern}' matches no files; fix the glob or point the data path at a file or folder")
    return files


def _folder(files: list[DataFile], shown: str) -> list[DataFile]:
    """A folder's data files: its *.parquet files, else its *.csv / *.csv.gz files."""
    parquet = [f for f in files if f.path.lower().endswith(".parquet")]
    csv = [f for f in files if f.format == "csv"]
    if parquet and csv:
        raise DataError(
            f"data folder '{shown}' holds both *.parquet and *.csv files; point the data path at one format "
            f"with a glob such as '{shown.rstrip('/')}/*.parquet'"
        )
    if not parquet and not csv:
        raise DataError(
            f"data folder '{shown}' holds no *.parquet files (nor *.csv or *.csv.gz); "
            "point the data path at a folder of .parquet or .csv files"
        )
    return parquet or csv


def _single_format(files: list[DataFile], shown: str) -> tuple[list[DataFile], Format]:
    formats = sorted({f.format for f in files})
    if len(formats) > 1:
        raise DataError(f"data path '{shown}' names both Parquet and CSV files; point it at files of one format")
    return files, formats[0]


# ---------------------------------------------------------------------------------------------
# Pieces and the rows read from them.


@dataclass(frozen=True)
class Piece:
    """A Parquet row group, or a whole CSV file, and its place among the data set's rows."""

    file: int
    """Index into the source's files."""
    group: int
    """Parquet row group index; 0 for a CSV file."""
    start: int
    """Global index of the piece's first row, counted over all files."""
    rows: int


@dataclass
class Part:
    """Rows of the data set read from one piece: a table of them, or why they cannot be read."""

    where: str
    rows: int
    table: pa.Table | None = None
    error: DataError | None = None


def _pieces(files: list[DataFile], rows: list[list[int]]) -> list[Piece]:
    """Pieces from the row counts of each file's row groups (one entry per CSV file)."""
    out, start = [], 0
    for i, groups in enumerate(rows):
        for g, n in enumerate(groups):
            out.append(Piece(file=i, group=g, start=start, rows=n))
            start += n
    return out


def _overlapping(pieces: list[Piece], lo: int, hi: int) -> list[Piece]:
    return [p for p in pieces if p.start < hi and p.start + p.rows > lo]


# ---------------------------------------------------------------------------------------------
# Parquet.


def parquet_metadata(f: DataFile) -> pq.FileMetaData:
    """The file's footer.

    Raises:
        DataError: the file is empty, truncated or not Parquet.
    """
    try:
        return pq.read_metadata(f.path, filesystem=f.fs)
    except (pa.ArrowException, OSError) as e:
        if _is_empty(f):
            raise DataError(f"'{f.name}' is empty (0 bytes); remove it from the data set or write it again") from e
        raise DataError(
            f"'{f.name}' is not a readable Parquet file ({oneline(e)}): it is truncated, damaged or not Parquet; "
            "remove it from the data set or write it again"
        ) from e


def oneline(error: BaseException) -> str:
    """An exception's message on one line (pyarrow's often span several)."""
    return " ".join(str(error).split())


def _is_empty(f: DataFile) -> bool:
    try:
        return f.size() == 0
    except OSError:
        return False


class ParquetSource:
    """Rows of Parquet files, read one row group at a time (only the needed columns)."""

    def __init__(self, files: list[DataFile], metadata: list[pq.FileMetaData], columns: list[str]) -> None:
        self.files = files
        self.columns = columns
        self.pieces = _pieces(files, [[m.row_group(g).num_rows for g in range(m.num_row_groups)] for m in metadata])
        self.rows = sum(p.rows for p in self.pieces)

    def read(self, lo: int, hi: int) -> Iterator[Part]:
        """The rows ``[lo, hi)``, one part per overlapping row group; unreadable ones carry an error."""
        needed = _overlapping(self.pieces, lo, hi)
        for i in sorted({p.file for p in needed}):
            f = self.files[i]
            with pq.ParquetFile(f.path, filesystem=f.fs) as pf:
                for p in (p for p in needed if p.file == i):
                    a, b = max(lo, p.start), min(hi, p.start + p.rows)
                    yield self._read_group(pf, f, p, a, b)

    def _read_group(self, pf: pq.ParquetFile, f: DataFile, p: Piece, a: int, b: int) -> Part:
        where = f"'{f.name}' row group {p.group}"
        try:
            table = pf.read_row_group(p.group, columns=self.columns)
        except (pa.ArrowException, OSError) as e:
            return Part(where=where, rows=b - a, error=self._damaged(pf, p.group, where, e))
        return Part(where=where, rows=b - a, table=table.slice(a - p.start, b - a))

    def _damaged(self, pf: pq.ParquetFile, group: int, where: str, error: Exception) -> DataError:
        """Names the first column of the row group that cannot be read."""
        for col in self.columns:
            try:
                pf.read_row_group(group, columns=[col])
            except (pa.ArrowException, OSError) as e:
                return DataError(f"{where}: column '{col}' cannot be read ({oneline(e)}); the file is damaged: write it again, remove it, {_SKIP_HINT}")
        return DataError(f"{where} cannot be read ({oneline(error)}); the file is damaged: write it again, remove it, {_SKIP_HINT}")


# ---------------------------------------------------------------------------------------------
# CSV.


def _open_text(f: DataFile) -> io.IOBase:
    return f.filesystem().open(f.path, "rb", compression="infer")


def csv_header(f: DataFile) -> list[str]:
    """The column names of a CSV file's header row.

    Raises:
        DataError: the file is empty or its first line is not a CSV header.
    """
    with _open_text(f) as raw:
        line = raw.readline()
    if not line.strip():
        raise DataError(f"'{f.name}' is empty (no header row); remove it from the data set or write a header and rows")
    try:
        return pacsv.read_csv(io.BytesIO(line), read_options=pacsv.ReadOptions(autogenerate_column_names=False)).column_names
    except pa.ArrowInvalid as e:
        raise DataError(f"'{f.name}': the first line is not a CSV header ({oneline(e)}); write the column names on the first line") from e


def _csv_reader(raw: io.IOBase, types: dict[str, pa.DataType], *, use_threads: bool = True) -> pacsv.CSVStreamingReader:
    return pacsv.open_csv(
        raw,
        read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES, use_threads=use_threads),
        convert_options=pacsv.ConvertOptions(
            include_columns=list(types),
            column_types=types,
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )


@dataclass(frozen=True)
class CsvScan:
    """What the first pass over a CSV file found."""

    rows: int
    not_int: frozenset[str]
    """Probed columns holding a value that is not an integer."""


_SCANS: dict[tuple[object, ...], CsvScan] = {}


def scan_csv(f: DataFile, types: dict[str, pa.DataType], probe: list[str], header: list[str]) -> CsvScan:
    """Counts the rows of a CSV file, converting ``types`` columns and probing ``probe`` (read as strings).

    Cached per file content (fsspec's ``ukey``) and arguments.

    Raises:
        DataError: a value does not convert, naming the file and column.
    """
    types = {**types, **{c: pa.string() for c in probe}}
    key = (f.name, f.filesystem().ukey(f.path), tuple((c, str(t)) for c, t in types.items()), tuple(probe))
    if key not in _SCANS:
        _SCANS[key] = _scan(f, types, probe, header)
    return _SCANS[key]


def _scan(f: DataFile, types: dict[str, pa.DataType], probe: list[str], header: list[str]) -> CsvScan:
    rows, not_int = 0, set()
    with _open_text(f) as raw:
        try:
            for batch in _csv_reader(raw, types):
                rows += batch.num_rows
                not_int |= {c for c in probe if c not in not_int and not _all_ints(batch.column(c))}
        except pa.ArrowInvalid as e:
            raise csv_error(f, _row_error(f, types) or e, header, types) from e
    return CsvScan(rows=rows, not_int=frozenset(not_int))


def _row_error(f: DataFile, types: dict[str, pa.DataType]) -> pa.ArrowInvalid | None:
    """The conversion error again from a single-threaded read, the only kind that names the row."""
    with _open_text(f) as raw:
        try:
            for _ in _csv_reader(raw, types, use_threads=False):
                pass
        except pa.ArrowInvalid as e:
            return e
    return None


def _all_ints(arr: pa.Array) -> bool:
    try:
        pc.cast(arr, pa.int64())
    except pa.ArrowInvalid:
        return False
    return True


def csv_error(f: DataFile, error: pa.ArrowInvalid, header: list[str], types: dict[str, pa.DataType]) -> DataError:
    """A conversion error of pyarrow's CSV reader, with the column named."""
    m = re.search(r"column #(\d+)", str(error))
    col = header[int(m.group(1))] if m and int(m.group(1)) < len(header) else None
    if col is None:
        return DataError(f"'{f.name}' cannot be read as CSV ({oneline(error)}); fix the file or write it again")
    return DataError(
        f"'{f.name}' column '{col}' holds a value that is not {_type_words(types.get(col))} ({oneline(error)}); "
        "fix the value, or change the feature that reads the column"
    )


def _type_words(t: pa.DataType | None) -> str:
    if t is not None and pa.types.is_floating(t):
        return "a number"
    if t is not None and pa.types.is_integer(t):
        return "an integer id (set hash: true on the feature to hash other values)"
    return f"of type {t}"


class CsvSource:
    """Rows of CSV files with a header row, streamed in blocks; one piece per file."""

    def __init__(self, files: list[DataFile], rows: list[int], types: dict[str, pa.DataType]) -> None:
        self.files = files
        self.types = types
        self.pieces = _pieces(files, [[n] for n in rows])
        self.rows = sum(rows)

    def read(self, lo: int, hi: int) -> Iterator[Part]:
        """The rows ``[lo, hi)`` in blocks; a file that stops converting ends in one error part."""
        for p in _overlapping(self.pieces, lo, hi):
            yield from self._read_file(self.files[p.file], p, max(lo, p.start), min(hi, p.start + p.rows))

    def _read_file(self, f: DataFile, p: Piece, lo: int, hi: int) -> Iterator[Part]:
        pos = p.start
        with _open_text(f) as raw:
            batches = iter(_csv_reader(raw, self.types))
            while pos < hi:
                try:
                    batch = next(batches, None)
                except pa.ArrowInvalid as e:
                    yield Part(where=f"'{f.name}'", rows=hi - max(pos, lo), error=csv_error(f, e, csv_header(f), self.types))
                    return
                if batch is None:
                    error = DataError(f"'{f.name}' ended after {pos - p.start} of the {p.rows} rows counted before: it changed while being read")
                    yield Part(where=f"'{f.name}'", rows=hi - max(pos, lo), error=error)
                    return
                a, b = max(lo, pos), min(hi, pos + batch.num_rows)
                if a < b:
                    table = pa.Table.from_batches([batch.slice(a - pos, b - a)])
                    yield Part(where=f"'{f.name}' rows {a - p.start + 1}-{b - p.start}", rows=b - a, table=table)
                pos += batch.num_rows
