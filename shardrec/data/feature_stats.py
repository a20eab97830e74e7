"""Statistics of the training data that reading needs: dense normalization, ``fill_missing: mean``
and quantile buckets (``num_buckets``).

They are computed in one streamed pass over the training data (a row group, or CSV block, at a
time: never a whole file in memory), written as JSON into the run folder (``feature_stats.json``),
attached to every checkpoint and carried by the serving manifest, so training, evaluation, export
and ``predict`` transform every value identically. ``apply_stats`` returns the schema a reader
gets: the same features, each carrying its statistics.

Example::

    stats = compute_stats("data/train", schema)       # one pass
    write_stats(run_dir / STATS_FILE, stats)
    reader = ParquetReader("data/eval", schema=apply_stats(schema, stats, where="..."), batch_size=512)

Quantile buckets come from a uniform sample of at most ``SAMPLE_SIZE`` values per feature (every
value when there are fewer), drawn with a fixed seed: the same data give the same boundaries.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardrec.data.decode import is_strings, clipped
from shardrec.data.reader import open_source
from shardrec.data.schema import DenseFeature, DenseStats, FeatureSchema, SparseFeature
from shardrec.errors import ConfigError, DataError
from shardrec.output import write_atomic

STATS_FILE = "feature_stats.json"
"""Name of the statistics file in a run folder and a checkpoint."""
SAMPLE_SIZE = 200_000
"""Values per bucketized feature kept to find its quantiles."""
FORMAT = 1


@dataclass
class FeatureStats:
    """Statistics of one training data set for the features of a schema that need them."""

    source: str
    """The training data they were computed from."""
    rows: int
    """Rows read."""
    dense: dict[str, DenseStats] = field(default_factory=dict)
    """Per dense feature that needs them (normalize, fill_missing: mean)."""
    quantiles: dict[str, list[float]] = field(default_factory=dict)
    """Per ``num_buckets`` feature: its bucket boundaries, strictly increasing."""
    classes: dict[str, list[str]] = field(default_factory=dict)
    """Per multiclass label of strings: its classes, sorted; a class's id is its position."""

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "source": self.source, "rows": self.rows,
                "dense": {k: asdict(v) for k, v in self.dense.items()}, "quantiles": self.quantiles, "classes": self.classes}

    @staticmethod
    def from_json(data: Any, *, where: str) -> FeatureStats:
        """Parses what ``to_json`` wrote; anything else is a ConfigError naming ``where``."""
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            dense = {str(k): DenseStats(**{n: (int(v[n]) if n in ("count", "missing") else float(v[n]))
                                           for n in DenseStats.__dataclass_fields__}) for k, v in data["dense"].items()}
            quantiles = {str(k): [float(x) for x in v] for k, v in data["quantiles"].items()}
            classes = {str(k): [str(x) for x in v] for k, v in data.get("classes", {}).items()}
            return FeatureStats(source=str(data["source"]), rows=int(data["rows"]), dense=dense, quantiles=quantiles,
                                classes=classes)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"'{where}' is not a shardrec feature statistics file ({e}); write it again with "
                              "shardrec data stats, or delete it so that the run computes it") from e


