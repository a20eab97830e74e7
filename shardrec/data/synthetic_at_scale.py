"""Synthetic Parquet data sets at benchmark scale: many files, written in parallel, one ``schema.yaml``.

Each sparse feature draws ids from its own table with a power law (id rank ``r`` has probability
~ ``r**-zipf_a``; ranks map to ids through the per-table permutation of :mod:`synthetic`), one id
per row or a ``list<int64>`` of them for multi-hot tables. Dense values, the per-id weights and the
planted label signal are those of :mod:`shardrec.data.synthetic_signal`. The hottest ids are drawn in O(1)
each with Walker's alias method instead of a binary search, which is what makes this generator fast.
Multi-hot rows pool their ids' weights as sum / sqrt(length), so the label keeps its calibration.

File ``i`` depends only on the seed and ``i``, so the data are the same for any number of processes.
The folder is written under a temporary name and renamed when complete.

Example::

    layout = load_layout(tables="26x100000:16,2x1M:64:~20:1.05", config=None, dense=13, shape=IdShape())
    write_dataset(SynthConfig(output=Path("data/bench"), rows=10_000_000, files=16, processes=2), layout)
    # a job then says: include: [data/bench/schema.yaml]
"""

from __future__ import annotations

import csv
import dataclasses
import multiprocessing
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from shardrec.config import build, load_yaml, to_dict
from shardrec.data.schema import DenseFeature, FeatureSchema, SparseFeature, TableConfig
from shardrec.data.synthetic_signal import (
    _NOISE_STD,
    _POSITIVE_RATE,
    _dense_part,
    _draw_columns,
    _draw_ids,
    _id_weights,
    _make_signal,
    _Signal,
    _sigmoid,
    _table_draw,
    _TableDraw,
)
from shardrec.errors import ConfigError, DataError

SPEC_FORM = "COUNTxROWS[:DIM[:HOTNESS[:ZIPF_A]]] groups separated by commas"
_SPEC_HELP = (
    f"expected {SPEC_FORM}, e.g. 26x100000:16 (26 tables of 100000 rows, dim 16) or 4x1M:64:~20:1.05 "
    "(4 tables of 1M rows, dim 64, 20 ids per row on average, exponent 1.05); HOTNESS is N (exactly N ids "
    "per row) or ~N (N on average); or a .yaml/.csv file listing name, rows, dim, hotness, zipf_a"
)
_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}
_ROW_STREAM = 4  # synthetic.py seeds its streams [seed, 0..3]; file i of this generator uses [seed, 4, i]
_MAX_LIST_VALUES = 2**31 - 1  # Arrow list offsets are int32
# Measured on 26 id + 13 float columns: ~2.5x faster than pyarrow's defaults (dictionaries, min/max
# statistics), for files ~30% larger; --compression zstd gets them smaller than the defaults' instead.
_WRITE_OPTIONS: dict[str, Any] = {"use_dictionary": False, "write_statistics": False, "use_byte_stream_split": True}
_HOT_RANKS = 4096  # ranks in the alias table: ~80 KB, it stays in cache


# --- tables -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class IdShape:
    """How many ids each row of a table holds and how they are spread."""

    hotness: float = 1.0
    """Ids per row: exactly this many when ``fixed``, else this many on average (1 + Poisson)."""
    fixed: bool = True
    """Every row holds exactly ``hotness`` ids; off: row lengths vary, at least 1."""
    zipf_a: float = 1.2
    """Power-law exponent of id frequencies (rank r is drawn with probability ~ r**-zipf_a)."""

    def __post_init__(self) -> None:
        if self.hotness < 1 or (self.fixed and self.hotness != int(self.hotness)):
            raise ConfigError(f"hotness must be an integer >= 1 (N) or a mean >= 1 (~N), got {self.hotness}")
        if self.zipf_a <= 0:
            raise ConfigError(f"zipf_a must be > 0, got {self.zipf_a}")

    @property
    def is_list(self) -> bool:
        """Whether the column holds a list of ids per row rather than one id."""
        return self.hotness > 1 or not self.fixed

    def override(self, *, hotness: str | float | None = None, zipf_a: float | None = None) -> IdShape:
        """This shape with ``hotness`` (``"4"``: exactly 4 ids per row, ``"~4.5"``: 4.5 on average) and ``zipf_a`` where set."""
        shape = self if zipf_a is None else replace(self, zipf_a=zipf_a)
        if hotness is None:
            return shape
        raw = str(hotness).strip()
        try:
            return replace(shape, hotness=float(raw.lstrip("~")), fixed=not raw.startswith("~"))
        except ValueError:
            raise ConfigError(f"hotness '{hotness}' is not N (exactly N ids per row) or ~N (N on average)") from None


