"""Shared steps of the dataset preparers: staging folder, Parquet and CSV I/O, vocabularies, the
scan that sizes the tables and counts labels and ids, and ``schema.yaml``.

A preparer reads its raw input, writes Parquet files into a staging folder and returns a
:class:`Layout`: which columns are labels, dense and sparse features, and where the train and eval
files are. :func:`finish` then scans those files once, sizes every table from the ids it finds,
writes ``schema.yaml`` and returns the :class:`PrepareReport`; :func:`staging` renames the folder
into place only when all of that succeeded.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

# The Criteo converter's bisection finds the first value arrow cannot cast, the same way here.
from shardrec.data.criteo_convert import first_unparsable
from shardrec.data.schema import DenseFeature, FeatureSchema, SparseFeature, TableConfig
from shardrec.errors import ConfigError, DataError
from shardrec.output import write_atomic

SCHEMA_FILE = "schema.yaml"
MIN_HASH_ROWS = 16


# ---------------------------------------------------------------------------------------------
# Options every dataset takes, what a preparer hands back, and what prepare() reports.


@dataclass(kw_only=True)
class BaseOptions:
    """Options of every dataset; each dataset's options class adds its own."""

    embedding_dim: int = 16
    """Width of every embedding table."""

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0:
            raise ConfigError(f"--embedding-dim must be > 0, got {self.embedding_dim}")


@dataclass(kw_only=True)
class Layout:
    """The columns a preparer wrote and the folders holding them, before the tables are sized."""

    labels: list[str]
    """0/1 label columns, one per task."""
    dense: list[DenseFeature]
    """Dense features, in model order."""
    sparse: list[SparseFeature]
    """Sparse features; each names its table, whose size :func:`finish` works out from the data."""
    train: str
    """Train Parquet file or folder, relative to the output folder."""
    eval: str | None
    """Eval Parquet file or folder, relative to the output folder; None: no eval split."""
    embedding_dim: int
    """Width of every table."""
    hash_rows: int | None = None
    """Rows of every hashed table; None: twice the distinct ids seen, rounded up to a multiple of 16."""
    vocab_sizes: dict[str, int] = field(default_factory=dict)
    """Rows a table needs at least, by table name: the size of its vocabulary, which may hold ids
    that no written row uses (e.g. a user whose only event makes no sample)."""
    pooling: dict[str, str] = field(default_factory=dict)
    """Pooling of a table other than sum, by table name (e.g. mean for a table a long history reads)."""
    items: str | None = None
    """Item catalogue Parquet file, relative to the output folder (``data.items_path``); None: none."""


@dataclass(kw_only=True)
class SplitReport:
    """Rows and label counts of one split."""

    path: Path
    """Final (absolute) Parquet file or folder."""
    rows: int
    """Rows in the split."""
    positives: dict[str, int]
    """Rows with label 1, per label column."""


@dataclass(kw_only=True)
class PrepareReport:
    """What ``shardrec data prepare`` wrote."""

    dataset: str
    """Registered name of the dataset."""
    output: Path
    """The output folder."""
    schema_path: Path
    """``schema.yaml`` in the output folder: ``features`` and ``data`` sections of a job."""
    schema: FeatureSchema
    """The feature schema written there."""
    train: SplitReport
    """The training split."""
    eval: SplitReport | None
    """The evaluation split, if any."""
    cardinalities: dict[str, int]
    """Distinct ids per sparse feature over all splits (bucketized: distinct buckets; hashed: raw ids)."""

    def summary(self) -> str:
        """A few lines for the terminal: splits, label balance, ids per feature and table sizes."""
        lines = [f"{self.dataset} -> {self.output}", f"  schema: {self.schema_path}"]
        for name, split in (("train", self.train), ("eval", self.eval)):
            if split is not None:
                lines.append(f"  {name}: {split.rows:,} rows in {split.path}")
                lines += [f"    {label}: {_balance(n, split.rows)}" for label, n in split.positives.items()]
        lines.append("  sparse features (distinct ids -> table rows):")
        for f in _looked_up(self.schema.sparse):
            table = self.schema.table(f.table)  # type: ignore[arg-type]
            lines.append(f"    {f.name}: {self.cardinalities[f.name]:,} -> {table.name} [{table.num_embeddings:,} x {table.embedding_dim}]")
        return "\n".join(lines)


