"""Convert the Criteo click logs (Kaggle ``train.txt``, the 1TB set's ``day_N``) to Parquet.

Each input line is ``label, I1..I13, C1..C26``: a 0/1 click label, 13 integer counts and 26
categorical values written as 8 hex digits; any I or C field may be empty (missing). Fields are
separated by TABs (the original files) or commas; a header line is optional. Both are detected
from the first line. ``.gz``/``.bz2``/``.zst`` inputs are decompressed on the fly.

Output columns (all of them named as in :func:`shardrec.data.schema.criteo_schema`):

* ``label``: int8, 0 or 1, never null.
* ``I1..I13``: nullable int64. The values are integer counts (some are negative, e.g. ``-1``);
  int64 keeps them exactly, and readers cast dense columns to float anyway. Values written like
  ``260.0`` are accepted when integral.
* ``C1..C26``: nullable int64, the hex string read as an unsigned number (``"05db9164"`` ->
  ``0x05db9164``). Hex strings of 1 to 15 digits are accepted too, on a slower path.

Example::

    stats = convert_criteo("day_0", "day_0.parquet")
    print(stats.rows, stats.positives)
"""

from __future__ import annotations

import os
import string
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shardrec.errors import DataError

LABEL = "label"
DENSE = [f"I{i + 1}" for i in range(13)]
SPARSE = [f"C{i + 1}" for i in range(26)]
COLUMNS = [LABEL, *DENSE, *SPARSE]
OUTPUT_SCHEMA = pa.schema(
    [pa.field(LABEL, pa.int8(), nullable=False)]
    + [pa.field(n, pa.int64()) for n in DENSE]
    + [pa.field(n, pa.int64()) for n in SPARSE]
)
_LAYOUT = "label, I1..I13, C1..C26"
_BLOCK_SIZE = 8 << 20
_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX_LUT[_c] = 10 + _i


@dataclass(kw_only=True)
class ConvertStats:
    """What a conversion read."""

    rows: int = 0
    """Data lines converted (the header is not counted)."""
    positives: int = 0
    """Lines with label 1."""
    null_counts: dict[str, int] = field(default_factory=lambda: {n: 0 for n in COLUMNS[1:]})
    """Empty (missing) fields per I and C column."""


@dataclass(kw_only=True)
class _Layout:
    """What the first line says about the file."""

    delimiter: str
    has_header: bool


def convert_criteo(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    row_group_size: int = 262_144,
) -> ConvertStats:
    """Streams a Criteo text file into one Parquet file, in bounded memory.

    Args:
        input_path: Criteo text file, TAB- or comma-separated, with or without a header line.
        output_path: Parquet file to write; written under a temporary name and renamed at the end,
            so a failed conversion leaves no output.
        row_group_size: rows per Parquet row group.

    Returns:
        Row, positive and per-column missing counts.

    Raises:
        DataError: the input is missing or malformed; the message names the file, line and column.
    """
    src, dst = Path(input_path), Path(output_path)
    if row_group_size <= 0:
        raise DataError(f"convert_criteo: row_group_size must be > 0, got {row_group_size}")
    if not src.is_file():
        raise DataError(f"{src} does not exist or is not a file; pass the path of a Criteo text file (e.g. train.txt or day_0)")
    layout = _detect_layout(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        stats = _convert(src, tmp, layout, row_group_size)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return stats


def _detect_layout(src: Path) -> _Layout:
    line = _first_line(src)
    if not line.strip():
        raise DataError(f"{src}, line 1: the file is empty or starts with a blank line; expected Criteo lines ({_LAYOUT})")
    delimiter = "\t" if "\t" in line else ","
    fields = line.split(delimiter)
    if len(fields) != len(COLUMNS):
        sep = "TAB" if delimiter == "\t" else "comma"
        raise DataError(
            f"{src}, line 1: expected {len(COLUMNS)} fields ({_LAYOUT}) separated by TABs or commas, got "
            f"{len(fields)} {sep}-separated fields; is this a Criteo text file?"
        )
    # A header starts with a name such as "label"; an empty first field is a data line missing its label.
    first = fields[0].strip()
    return _Layout(delimiter=delimiter, has_header=bool(first) and not _is_number(first))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _first_line(src: Path, limit: int = 1 << 20) -> str:
    with pa.input_stream(str(src)) as f:
        head = b""
        while b"\n" not in head and len(head) < limit:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            head += chunk
    return head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")


def _convert(src: Path, tmp: Path, layout: _Layout, row_group_size: int) -> ConvertStats:
    stats = ConvertStats()
    first_line = 2 if layout.has_header else 1
    pending: list[pa.RecordBatch] = []
    with pq.ParquetWriter(str(tmp), OUTPUT_SCHEMA) as writer:
        for raw in _raw_batches(src, layout):
            batch = _convert_batch(raw, src=src, line0=first_line + stats.rows)
            _count(batch, stats)
            pending.append(batch)
            if sum(b.num_rows for b in pending) >= row_group_size:
                pending = _write(writer, pending, row_group_size, final=False)
        _write(writer, pending, row_group_size, final=True)
    return stats


def _raw_batches(src: Path, layout: _Layout) -> Iterator[pa.RecordBatch]:
    """Batches of string columns, parse errors turned into DataErrors that name the line."""
    bad_rows: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad_rows.append(row)
        return "error"

    try:
        # open_csv already parses the first block, so it can fail like read_next_batch.
        reader = pacsv.open_csv(str(src), **_csv_options(layout, on_invalid))
        while True:
            try:
                raw = reader.read_next_batch()
            except StopIteration:
                return
            yield raw
    except pa.ArrowInvalid as e:
        raise _parse_error(src, layout, bad_rows, e) from None


def _csv_options(layout: _Layout, on_invalid: Callable[[pacsv.InvalidRow], str]) -> dict[str, Any]:
    return dict(
        # Single-threaded parsing is what makes the reader report line numbers of bad rows.
        read_options=pacsv.ReadOptions(
            column_names=COLUMNS, skip_rows=int(layout.has_header), block_size=_BLOCK_SIZE, use_threads=False
        ),
        # Empty lines stay rows (all null, rejected for the missing label) so line numbers stay exact.
        parse_options=pacsv.ParseOptions(delimiter=layout.delimiter, ignore_empty_lines=False, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in COLUMNS}, strings_can_be_null=True, null_values=[""]
        ),
    )


