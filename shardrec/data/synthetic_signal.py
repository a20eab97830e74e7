"""Criteo-shaped synthetic data with a planted, learnable signal, made to match a feature schema.

Columns: the label (int8 0/1), each dense feature (float32 non-negative heavy-tailed counts, ~5%
null when the feature sets ``fill_missing``) and each sparse feature (one int64 id per row in
``[0, num_embeddings)``; id rank ``r`` is drawn with probability ~ ``r**-zipf_a`` and ranks map to
ids through a fixed random permutation per table, so the hot ids are spread over the table).

The label is ``Bernoulli(sigmoid(logit + noise))`` with ``logit = bias + sum of a fixed weight per
(table, id) + dense weights . standardized log1p(dense)``. The weights come from ``signal_seed``
alone, so a train and an eval file made with different row seeds share them; scales are calibrated
so ~30% of rows are positive and the AUC of the true logit is ~0.8.

Example::

    generate(criteo_schema(), rows=200_000, path="train.parquet", seed=0)
    train, eval_ = ensure_synthetic(cfg.data, schema)  # cached under cfg.data.cache_dir
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardrec.data.config import DataConfig, SyntheticConfig
from shardrec.data.schema import DenseFeature, FeatureSchema, TableConfig
from shardrec.errors import ConfigError, DataError

GENERATOR_VERSION = 1
"""Part of the cache digest: bump it when the same config would give different data."""

_POSITIVE_RATE = 0.3
_SIGNAL_STD = 1.5  # std of the learnable logit; with the noise below the oracle AUC is ~0.8
_NOISE_STD = 0.5
_NULL_FRACTION = 0.05
_HEAD_RANKS = 1 << 16  # ranks drawn from exact probabilities; rarer ones from the continuous tail
_CALIBRATION_ROWS = 1 << 15
_MAX_TABLE_ROWS = 1 << 32


@dataclass(frozen=True, kw_only=True)
class _TableDraw:
    """How ids of one table are drawn, permuted and weighted."""

    rows: int
    zipf_a: float
    head_cdf: np.ndarray
    """Cumulative probability of ranks 0..K-1; the rest of the mass is the tail of ranks K..rows-1."""
    perm_mul: int
    perm_add: int
    key: int
    """Seeds the per-id weights."""


@dataclass(frozen=True, kw_only=True)
class _DenseDraw:
    """How one dense feature is drawn and weighted."""

    mu: float
    sigma: float
    null_fraction: float
    fill: float
    center: float = 0.0
    scale: float = 1.0
    weight: float


@dataclass(frozen=True, kw_only=True)
class _Signal:
    """Everything fixed by the signal seed: id and value distributions, weights, bias."""

    tables: dict[str, _TableDraw]
    dense: list[_DenseDraw]
    sparse_scale: float = 1.0
    bias: float = 0.0


def generate(
    schema: FeatureSchema,
    *,
    rows: int,
    path: str | os.PathLike[str],
    seed: int,
    zipf_a: float = 1.2,
    row_group_size: int = 16_384,
    signal_seed: int | None = None,
) -> Path:
    """Writes ``rows`` synthetic rows matching ``schema`` to one Parquet file.

    Args:
        schema: features and tables the columns follow.
        rows: number of rows.
        path: Parquet file to write (under a temporary name, renamed when complete).
        seed: seed of the rows (ids, values, noise, labels).
        zipf_a: power-law exponent of id frequencies.
        row_group_size: rows per Parquet row group; also the unit of generation, bounding memory.
        signal_seed: seed of the planted weights; unset: ``seed``. A train and an eval file get the
            same ``signal_seed`` and different ``seed`` values.

    Returns:
        The path written.
    """
    _check_args(rows=rows, seed=seed, zipf_a=zipf_a, row_group_size=row_group_size)
    signal = _make_signal(schema, signal_seed=seed if signal_seed is None else signal_seed, zipf_a=zipf_a)
    rng = np.random.default_rng([seed, 2])
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with pq.ParquetWriter(str(tmp), arrow_schema(schema)) as writer:
            for start in range(0, rows, row_group_size):
                n = min(row_group_size, rows - start)
                writer.write_table(_chunk(schema, signal, rng, n), row_group_size=row_group_size)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _check_args(*, rows: int, seed: int, zipf_a: float, row_group_size: int) -> None:
    if rows <= 0 or row_group_size <= 0:
        raise ConfigError(f"synthetic data: rows ({rows}) and row_group_size ({row_group_size}) must be > 0")
    if seed < 0:
        raise ConfigError(f"synthetic data: seed must be >= 0, got {seed}")
    if zipf_a <= 0:
        raise ConfigError(f"synthetic data: zipf_a must be > 0, got {zipf_a}")


def arrow_schema(schema: FeatureSchema) -> pa.Schema:
    """The Arrow schema of synthetic files: int8 label, float32 dense, int64 sparse ids."""
    fields = [pa.field(schema.label, pa.int8(), nullable=False)]
    fields += [pa.field(f.name, pa.float32(), nullable=f.fill_missing is not None) for f in schema.dense]
    fields += [pa.field(f.name, pa.int64(), nullable=False) for f in schema.sparse]
    return pa.schema(fields)


def oracle_logit(schema: FeatureSchema, table: pa.Table, *, signal_seed: int, zipf_a: float = 1.2) -> np.ndarray:
    """The planted logit (without noise) of each row of a synthetic ``table``: the best score possible.

    Args:
        schema: the schema the data was generated with.
        table: rows read from a synthetic file.
        signal_seed: the file's signal seed (its ``seed`` when it was generated without one).
        zipf_a: the file's ``zipf_a`` (the calibration of the weights depends on it).
    """
    signal = _make_signal(schema, signal_seed=signal_seed, zipf_a=zipf_a)
    dense = {f.name: table.column(f.name).to_numpy(zero_copy_only=False).astype(np.float64) for f in schema.dense}
    sparse = {f.name: table.column(f.name).to_numpy(zero_copy_only=False) for f in schema.sparse}
    return _logit(schema, signal, dense, sparse, table.num_rows)


# --- the planted signal ------------------------------------------------------------------------


def _make_signal(schema: FeatureSchema, *, signal_seed: int, zipf_a: float) -> _Signal:
    """Draws distributions and weights from the seed, then calibrates scales and bias on a sample."""
    rng = np.random.default_rng([signal_seed, 0])
    tables = {t.name: _table_draw(t, zipf_a, rng) for t in schema.tables}
    signal = _Signal(tables=tables, dense=[_dense_draw(f, rng) for f in schema.dense])
    n = _CALIBRATION_ROWS
    dense, sparse = _draw_columns(schema, signal, np.random.default_rng([signal_seed, 1]), n)
    signal = _scale(schema, _standardize(schema, signal, dense), dense, sparse)
    noise = np.random.default_rng([signal_seed, 3]).normal(0.0, _NOISE_STD, n)
    return replace(signal, bias=_solve_bias(_logit(schema, signal, dense, sparse, n) + noise, _POSITIVE_RATE))


def _scale(schema: FeatureSchema, signal: _Signal, dense: dict[str, np.ndarray], sparse: dict[str, np.ndarray]) -> _Signal:
    """Scales the dense and the id weights so that each part of the logit has the same share of its variance."""
    n = _CALIBRATION_ROWS
    dense_std = _dense_part(schema, signal, dense, n).std()
    sparse_std = _sparse_part(schema, signal, sparse, n).std()
    target = _SIGNAL_STD / np.sqrt(max(int(dense_std > 0) + int(sparse_std > 0), 1))
    return replace(
        signal,
        dense=[replace(d, weight=d.weight * target / dense_std) for d in signal.dense] if dense_std > 0 else signal.dense,
        sparse_scale=target / sparse_std if sparse_std > 0 else 0.0,
    )


def _table_draw(table: TableConfig, zipf_a: float, rng: np.random.Generator) -> _TableDraw:
    n = table.num_embeddings
    if n > _MAX_TABLE_ROWS:
        raise ConfigError(
            f"table '{table.name}': synthetic data supports up to {_MAX_TABLE_ROWS} rows, got {n}; "
            f"lower features.tables num_embeddings or use real data"
        )
    k = min(n, _HEAD_RANKS)
    head = np.arange(1, k + 1, dtype=np.float64) ** -zipf_a
    tail = _tail_mass(k, n, zipf_a)
    cdf = np.cumsum(head) / (head.sum() + tail)
    if tail == 0.0:
        cdf[-1] = 1.0
    mul = int(rng.integers(1, max(n, 2)))
    while np.gcd(mul, n) != 1:
        mul = int(rng.integers(1, n))
    return _TableDraw(
        rows=n, zipf_a=zipf_a, head_cdf=cdf, perm_mul=mul, perm_add=int(rng.integers(0, n)), key=int(rng.integers(0, 2**63))
    )


def _tail_mass(k: int, n: int, a: float) -> float:
    """Integral of x**-a over ranks k+1..n, each rank r covering [r - 0.5, r + 0.5)."""
    if k >= n:
        return 0.0
    return float(_power_cdf(n + 0.5, a) - _power_cdf(k + 0.5, a))


def _power_cdf(x: np.ndarray | float, a: float) -> np.ndarray | float:
    """An antiderivative of x**-a."""
    return np.log(x) if a == 1.0 else x ** (1.0 - a) / (1.0 - a)


def _power_cdf_inv(y: np.ndarray, a: float) -> np.ndarray:
    return np.exp(y) if a == 1.0 else (y * (1.0 - a)) ** (1.0 / (1.0 - a))


def _dense_draw(feature: DenseFeature, rng: np.random.Generator) -> _DenseDraw:
    fill = feature.fill_missing
    return _DenseDraw(
        mu=float(rng.uniform(0.0, 4.0)),
        sigma=float(rng.uniform(0.8, 2.0)),
        null_fraction=_NULL_FRACTION if fill is not None else 0.0,
        fill=0.0 if fill is None else fill,
        weight=float(rng.normal()),
    )


def _standardize(schema: FeatureSchema, signal: _Signal, dense_cols: dict[str, np.ndarray]) -> _Signal:
    dense = []
    for f, d in zip(schema.dense, signal.dense):
        x = _log1p_filled(dense_cols[f.name], d.fill)
        dense.append(replace(d, center=float(x.mean()), scale=float(x.std()) or 1.0))
    return replace(signal, dense=dense)


def _solve_bias(logit: np.ndarray, rate: float) -> float:
    """The bias that makes the mean of sigmoid(logit + bias) equal ``rate``, by bisection."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _sigmoid(logit + mid).mean() < rate else (lo, mid)
    return (lo + hi) / 2