@dataclass(kw_only=True)
class TableSpec:
    """One entry of a ``--tables`` YAML or CSV file: a table and the one id feature that reads it."""

    name: str
    """Feature (and column) name; the table is ``t_<name>``."""
    rows: int
    """Rows of the table: ids are in [0, rows)."""
    dim: int = 16
    """Embedding width."""
    hotness: str | float | None = None
    """N or ~N ids per row; unset: the command's default."""
    zipf_a: float | None = None
    """Power-law exponent; unset: the command's default."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The columns to write: a feature schema plus how each table's ids are drawn."""

    schema: FeatureSchema
    """Label, dense and sparse features and their tables."""
    shapes: dict[str, IdShape]
    """Id shape per table name."""


def load_layout(*, tables: str | None, config: Path | None, dense: int | None, shape: IdShape) -> Layout:
    """The layout from a ``--tables`` spec or file, or from a job file's ``features:`` section.

    Args:
        tables: a compact spec (see ``SPEC_FORM``) or a .yaml/.csv file; None with no ``config``:
            26 single-id tables of 100000 rows (Criteo-shaped).
        config: a job YAML whose ``features:`` the data follow (all tables get ``shape``).
        dense: dense columns next to ``tables`` (default 13); not allowed with ``config``.
        shape: the id shape of tables that do not set their own.
    """
    if config is not None:
        if tables is not None or dense is not None:
            raise ConfigError("--tables and --dense describe the columns themselves; with --config they come from its features: section")
        return _layout_from_job(config, shape)
    spec = tables or "26x100000:16"
    specs = _read_table_file(Path(spec)) if spec.endswith((".yaml", ".yml", ".csv")) else parse_spec(spec)
    return _layout(specs, dense=13 if dense is None else dense, shape=shape)


def parse_spec(spec: str) -> list[TableSpec]:
    """Parses a compact spec such as ``26x100000:16,4x1M:64:~20:1.05`` into tables C1, C2, ...

    Raises:
        ConfigError: naming the bad part and the expected form.
    """
    out: list[TableSpec] = []
    for part in spec.split(","):
        try:
            count, table = _parse_group(part.strip())
        except ValueError as e:
            raise ConfigError(f"--tables: bad part '{part}' in '{spec}' ({e}); {_SPEC_HELP}") from None
        out += [replace(table, name=f"C{len(out) + i + 1}") for i in range(count)]
    return out


def _parse_group(part: str) -> tuple[int, TableSpec]:
    head, *rest = part.split(":")
    if len(rest) > 3:
        raise ValueError("more than four ':'-separated fields")
    count, x, rows = head.rpartition("x")
    dim, hotness, zipf_a = [*rest, "", "", ""][:3]
    table = TableSpec(
        name="",
        rows=_positive(rows, "ROWS", suffix=True),
        dim=_positive(dim, "DIM") if dim else 16,
        hotness=hotness or None,
        zipf_a=_number(zipf_a, "ZIPF_A") if zipf_a else None,
    )
    try:
        IdShape().override(hotness=table.hotness, zipf_a=table.zipf_a)  # reject bad values while the part can be named
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return (_positive(count, "COUNT") if x else 1), table


def _positive(text: str, what: str, *, suffix: bool = False) -> int:
    m = re.fullmatch(r"(\d+)([kMG]?)" if suffix else r"(\d+)()", text.strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"{what} '{text}' is not a positive integer" + (" (suffixes k, M, G allowed)" if suffix else ""))
    return int(m.group(1)) * _SUFFIXES[m.group(2)]


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} '{text}' is not a number") from None