def _parse_error(src: Path, layout: _Layout, bad_rows: list[pacsv.InvalidRow], e: pa.ArrowInvalid) -> DataError:
    sep = "TAB" if layout.delimiter == "\t" else "comma"
    if not bad_rows:
        return DataError(f"{src}: cannot parse as {sep}-separated Criteo text ({_LAYOUT}): {e}")
    row = bad_rows[0]
    where = f"line {row.number}" if row.number is not None else f"the line '{row.text[:80]}'"
    return DataError(
        f"{src}, {where}: expected {row.expected_columns} {sep}-separated fields ({_LAYOUT}), got "
        f"{row.actual_columns}; the separator was detected from line 1, so fix or drop this line, or check "
        f"that the whole file uses one separator"
    )


def _write(writer: pq.ParquetWriter, pending: list[pa.RecordBatch], row_group_size: int, *, final: bool) -> list[pa.RecordBatch]:
    """Writes whole row groups from ``pending`` (all of it if ``final``); returns the rest."""
    table = pa.Table.from_batches(pending, schema=OUTPUT_SCHEMA)
    n = table.num_rows if final else table.num_rows - table.num_rows % row_group_size
    if n:
        writer.write_table(table.slice(0, n).combine_chunks(), row_group_size=row_group_size)
    return table.slice(n).to_batches()


def _count(batch: pa.RecordBatch, stats: ConvertStats) -> None:
    stats.rows += batch.num_rows
    stats.positives += int(pc.sum(batch.column(LABEL)).as_py() or 0)
    for name in COLUMNS[1:]:
        stats.null_counts[name] += batch.column(name).null_count


def _convert_batch(raw: pa.RecordBatch, *, src: Path, line0: int) -> pa.RecordBatch:
    """Turns a batch of string columns into the output types; ``line0`` is its first line number."""
    arrays = [_label(raw.column(LABEL), src=src, line0=line0)]
    arrays += [_dense(raw.column(n), src=src, line0=line0, name=n) for n in DENSE]
    arrays += [_sparse(raw.column(n), src=src, line0=line0, name=n) for n in SPARSE]
    return pa.RecordBatch.from_arrays(arrays, schema=OUTPUT_SCHEMA)