def _balance(positives: int, rows: int) -> str:
    share = positives / rows if rows else 0.0
    return f"{positives:,} positive, {rows - positives:,} negative ({share:.1%} positive)"


# ---------------------------------------------------------------------------------------------
# The output folder: staged next to DIR, renamed into place at the end.


@contextmanager
def staging(output: Path) -> Iterator[Path]:
    """A fresh folder next to ``output`` that becomes ``output`` when the block succeeds.

    Raises:
        DataError: ``output`` already exists and is not an empty folder.
    """
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise DataError(f"output '{output}' already exists; remove it or pass another --output folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        # rename() replaces an empty folder but fails on a non-empty one: a concurrent writer loses.
        os.rename(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_parquet(table: pa.Table, path: Path, *, row_group_size: int = 262_144) -> None:
    """Writes ``table`` to ``path`` under a temporary name, then renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(table, tmp, row_group_size=row_group_size)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_split(table: pa.Table, is_eval: np.ndarray, work: Path, *, rng: np.random.Generator) -> None:
    """Writes ``work/train.parquet`` (rows not ``is_eval``, shuffled: the reader reads in file
    order) and ``work/eval.parquet`` (the ``is_eval`` rows, in order)."""
    train = table.filter(pa.array(~is_eval))
    write_parquet(train.take(rng.permutation(train.num_rows)), work / "train.parquet")
    write_parquet(table.filter(pa.array(is_eval)), work / "eval.parquet")


# ---------------------------------------------------------------------------------------------
# Reading raw inputs, with errors that name the file, column and line.


def require_file(path: Path, *, what: str) -> Path:
    """``path`` if it is a file; otherwise a DataError saying what was expected there."""
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file; expected {what}")
    return path


def require_columns(names: list[str], path: Path, required: list[str]) -> None:
    """Raises a DataError naming the first column of ``required`` missing from ``names``."""
    for col in required:
        if col not in names:
            raise DataError(f"{path} has no column '{col}'; its columns are: {', '.join(names)}. Rename the column or fix the file")


def read_parquet(path: Path, *, columns: list[str]) -> pa.Table:
    """The ``columns`` of a Parquet file, each checked to be present."""
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file ({e}); rewrite it as Parquet") from e
    require_columns(names, path, columns)
    return pq.read_table(path, columns=columns)


def read_csv(path: Path, *, names: list[str] | None = None, required: list[str] | None = None) -> pa.Table:
    """Reads a CSV file (``.gz`` too) with every column as strings; empty fields become null.

    Args:
        path: the file.
        names: column names of a file without a header line; None: the first line is the header.
        required: columns the file must have, checked before it is read.

    Raises:
        DataError: the file is unreadable, lacks a required column, or a line has the wrong
            number of fields.
    """
    header = names is None
    names = first_line(path) if names is None else names
    require_columns(names, path, required or [])
    bad: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad.append(row)
        return "error"

    try:
        return pacsv.read_csv(
            str(path),
            # Single-threaded reading is what makes arrow report the line of a bad row.
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=int(header), use_threads=False),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True),
        )
    except (pa.ArrowInvalid, OSError) as e:
        if bad:
            row = bad[0]
            raise DataError(
                f"{path}, line {row.number}: expected {row.expected_columns} comma-separated fields, got "
                f"{row.actual_columns}; fix or drop this line"
            ) from None
        raise DataError(f"{path}: cannot read as CSV ({e}); check that it is a comma-separated text file") from e


def first_line(path: Path) -> list[str]:
    """The comma-separated fields of the file's first line, stripped (a header's column names)."""
    try:
        with pa.input_stream(str(path)) as f:
            first = f.read(1 << 20).split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read its first line ({e}); expected a comma-separated text file") from e
    if not first.strip():
        raise DataError(f"{path}: the first line is empty; expected comma-separated fields (a header, where the file has one)")
    return [n.strip() for n in first.split(",")]


def parse_numbers(col: pa.Array, *, path: Path, column: str, line0: int, integer: bool, nullable: bool) -> pa.Array:
    """Parses a string column into int64 (``integer``) or float64; ``line0`` is row 0's line.

    Raises:
        DataError: naming the file, line and column of the first value that is not a number (or
            not an integer, or empty where ``nullable`` is False).
    """
    typ = pa.int64() if integer else pa.float64()
    kind = "an integer" if integer else "a number"
    if not nullable and col.null_count:
        row = _first_true(col.is_null())
        raise DataError(f"{path}, line {line0 + row}, column '{column}': empty value, expected {kind}; fill it in or drop the line")
    trimmed = pc.utf8_trim_whitespace(col)
    try:
        return pc.cast(trimmed, typ)
    except pa.ArrowInvalid:
        row = first_unparsable(trimmed, typ)
        raise DataError(f"{path}, line {line0 + row}, column '{column}': '{col[row].as_py()}' is not {kind}; fix or drop the line") from None


def parse_labels(col: pa.Array, *, path: Path, column: str, line0: int) -> pa.Array:
    """Parses a 0/1 label column into int8.

    Raises:
        DataError: naming the file, line and column of the first value that is not 0 or 1.
    """
    values = parse_numbers(col, path=path, column=column, line0=line0, integer=False, nullable=False)
    bad = pc.invert(pc.is_in(values, pa.array([0.0, 1.0])))
    if pc.any(bad).as_py():
        row = _first_true(bad)
        raise DataError(
            f"{path}, line {line0 + row}, column '{column}': label is '{col[row].as_py()}', expected 0 or 1; "
            "fix or drop the line"
        )
    return pc.cast(values, pa.int8())


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int:
    return int(np.flatnonzero(mask.fill_null(False).to_numpy(zero_copy_only=False))[0])


# ---------------------------------------------------------------------------------------------
# Vocabularies and histories.


def vocabulary(*columns: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Sorted distinct non-null values over ``columns``; a value's index is its id."""
    values = pa.chunked_array([c for col in columns for c in _chunks(col)])
    unique = pc.unique(values.drop_null())
    return unique.take(pc.array_sort_indices(unique))


def _chunks(col: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return col.chunks if isinstance(col, pa.ChunkedArray) else [col]


def encode(col: pa.Array | pa.ChunkedArray, vocab: pa.Array) -> pa.Array:
    """Ids of ``col``'s values in ``vocab`` as int64 (nulls stay null); every value must be in it."""
    ids = pc.index_in(col, value_set=vocab)
    assert ids.null_count == col.null_count, "encode: a value is missing from its vocabulary"
    return pc.cast(ids, pa.int64()).combine_chunks() if isinstance(ids, pa.ChunkedArray) else pc.cast(ids, pa.int64())


def write_vocab(out: Path, name: str, vocab: pa.Array) -> None:
    """Writes ``out/vocab/<name>.parquet``: the raw value of each id, to map ids back."""
    write_parquet(pa.table({"id": pa.array(np.arange(len(vocab)), pa.int64()), "value": vocab}), out / "vocab" / f"{name}.parquet")


def previous_values(groups: np.ndarray, values: np.ndarray, *, max_len: int) -> pa.ListArray:
    """For each row, the ``values`` of the up to ``max_len`` rows before it in its group, oldest first.

    Rows must be sorted by group, then time: row i gets ``values[max(start, i - max_len):i]``,
    where ``start`` is the first row of its group (so a group's first row gets an empty list).
    """
    n = len(groups)
    index = np.arange(n)
    first = np.ones(n, dtype=bool)
    first[1:] = groups[1:] != groups[:-1]
    group_start = np.maximum.accumulate(np.where(first, index, 0))
    lo = np.maximum(group_start, index - max_len)
    lengths = index - lo
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise DataError(f"histories hold {offsets[-1]:,} ids in all, more than one Parquet list column can; lower max_len")
    positions = np.repeat(lo - offsets[:-1], lengths) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values[positions], pa.int64()))