# --- rows --------------------------------------------------------------------------------------


def _chunk(schema: FeatureSchema, signal: _Signal, rng: np.random.Generator, n: int) -> pa.Table:
    dense, sparse = _draw_columns(schema, signal, rng, n)
    logit = _logit(schema, signal, dense, sparse, n) + rng.normal(0.0, _NOISE_STD, n)
    label = (rng.random(n) < _sigmoid(logit)).astype(np.int8)
    arrays: list[pa.Array] = [pa.array(label)]
    arrays += [pa.array(dense[f.name].astype(np.float32), from_pandas=True) for f in schema.dense]
    arrays += [pa.array(sparse[f.name]) for f in schema.sparse]
    return pa.Table.from_arrays(arrays, schema=arrow_schema(schema))


def _draw_columns(
    schema: FeatureSchema, signal: _Signal, rng: np.random.Generator, n: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Dense values (NaN where null) and sparse ids of ``n`` rows."""
    dense = {}
    for f, d in zip(schema.dense, signal.dense):
        # Counts from a log-normal, floored: many zeros and a heavy tail, like Criteo's I columns.
        x = np.maximum(np.floor(np.expm1(rng.normal(d.mu, d.sigma, n))), 0.0)
        x[rng.random(n) < d.null_fraction] = np.nan
        dense[f.name] = x
    sparse = {f.name: _draw_ids(signal.tables[f.table], rng, n) for f in schema.sparse}
    return dense, sparse


def _draw_ids(t: _TableDraw, rng: np.random.Generator, n: int) -> np.ndarray:
    u = rng.random(n)
    ranks = np.searchsorted(t.head_cdf, u, side="right")
    k = len(t.head_cdf)
    in_tail = ranks >= k
    if in_tail.any():
        # Inverse CDF of the continuous power law over [k + 0.5, rows + 0.5), rounded to a rank.
        v = (u[in_tail] - t.head_cdf[-1]) / (1.0 - t.head_cdf[-1])
        lo, hi = _power_cdf(k + 0.5, t.zipf_a), _power_cdf(t.rows + 0.5, t.zipf_a)
        x = _power_cdf_inv(lo + v * (hi - lo), t.zipf_a)
        ranks[in_tail] = np.clip(np.floor(x + 0.5) - 1, k, t.rows - 1)
    ids = (ranks.astype(np.uint64) * np.uint64(t.perm_mul) + np.uint64(t.perm_add)) % np.uint64(t.rows)
    return ids.astype(np.int64)


# --- logits ------------------------------------------------------------------------------------


def _logit(
    schema: FeatureSchema, signal: _Signal, dense: dict[str, np.ndarray], sparse: dict[str, np.ndarray], n: int
) -> np.ndarray:
    return signal.bias + _dense_part(schema, signal, dense, n) + _sparse_part(schema, signal, sparse, n)


def _dense_part(schema: FeatureSchema, signal: _Signal, dense: dict[str, np.ndarray], n: int) -> np.ndarray:
    out = np.zeros(n)
    for f, d in zip(schema.dense, signal.dense):
        out += d.weight * (_log1p_filled(dense[f.name], d.fill) - d.center) / d.scale
    return out


def _sparse_part(schema: FeatureSchema, signal: _Signal, sparse: dict[str, np.ndarray], n: int) -> np.ndarray:
    out = np.zeros(n)
    for f in schema.sparse:
        out += _id_weights(signal.tables[f.table].key, sparse[f.name])
    return signal.sparse_scale * out


def _log1p_filled(x: np.ndarray, fill: float) -> np.ndarray:
    """What a model sees after filling nulls and the log1p transform."""
    return np.log1p(np.maximum(np.where(np.isnan(x), fill, x), 0.0))


def _id_weights(key: int, ids: np.ndarray) -> np.ndarray:
    """A fixed weight per (table, id), uniform with unit variance, hashed so no table-sized array is kept."""
    z = ids.astype(np.uint64) ^ np.uint64(key)
    # splitmix64 finalizer
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return (2.0 * u - 1.0) * np.sqrt(3.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --- the cache ---------------------------------------------------------------------------------


def ensure_synthetic(cfg: DataConfig, schema: FeatureSchema) -> tuple[Path, Path]:
    """Returns the (train, eval) synthetic files for ``cfg.synthetic``, generating them on first use.

    They live in ``<cache_dir>/synthetic/<digest>/`` where the digest covers everything that shapes the
    data, so a changed schema or config gets its own folder. The folder is made under a temporary
    name and renamed when complete; when processes race, the first rename wins and the others use it.

    Raises:
        ConfigError: ``cfg.synthetic`` is not set.
    """
    if cfg.synthetic is None:
        raise ConfigError("data.synthetic is not set; add a data.synthetic section or set data.train_path")
    if not isinstance(schema.label, str):
        raise ConfigError(f"data.synthetic makes one 0/1 label column, but features.label is {schema.labels} with task types "
                          f"{[t.type for t in schema.tasks]}; set features.label to one column name, or set data.train_path")
    syn = cfg.synthetic
    spec = _cache_spec(schema, syn)
    root = Path(cfg.cache_dir).expanduser() / "synthetic"
    final = root / hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    if not final.exists():
        _populate(final, spec, schema, syn)
    train, eval_ = final / "train.parquet", final / "eval.parquet"
    if not (train.is_file() and eval_.is_file()):
        raise DataError(f"synthetic data cache {final} lacks train.parquet or eval.parquet; delete that folder to regenerate it")
    return train, eval_


def _cache_spec(schema: FeatureSchema, syn: SyntheticConfig) -> dict[str, Any]:
    """What shapes the data (not, e.g., embedding widths): the cache digest and spec.json."""
    return {
        "generator_version": GENERATOR_VERSION,
        "label": schema.label,
        "dense": [{"name": f.name, "fill_missing": f.fill_missing} for f in schema.dense],
        "sparse": [{"name": f.name, "table": f.table} for f in schema.sparse],
        "tables": [{"name": t.name, "num_embeddings": t.num_embeddings} for t in schema.tables],
        "synthetic": {k: getattr(syn, k) for k in ("train_rows", "eval_rows", "seed", "zipf_a", "row_group_size")},
    }


def _populate(final: Path, spec: dict[str, Any], schema: FeatureSchema, syn: SyntheticConfig) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        common = {"zipf_a": syn.zipf_a, "row_group_size": syn.row_group_size, "signal_seed": syn.seed}
        # Row seeds 2s and 2s+1 differ between the files and from every other config seed's.
        generate(schema, rows=syn.train_rows, path=tmp / "train.parquet", seed=2 * syn.seed, **common)
        generate(schema, rows=syn.eval_rows, path=tmp / "eval.parquet", seed=2 * syn.seed + 1, **common)
        (tmp / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            return  # another process finished first; its files are identical
        print(f"shardrec: generated synthetic data ({syn.train_rows} train + {syn.eval_rows} eval rows) in {final}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