class _BadValue(Exception):
    """Internal: the value at ``index`` of a column does not parse."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _column(name: str) -> str:
    return f"{COLUMNS.index(name) + 1} ({name})"


def _label(col: pa.StringArray, *, src: Path, line0: int) -> pa.Array:
    try:
        values = _integers(col)
        bad = pc.invert(pc.is_in(values, pa.array([0, 1], pa.int64())))
        if pc.any(bad).as_py():
            raise _BadValue(_first_true(bad))
    except _BadValue as e:
        text = col[e.index].as_py()
        shown = "empty (or the line is blank)" if text is None else f"'{text}'"
        raise DataError(
            f"{src}, line {line0 + e.index}, column {_column(LABEL)}: label is {shown}, expected 0 or 1; every "
            f"Criteo line starts with the 0/1 click label: fix or drop this line"
        ) from None
    return pc.cast(values, pa.int8())


def _dense(col: pa.StringArray, *, src: Path, line0: int, name: str) -> pa.Array:
    try:
        return _integers(col)
    except _BadValue as e:
        raise DataError(
            f"{src}, line {line0 + e.index}, column {_column(name)}: '{col[e.index].as_py()}' is not an integer in "
            f"the int64 range; Criteo {name} values are integers, or empty for missing: fix or blank this field"
        ) from None


def _integers(col: pa.StringArray) -> pa.Array:
    """Parses integers, also written as integral floats like ``260.0``; nulls stay null.

    Raises:
        _BadValue: a value is not an integer, or too large for int64.
    """
    # Casting through float64 is fast both for "3" and "3.0"; a failing string->int64 cast is not.
    try:
        floats = pc.cast(col, pa.float64())
    except pa.ArrowInvalid:
        raise _BadValue(first_unparsable(col, pa.float64())) from None
    not_integral = pc.invert(pc.equal(pc.floor(floats), floats))  # NaN and infinities fail too
    if pc.any(not_integral).as_py():
        raise _BadValue(_first_true(not_integral))
    exact = pc.less(pc.abs(floats), 2.0**53)
    if pc.all(exact).as_py() is not False:
        return pc.cast(floats, pa.int64())
    try:
        return pc.cast(col, pa.int64())
    except pa.ArrowInvalid:
        raise _BadValue(_first_true(pc.invert(exact))) from None


def first_unparsable(col: pa.Array, typ: pa.DataType) -> int:
    """Index of the first value arrow cannot cast to ``typ``, by bisection (only on the error path)."""
    lo, hi = 0, len(col)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(col.slice(lo, mid - lo), typ)
            lo = mid
        except pa.ArrowInvalid:
            hi = mid
    return lo


def _sparse(col: pa.StringArray, *, src: Path, line0: int, name: str) -> pa.Array:
    """Parses hex strings into int64, vectorized when every present value has 8 hex digits."""
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    values = _hex8(col, valid)
    if values is None:
        values = _hex_slow(col, src=src, line0=line0, name=name)
    return pa.array(values, type=pa.int64(), mask=~valid)


def _hex8(col: pa.StringArray, valid: np.ndarray) -> np.ndarray | None:
    """Fast path: None unless every present value is exactly 8 hex digits."""
    lengths = pc.binary_length(col).to_numpy(zero_copy_only=False)
    if not np.all(lengths[valid] == 8):
        return None
    out = np.zeros(len(col), dtype=np.int64)
    if not valid.any():
        return out
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset : col.offset + len(col) + 1]
    # Nulls have length 0, so the present values lie back to back in the data buffer.
    data = np.frombuffer(col.buffers()[2], dtype=np.uint8, count=offsets[-1])[offsets[0] :]
    nibbles = _HEX_LUT[data].reshape(-1, 8)
    if np.any(nibbles == 255):
        return None
    packed = np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2])
    out[valid] = packed.view(">u4").ravel()
    return out


def _hex_slow(col: pa.StringArray, *, src: Path, line0: int, name: str) -> np.ndarray:
    out = np.zeros(len(col), dtype=np.int64)
    for i, text in enumerate(col.to_pylist()):
        if text is None:
            continue
        if not 0 < len(text) < 16 or not all(c in string.hexdigits for c in text):
            raise DataError(
                f"{src}, line {line0 + i}, column {_column(name)}: '{text[:40]}' is not a hex id; Criteo {name} "
                f"values are hex strings (8 digits, like '05db9164'), or empty for missing: fix or blank this field"
            )
        out[i] = int(text, 16)
    return out


def _first_true(mask: pa.Array) -> int:
    return int(np.flatnonzero(mask.fill_null(False).to_numpy(zero_copy_only=False))[0])