def group_last(groups: np.ndarray, *, count: np.ndarray | int) -> np.ndarray:
    """Mask of the last ``count`` rows of each group (rows sorted by group; ``count`` per row or one)."""
    n = len(groups)
    last = np.ones(n, dtype=bool)
    last[:-1] = groups[1:] != groups[:-1]
    index = np.arange(n)
    # The end of each row's group: the next group boundary at or after it.
    ends = np.flatnonzero(last)
    group_end = ends[np.searchsorted(ends, index)]
    return group_end - index < count


# ---------------------------------------------------------------------------------------------
# Finishing: scan the written files, size the tables, write schema.yaml, report.


@dataclass(kw_only=True)
class _Scan:
    """Per-feature distinct ids (sorted) and per-split rows and positives."""

    ids: dict[str, np.ndarray] = field(default_factory=dict)
    splits: dict[str, tuple[int, dict[str, int]]] = field(default_factory=dict)


def finish(layout: Layout, *, work: Path, output: Path, dataset: str) -> PrepareReport:
    """Sizes the tables from the files in ``work``, writes ``work/schema.yaml``, returns the report.

    Paths in ``schema.yaml`` and the report point at ``output``, where ``work`` will be renamed.
    """
    scan = _scan(layout, work)
    for split, (rows, _) in scan.splits.items():
        if rows == 0:
            raise DataError(
                f"{dataset}: the {split} split is empty, the input is too small for this split; pass more data "
                "(or another --split where the dataset has one)"
            )
    schema = FeatureSchema(
        label=layout.labels[0] if len(layout.labels) == 1 else list(layout.labels),
        dense=layout.dense,
        sparse=layout.sparse,
        tables=_tables(layout, scan),
    )
    paths = {"train": output / layout.train, "eval": output / layout.eval if layout.eval else None}
    note = f"shardrec data prepare {dataset}"
    write_schema_yaml(work / SCHEMA_FILE, schema, train_path=paths["train"], eval_path=paths["eval"], note=note,
                      final=output / SCHEMA_FILE, items_path=output / layout.items if layout.items else None)
    splits = {
        name: SplitReport(path=p, rows=scan.splits[name][0], positives=scan.splits[name][1])
        for name, p in paths.items() if p is not None
    }
    return PrepareReport(
        dataset=dataset,
        output=output,
        schema_path=output / SCHEMA_FILE,
        schema=schema,
        train=splits["train"],
        eval=splits.get("eval"),
        cardinalities={name: len(ids) for name, ids in scan.ids.items()},
    )