def _read_table_file(path: Path) -> list[TableSpec]:
    """Tables from a YAML list of mappings or a CSV with columns name, rows[, dim[, hotness[, zipf_a]]]."""
    if not path.is_file():
        raise ConfigError(f"--tables file '{path}' does not exist; pass an existing .yaml/.csv file or a spec: {_SPEC_HELP}")
    if path.suffix == ".csv":
        keys = [f.name for f in dataclasses.fields(TableSpec)]
        lines = [r for r in csv.reader(path.read_text().splitlines()) if r and not r[0].startswith("#")]
        if lines and lines[0][0].strip() == "name":
            keys, lines = [k.strip() for k in lines[0]], lines[1:]
        # Cells are parsed as YAML scalars so that 100000 is an int and 1.05 a float, as in the YAML form.
        items: Any = [{k: yaml.safe_load(v) for k, v in zip(keys, row) if v.strip()} for row in lines]
    else:
        items = yaml.safe_load(path.read_text())
    if not isinstance(items, list) or not items:
        raise ConfigError(f"--tables file '{path}' must list one or more tables (name, rows, dim, hotness, zipf_a)")
    return [build(TableSpec, item, key=f"{path.name}[{i}]") for i, item in enumerate(items)]


def _layout(specs: list[TableSpec], *, dense: int, shape: IdShape) -> Layout:
    if dense < 0:
        raise ConfigError(f"--dense must be >= 0, got {dense}")
    shapes = {}
    for s in specs:
        try:
            shapes[f"t_{s.name}"] = shape.override(hotness=s.hotness, zipf_a=s.zipf_a)
        except ConfigError as e:
            raise ConfigError(f"--tables: table '{s.name}': {e}") from None
    schema = FeatureSchema(
        label="label",
        dense=[DenseFeature(name=f"I{i + 1}", fill_missing=0.0, transform="log1p") for i in range(dense)],
        sparse=[SparseFeature(name=s.name, table=f"t_{s.name}") for s in specs],
        tables=[TableConfig(name=f"t_{s.name}", num_embeddings=s.rows, embedding_dim=s.dim) for s in specs],
    )
    return Layout(schema=schema, shapes=shapes)


def _layout_from_job(path: Path, shape: IdShape) -> Layout:
    data = load_yaml(path)
    if "features" not in data:
        raise ConfigError(f"config file '{path}' has no features: section; pass a job file or use --tables")
    schema = build(FeatureSchema, data["features"], key="features")
    for i, f in enumerate(schema.sparse):
        kinds = [k for k in ("source", "weights", "boundaries", "cross") if getattr(f, k) is not None]
        if kinds:
            raise ConfigError(
                f"features.sparse[{i}] ('{f.name}') sets {kinds[0]}; synth writes plain id columns only "
                "(one per feature); drop that feature or describe the tables with --tables"
            )
    return Layout(schema=schema, shapes={t.name: shape for t in schema.tables})


# --- the data set -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SynthConfig:
    """Where and how a synthetic data set is written."""

    output: Path
    """Folder to create (it must not exist, or be empty); it gets the Parquet files and schema.yaml."""
    rows: int
    """Rows in all."""
    files: int = 8
    """Parquet files; rows are split evenly. The data depend on it (not on ``processes``)."""
    processes: int = 1
    """Processes writing files in parallel; each writes whole files."""
    row_group_size: int = 65_536
    """Rows per Parquet row group; also the unit of generation, bounding memory."""
    seed: int = 0
    """Seed of everything: ids, values, weights and labels."""
    label_signal: bool = True
    """Labels follow synthetic.py's planted, learnable logit; off: independent coin flips (faster)."""
    compression: Literal["none", "snappy", "lz4", "zstd"] = "snappy"
    """Parquet compression codec."""

    def __post_init__(self) -> None:
        for key in ("rows", "files", "processes", "row_group_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be > 0, got {getattr(self, key)}")
        if self.files > self.rows:
            raise ConfigError(f"--files ({self.files}) must not exceed --rows ({self.rows}): every file needs a row")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")