def read_stats(path: Path) -> FeatureStats:
    """The statistics file at ``path``, with errors that name it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"feature statistics file '{path}' does not exist; compute it with shardrec data stats") from e
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"'{path}' is not a shardrec feature statistics file ({e}); write it again with "
                          "shardrec data stats") from e
    return FeatureStats.from_json(data, where=str(path))


def write_stats(path: Path, stats: FeatureStats) -> None:
    """Writes ``stats`` to ``path`` atomically."""
    write_atomic(path, json.dumps(stats.to_json(), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# The pass over the data.


class _Moments:
    """Count, mean, M2, min and max of a stream of arrays (Chan et al.'s pairwise update)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.lo, self.hi = math.inf, -math.inf
        self.raw_sum = 0.0
        self.missing = 0

    def add(self, raw: np.ndarray, values: np.ndarray) -> None:
        if not values.size:
            return
        n_b, mean_b = values.size, float(values.mean())
        m2_b = float(((values - mean_b) ** 2).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n
        self.lo, self.hi = min(self.lo, float(values.min())), max(self.hi, float(values.max()))
        self.raw_sum += float(raw.sum())

    def result(self, f: DenseFeature, where: str) -> DenseStats:
        if self.n == 0:
            raise DataError(f"{where}: column '{f.name}' (features.dense '{f.name}') has no non-missing value, so it has no "
                            f"statistics for normalize: {f.normalize} / fill_missing: {f.fill_missing}; fix the data or "
                            "drop the feature")
        return DenseStats(count=self.n, missing=self.missing, raw_mean=self.raw_sum / self.n, mean=self.mean,
                          std=math.sqrt(self.m2 / self.n), min=self.lo, max=self.hi)


class _Sample:
    """A uniform sample of at most ``size`` values of a stream: the values with the smallest
    random keys (drawn from a seeded generator, in stream order)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.values = np.empty(0, dtype=np.float64)
        self.keys = np.empty(0, dtype=np.float64)

    def add(self, values: np.ndarray) -> None:
        keys = np.concatenate([self.keys, self.rng.random(values.size)])
        values = np.concatenate([self.values, values])
        if values.size > self.size:
            keep = np.argpartition(keys, self.size)[: self.size]
            keys, values = keys[keep], values[keep]
        self.keys, self.values = keys, values

    def boundaries(self, num_buckets: int) -> list[float]:
        if not self.values.size:
            return []
        qs = np.quantile(self.values, np.arange(1, num_buckets) / num_buckets)
        return [float(x) for x in np.unique(qs)]


def _floats(table: pa.Table, name: str) -> np.ndarray:
    """float64 values of a numeric column, NaN for nulls."""
    col = table.column(name)
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return pc.cast(col, pa.float64(), safe=False).to_numpy(zero_copy_only=False)


def stats_schema(schema: FeatureSchema) -> FeatureSchema:
    """The part of ``schema`` whose columns the statistics pass reads (its labels: the multiclass ones)."""
    sparse = [f for f in schema.sparse if f.num_buckets is not None]
    tables = [t for t in schema.tables if t.name in {f.table for f in sparse}]
    multiclass = [t for t in schema.tasks if t.type == "multiclass" and t.class_names is None]
    return FeatureSchema(label=multiclass or schema.label, dense=[f for f in schema.dense if f.needs_stats], sparse=sparse,
                         tables=tables)


def compute_stats(path: str | Path, schema: FeatureSchema, *, seed: int = 0) -> FeatureStats:
    """One pass over the training data at ``path`` for the features of ``schema`` that need statistics.

    Raises:
        DataError: the data cannot be read, or a feature has no non-missing value.
    """
    part_schema = stats_schema(schema)
    multiclass = [t for t in schema.tasks if t.type == "multiclass" and t.class_names is None]
    source = open_source(path, part_schema, labels=bool(multiclass))
    moments = {f.name: _Moments() for f in part_schema.dense}
    samples = {f.name: _Sample(SAMPLE_SIZE, seed + i) for i, f in enumerate(part_schema.sparse)}
    classes: dict[str, set[str]] = {}
    for part in source.read(0, source.rows):
        if part.error is not None:
            raise part.error
        assert part.table is not None
        for t in multiclass:
            col = part.table.column(t.name)
            if is_strings(col.type):
                classes.setdefault(t.name, set()).update(v for v in pc.unique(col.cast(pa.string())).to_pylist() if v is not None)
        for f in part_schema.dense:
            raw = clipped(f, _floats(part.table, f.name))
            ok = ~np.isnan(raw)
            moments[f.name].missing += int((~ok).sum())
            values = raw[ok]
            moments[f.name].add(values, np.log1p(np.maximum(values, 0)) if f.takes_log else values)
        for f in part_schema.sparse:
            x = _floats(part.table, f.column)
            samples[f.name].add(x[~np.isnan(x)])
    where = f"training data '{path}'"
    for t in multiclass:
        if len(classes.get(t.name, ())) > t.width:
            shown = sorted(classes[t.name])
            raise DataError(f"{where}: label column '{t.name}' holds {len(shown)} classes ({', '.join(shown[:10])}"
                            f"{' ...' if len(shown) > 10 else ''}), more than its num_classes {t.num_classes}; "
                            f"set features.label '{t.name}' num_classes to {len(shown)}")
    return FeatureStats(
        source=str(path), rows=source.rows,
        dense={f.name: moments[f.name].result(f, where) for f in part_schema.dense},
        quantiles={f.name: samples[f.name].boundaries(f.num_buckets) for f in part_schema.sparse},  # type: ignore[arg-type]
        classes={name: sorted(values) for name, values in classes.items()},
    )


# ---------------------------------------------------------------------------------------------
# Applying them.


def apply_stats(schema: FeatureSchema, stats: FeatureStats | None, *, where: str) -> FeatureSchema:
    """``schema`` with each feature that needs statistics carrying its own from ``stats``.

    Raises:
        ConfigError: ``stats`` (from ``where``) lacks a feature the schema needs statistics for.
    """
    if not schema.needs_stats:
        return schema
    missing = [f.name for f in schema.dense if f.needs_stats and (stats is None or f.name not in stats.dense)]
    missing += [f.name for f in schema.sparse if f.num_buckets is not None and (stats is None or f.name not in stats.quantiles)]
    if missing:
        raise ConfigError(f"{where} has no statistics for feature '{missing[0]}'"
                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; they were computed for "
                          "another schema: compute them again (shardrec data stats, or delete the file in the run folder)")
    assert stats is not None
    dense = [_with(f, "stats", stats.dense[f.name]) if f.needs_stats else f for f in schema.dense]
    sparse = [_with(f, "quantiles", stats.quantiles[f.name]) if f.num_buckets is not None else f for f in schema.sparse]
    items = schema.label if isinstance(schema.label, list) else [schema.label]
    labels = [_with(t, "classes", stats.classes[t.name]) if t.name in stats.classes else x for t, x in zip(schema.tasks, items)]
    out = copy.copy(schema)
    out.dense, out.sparse = dense, sparse
    out.label = labels if isinstance(schema.label, list) else labels[0]
    return out


def _with(f: DenseFeature | SparseFeature, name: str, value: Any) -> Any:
    g = copy.copy(f)
    setattr(g, name, value)
    return g