def _scan(layout: Layout, work: Path) -> _Scan:
    scan = _Scan(ids={f.name: np.empty(0, np.int64) for f in _looked_up(layout.sparse)})
    for split, rel in (("train", layout.train), ("eval", layout.eval)):
        if rel is None:
            continue
        rows, positives = 0, {label: 0 for label in layout.labels}
        for file in _parquet_files(work / rel):
            rows += _scan_file(file, layout, scan, positives)
        scan.splits[split] = (rows, positives)
    return scan


def _looked_up(sparse: list[SparseFeature]) -> list[SparseFeature]:
    """The features whose column holds table ids: not raw ones, not drawn negatives."""
    return [f for f in sparse if not f.raw and f.negatives is None]


def _parquet_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.parquet")) if path.is_dir() else [path]


def _scan_file(file: Path, layout: Layout, scan: _Scan, positives: dict[str, int]) -> int:
    """Adds one file's labels and ids to the counts; returns its rows."""
    sparse = _looked_up(layout.sparse)
    columns = list(dict.fromkeys([*layout.labels, *(f.column for f in sparse)]))
    pf = pq.ParquetFile(file)
    found: dict[str, list[np.ndarray]] = {f.name: [] for f in sparse}
    for g in range(pf.num_row_groups):
        table = pf.read_row_group(g, columns=columns)
        for label in layout.labels:
            positives[label] += int(pc.sum(table.column(label)).as_py() or 0)
        for f in sparse:
            found[f.name].append(np.unique(_feature_ids(table.column(f.column), f, file)))
    for name, parts in found.items():
        scan.ids[name] = np.unique(np.concatenate([scan.ids[name], *parts]))
    return pf.metadata.num_rows