@dataclass(frozen=True, kw_only=True)
class SynthResult:
    """What :func:`write_dataset` wrote and how fast."""

    path: Path
    rows: int
    files: int
    row_groups: int
    processes: int
    seconds: float

    def summary(self) -> str:
        """One line for the console."""
        return (
            f"wrote {self.path}: {self.rows} rows in {self.files} files ({self.row_groups} row groups) "
            f"in {self.seconds:.2f} s with {self.processes} process{'es' * (self.processes > 1)}: {self.rows / self.seconds:,.0f} rows/s"
        )


def write_dataset(cfg: SynthConfig, layout: Layout) -> SynthResult:
    """Writes ``cfg.rows`` rows of ``layout`` as ``cfg.files`` Parquet files plus ``schema.yaml``.

    Raises:
        ConfigError: the output exists and is not empty, or a row group would hold too many ids.
        DataError: the output folder cannot be written.
    """
    start = time.perf_counter()
    final = cfg.output.expanduser().absolute()
    _check_output(final, cfg, layout)
    tmp = _make_temp(final)
    try:
        processes = min(cfg.processes, cfg.files)
        jobs = [(cfg, layout, tmp, list(range(p, cfg.files, processes))) for p in range(processes)]
        if processes == 1:
            groups = _write_files(*jobs[0])
        else:
            # spawn: workers start clean, whatever threads (torch, arrow) the caller has running
            with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
                groups = sum(pool.map(_write_files, *zip(*jobs)))
        _write_schema(tmp / "schema.yaml", layout.schema, final, cfg)
        try:
            os.rename(tmp, final)
        except OSError as e:
            raise DataError(f"cannot move the finished data set to '{final}' ({e}); did something else write there meanwhile?") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    return SynthResult(path=final, rows=cfg.rows, files=cfg.files, row_groups=groups, processes=processes, seconds=seconds)


def _check_output(final: Path, cfg: SynthConfig, layout: Layout) -> None:
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):
        raise ConfigError(f"--output '{final}' already exists and is not an empty folder; remove it or choose another --output")
    widest = max((s.hotness for s in layout.shapes.values() if s.is_list), default=1.0)
    # 4x the mean leaves room for the Poisson spread of variable lengths.
    if cfg.row_group_size * widest * 4 > _MAX_LIST_VALUES:
        raise ConfigError(f"--row-group-size {cfg.row_group_size} x hotness {widest} ids overflow an Arrow list; lower --row-group-size")


def _make_temp(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise DataError(f"cannot create '{tmp}' next to --output ({e}); choose a writable --output") from e
    return tmp


def _write_schema(path: Path, schema: FeatureSchema, final: Path, cfg: SynthConfig) -> None:
    doc = {"features": to_dict(schema), "data": {"train_path": str(final)}}
    header = f"# shardrec data synth: {cfg.rows} rows in {cfg.files} files, seed {cfg.seed}. A job uses it with: include: [{final / path.name}]\n"
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))


def file_rows(rows: int, files: int) -> list[int]:
    """Rows of each file: an even split, the first files one row longer."""
    return [rows // files + (i < rows % files) for i in range(files)]


# --- one process ---------------------------------------------------------------------------------


def _write_files(cfg: SynthConfig, layout: Layout, folder: Path, indices: list[int]) -> int:
    """Writes files ``indices`` into ``folder``; returns the number of row groups written."""
    plan = _Plan.build(layout, seed=cfg.seed, label_signal=cfg.label_signal)
    sizes = file_rows(cfg.rows, cfg.files)
    groups = 0
    for i in indices:
        rng = np.random.default_rng([cfg.seed, _ROW_STREAM, i])
        path = folder / f"part-{i:05d}.parquet"
        with pq.ParquetWriter(str(path), plan.arrow_schema, **_WRITE_OPTIONS, compression=cfg.compression) as w:
            for start in range(0, sizes[i], cfg.row_group_size):
                n = min(cfg.row_group_size, sizes[i] - start)
                w.write_table(plan.chunk(rng, n), row_group_size=n)
                groups += 1
    return groups


@dataclass(frozen=True, kw_only=True)
class _AliasTable:
    """Walker's alias table over the hottest ranks, plus one bucket standing for all later ranks.

    Bucket ``b`` keeps its own entry when 32 random bits are below ``keep[b]``, else it takes its
    alias. ``ids`` holds the own ids then the alias ids (``-1``: a later rank); ``weights`` the
    matching per-id weights of the planted signal.
    """

    keep: np.ndarray
    ids: np.ndarray
    weights: np.ndarray

    @staticmethod
    def build(probs: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> _AliasTable:
        keep, alias = alias_table(probs / probs.sum())
        return _AliasTable(
            keep=np.minimum(np.round(keep * 2.0**32), 2.0**32 - 1).astype(np.uint32),
            ids=np.concatenate([ids, ids[alias]]),
            weights=np.concatenate([weights, weights[alias]]),
        )

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        m = len(self.keep)
        bits = rng.integers(0, 2**64, n, dtype=np.uint64)
        # The high 32 bits pick the bucket, the low 32 bits decide between it and its alias.
        bucket = ((bits >> np.uint64(32)) * np.uint64(m) >> np.uint64(32)).view(np.int64)
        pick = bucket + m * (bits.astype(np.uint32) >= self.keep.take(bucket))
        return self.ids.take(pick), self.weights.take(pick)


@dataclass(frozen=True, kw_only=True)
class _Sampler:
    """Draws one table's ids as synthetic.py does, in O(1) each for the hottest ranks.

    An alias table over the ``_HOT_RANKS`` hottest ranks (small enough to stay in cache) serves most
    draws; the rest come from synthetic's continuous tail. Past rank 4096 that law matches the exact
    one to ~1e-7, and a second, larger alias table would be slower: its lookups miss the cache.
    """

    draw: _TableDraw
    shape: IdShape
    hot: _AliasTable
    tail: _TableDraw
    """``draw`` with a head of no mass over the hot ranks: synthetic's sampler then draws only past them."""

    @staticmethod
    def build(draw: _TableDraw, shape: IdShape) -> _Sampler:
        k = min(len(draw.head_cdf), _HOT_RANKS)
        ranks = np.arange(k, dtype=np.uint64)
        ids = ((ranks * np.uint64(draw.perm_mul) + np.uint64(draw.perm_add)) % np.uint64(draw.rows)).astype(np.int64)
        probs, weights = np.diff(draw.head_cdf[:k], prepend=0.0), _id_weights(draw.key, ids).astype(np.float32)
        if k < draw.rows:  # one more bucket, id -1, for every rank past the hot ones
            probs, ids, weights = np.append(probs, 1.0 - draw.head_cdf[k - 1]), np.append(ids, -1), np.append(weights, np.float32(0))
        return _Sampler(draw=draw, shape=shape, hot=_AliasTable.build(probs, ids, weights), tail=replace(draw, head_cdf=np.zeros(k)))

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` ids and their weights."""
        ids, weights = self.hot.sample(rng, n)
        later = np.flatnonzero(ids < 0)
        if len(later):
            ids[later] = _draw_ids(self.tail, rng, len(later))
            weights[later] = _id_weights(self.draw.key, ids[later])
        return ids, weights

    def column(self, rng: np.random.Generator, n: int) -> tuple[pa.Array, np.ndarray]:
        """The Arrow column of ``n`` rows and each row's pooled weight (sum / sqrt(length))."""
        if not self.shape.is_list:
            ids, weights = self.sample(rng, n)
            return pa.array(ids), weights
        h = self.shape.hotness
        lengths = np.full(n, int(h)) if self.shape.fixed else 1 + rng.poisson(h - 1.0, n)
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        ids, weights = self.sample(rng, int(offsets[-1]))
        pooled = np.add.reduceat(weights, offsets[:-1], dtype=np.float64) / np.sqrt(lengths)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)), pooled


def alias_table(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table of a distribution, built without a Python loop.

    Returns ``(keep, alias)``: draw a bucket ``b`` uniformly and a fraction ``f``; the outcome is ``b``
    if ``f < keep[b]`` else ``alias[b]``. Buckets under the mean are topped up in order by donors over
    it; a donor gives whole top-ups until its surplus is spent, then is topped up by the next donor
    (Vose's pairing, in closed form with cumulative sums).
    """
    m = len(probs)
    q = probs * m
    small, large = np.flatnonzero(q < 1.0), np.flatnonzero(q >= 1.0)
    keep, alias = np.ones(m), np.arange(m)
    if len(small) and len(large):  # none over the mean: all are 1 up to rounding, and keep everything
        need = np.cumsum(1.0 - q[small])
        give = np.cumsum(q[large] - 1.0)
        last = np.minimum(np.searchsorted(need, give), len(small) - 1)  # the last bucket each donor tops up
        donor = np.minimum(np.searchsorted(last, np.arange(len(small))), len(large) - 1)
        keep[small], alias[small] = q[small], large[donor]
        keep[large[:-1]] = 1.0 - (need[last[:-1]] - give[:-1])
        alias[large[:-1]] = large[1:]
    return np.clip(keep, 0.0, 1.0), alias


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """Everything one process needs to make row groups; rebuilt in each process from the seed."""

    schema: FeatureSchema
    dense_schema: FeatureSchema
    signal: _Signal
    samplers: list[_Sampler]
    label_signal: bool
    arrow_schema: pa.Schema

    @staticmethod
    def build(layout: Layout, *, seed: int, label_signal: bool) -> _Plan:
        schema = layout.schema
        exponents = sorted(s.zipf_a for s in layout.shapes.values())
        signal = _make_signal(schema, signal_seed=seed, zipf_a=exponents[len(exponents) // 2] if exponents else 1.0)
        tables = {t.name: _with_exponent(signal.tables[t.name], t, layout.shapes[t.name].zipf_a) for t in schema.tables}
        return _Plan(
            schema=schema,
            dense_schema=FeatureSchema(label=schema.label, dense=schema.dense),
            signal=signal,
            samplers=[_Sampler.build(tables[f.table], layout.shapes[f.table]) for f in schema.sparse],
            label_signal=label_signal,
            arrow_schema=_arrow_schema(layout),
        )

    def chunk(self, rng: np.random.Generator, n: int) -> pa.Table:
        """``n`` rows: labels, dense columns, then sparse columns."""
        dense, _ = _draw_columns(self.dense_schema, self.signal, rng, n)
        columns = [s.column(rng, n) for s in self.samplers]
        labels = self._labels(rng, n, dense, [pooled for _, pooled in columns])
        arrays = [pa.array(y) for y in labels]
        arrays += [pa.array(dense[f.name].astype(np.float32), from_pandas=True) for f in self.schema.dense]
        arrays += [col for col, _ in columns]
        return pa.Table.from_arrays(arrays, schema=self.arrow_schema)

    def _labels(self, rng: np.random.Generator, n: int, dense: dict[str, np.ndarray], pooled: list[np.ndarray]) -> list[np.ndarray]:
        if not self.label_signal:
            return [(rng.random(n) < _POSITIVE_RATE).astype(np.int8) for _ in self.schema.labels]
        logit = self.signal.bias + _dense_part(self.schema, self.signal, dense, n) + self.signal.sparse_scale * sum(pooled, np.zeros(n))
        return [(rng.random(n) < _sigmoid(logit + rng.normal(0.0, _NOISE_STD, n))).astype(np.int8) for _ in self.schema.labels]


def _with_exponent(draw: _TableDraw, table: TableConfig, zipf_a: float) -> _TableDraw:
    """``draw`` with its rank probabilities for ``zipf_a``; permutation and weights stay.

    The signal is calibrated at the median exponent: tables with others shift the positive rate a little.
    """
    if zipf_a == draw.zipf_a:
        return draw
    return replace(draw, zipf_a=zipf_a, head_cdf=_table_draw(table, zipf_a, np.random.default_rng(0)).head_cdf)


def _arrow_schema(layout: Layout) -> pa.Schema:
    """int8 labels, float32 dense values (null where missing), int64 ids or lists of them."""
    schema = layout.schema
    fields = [pa.field(name, pa.int8(), nullable=False) for name in schema.labels]
    fields += [pa.field(f.name, pa.float32(), nullable=f.fill_missing is not None) for f in schema.dense]
    for f in schema.sparse:
        fields.append(pa.field(f.name, pa.list_(pa.int64()) if layout.shapes[f.table].is_list else pa.int64(), nullable=False))
    return pa.schema(fields)


__all__ = ["IdShape", "Layout", "SynthConfig", "SynthResult", "TableSpec", "alias_table", "file_rows", "load_layout", "parse_spec", "write_dataset"]