def _feature_ids(col: pa.ChunkedArray, f: SparseFeature, file: Path) -> np.ndarray:
    """The non-null ids (bucket ids for a bucketized feature) of one column chunk."""
    arr = col.combine_chunks()
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        arr = arr.flatten()
    values = arr.drop_null().to_numpy(zero_copy_only=False)
    if f.boundaries is not None:
        return np.searchsorted(np.asarray(f.boundaries), values, side="right").astype(np.int64)
    assert np.issubdtype(values.dtype, np.integer), f"{file}: column '{f.column}' is not integer"
    if not f.hash and values.size and values.min() < 0:
        raise DataError(f"{file}, column '{f.column}': id {values.min()} is negative; ids of an unhashed feature must be >= 0")
    return values.astype(np.int64)


def _tables(layout: Layout, scan: _Scan) -> list[TableConfig]:
    """One table per table name, in order of first use, sized from the ids bound to it."""
    tables = []
    for name in dict.fromkeys(f.table for f in layout.sparse if not f.raw):
        bound = [f for f in _looked_up(layout.sparse) if f.table == name]
        ids = np.unique(np.concatenate([scan.ids[f.name] for f in bound]))
        rows = max(_table_rows(bound, ids, layout.hash_rows), layout.vocab_sizes.get(name, 0))
        tables.append(TableConfig(name=name, num_embeddings=rows, embedding_dim=layout.embedding_dim,
                                  pooling=layout.pooling.get(name, "sum")))
    return tables


def _table_rows(bound: list[SparseFeature], ids: np.ndarray, hash_rows: int | None) -> int:
    if any(f.boundaries is not None for f in bound):
        return max(len(f.boundaries or []) + 1 for f in bound)
    if any(f.hash for f in bound):
        return hash_rows or max(MIN_HASH_ROWS, 16 * math.ceil(2 * len(ids) / 16))
    return int(ids[-1]) + 1 if ids.size else 1


def write_schema_yaml(
    path: Path, schema: FeatureSchema, *, train_path: Path, eval_path: Path | None, note: str, final: Path,
    items_path: Path | None = None,
) -> None:
    """Writes the ``features`` and ``data`` sections of a job, leaving out fields at their defaults.

    Args:
        path: where to write it now.
        schema: the ``features`` section.
        train_path: ``data.train_path``.
        eval_path: ``data.eval_path``; None: left out.
        items_path: ``data.items_path`` (the item catalogue); None: left out.
        note: what wrote the file, for its header comment.
        final: where the file will be read from, for the ``include:`` line of the header comment.
    """
    data = {"train_path": str(train_path)} | ({"eval_path": str(eval_path)} if eval_path else {})
    data |= {"items_path": str(items_path)} if items_path else {}
    features = {
        "label": schema.label,
        "dense": [_non_default(f) for f in schema.dense],
        "sparse": [_non_default(f) for f in schema.sparse],
        "tables": [_non_default(t) for t in schema.tables],
    }
    head = (
        f"# Written by `{note}`. Use it from a job file that adds only a model section:\n"
        f"#   include: [{final}]\n"
        "#   model: {name: dlrm}  # or any registered model and its keys\n"
    )
    # One line per feature and table; the data paths one per line too.
    text = (
        head
        + yaml.safe_dump({"features": features}, sort_keys=False, default_flow_style=None, width=120)
        + yaml.safe_dump({"data": data}, sort_keys=False, default_flow_style=False)
    )
    write_atomic(path, text)


def _non_default(obj: Any) -> dict[str, Any]:
    out = {}
    for f in fields(obj):
        if not f.init:  # derived state (e.g. a table's resolved precision), not a YAML key
            continue
        value = getattr(obj, f.name)
        default = f.default_factory() if callable(f.default_factory) else f.default
        if value != default:
            out[f.name] = list(value) if isinstance(value, list) else _non_default(value) if is_dataclass(value) else value
    return out


__all__: list[str] = [
    "BaseOptions",
    "Layout",
    "PrepareReport",
    "SplitReport",
    "encode",
    "finish",
    "first_line",
    "group_last",
    "parse_labels",
    "parse_numbers",
    "previous_values",
    "read_csv",
    "read_parquet",
    "require_columns",
    "require_file",
    "staging",
    "vocabulary",
    "write_parquet",
    "write_split",
    "write_vocab",
]
