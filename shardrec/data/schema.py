"""Feature schema: dense features, sparse id features and the embedding tables they look up.

Example YAML (the ``features`` section of a job)::

    features:
      label: label
      dense:
        - {name: I1, fill_missing: 0.0, transform: log1p}
      sparse:
        - {name: C1, table: t_C1, hash: true}
        - {name: C2, table: t_C1}          # two features may share one table
      tables:
        - {name: t_C1, num_embeddings: 100000, embedding_dim: 16}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shardrec.errors import ConfigError


@dataclass(kw_only=True)
class TableConfig:
    """One embedding table."""

    name: str
    """Table name; the planner and the plan file refer to it."""
    num_embeddings: int
    """Number of rows."""
    embedding_dim: int
    """Width of each row."""
    pooling: Literal["sum", "mean"] = "sum"
    """How a bag of ids is reduced to one vector."""

    def __post_init__(self) -> None:
        if self.num_embeddings <= 0:
            raise ConfigError(f"table '{self.name}': num_embeddings must be > 0, got {self.num_embeddings}")
        if self.embedding_dim <= 0:
            raise ConfigError(f"table '{self.name}': embedding_dim must be > 0, got {self.embedding_dim}")


@dataclass(kw_only=True)
class DenseFeature:
    """A float column fed to the model as one entry of the dense tensor."""

    name: str
    """Column name in the data."""
    fill_missing: float | None = None
    """Value for null or NaN entries; None rejects them with an error."""
    transform: Literal["none", "log1p"] = "none"
    """Applied after filling: log1p computes log(1 + max(x, 0)), the usual Criteo transform."""


@dataclass(kw_only=True)
class NegativeSampling:
    """Ids drawn for every training batch instead of read from a column: shared negatives for a
    sampled softmax. Row 0 of the batch holds all ``num`` ids and the other rows none; outside
    training (evaluation, item catalogues) every row is empty."""

    num: int
    """Ids drawn per batch (on each rank)."""
    of: str
    """The positive item feature over the same table; its training-data counts weigh ``popularity``."""
    distribution: Literal["uniform", "popularity"] = "uniform"
    """uniform: every row of the table alike; popularity: P(id) proportional to count(id) ** alpha."""
    alpha: float = 0.75
    """Exponent of the counts for ``popularity`` (word2vec's 0.75); 0 is uniform over seen ids."""

    def __post_init__(self) -> None:
        if self.num <= 0:
            raise ConfigError(f"negatives.num must be > 0, got {self.num}")
        if self.distribution not in ("uniform", "popularity"):
            raise ConfigError(f"negatives.distribution must be 'uniform' or 'popularity', got '{self.distribution}'")
        if self.alpha < 0:
            raise ConfigError(f"negatives.alpha must be >= 0, got {self.alpha}")


@dataclass(kw_only=True)
class SparseFeature:
    """Ids looked up in one table: a sparse id, multi-hot, weighted, sequence, bucketized or combo feature.

    The kind follows from the fields set:

    - sparse id / multi-hot: the ``source`` column holds one id or a list of ids per row;
    - weighted: ``weights`` names a column of float lists aligned with the id lists (KJT weights);
    - sequence: ``sequence: true``, an ordered history (oldest first) that the model reads unpooled
      through an EmbeddingCollection, cut to its ``max_len`` most recent ids;
    - bucketized: ``boundaries`` turn the numeric ``source`` column into the id of its bucket;
    - combo: ``cross`` lists id columns whose values in one row are crossed and hashed into the table;
    - raw: ``raw: true``, integers passed to the model as they are and looked up in no table
      (e.g. the timestamps of a history, which HSTU turns into time-gap biases);
    - negatives: ``negatives`` draws ids for each training batch instead of reading a column.
    """

    name: str
    """KeyedJaggedTensor key; also the column read, unless ``source`` names another."""
    table: str | None = None
    """Name of the table in ``features.tables`` this feature looks up (every feature but a raw one)."""
    source: str | None = None
    """Column to read; unset: ``name``. Lets several features read one column."""
    hash: bool = False
    """Hash raw ids (strings or any int) into [0, num_embeddings); off: ids must already be in range."""
    weights: str | None = None
    """Column of per-id float weights (a list per row, aligned with the ids): a weighted id feature."""
    sequence: bool = False
    """An ordered history read unpooled (EmbeddingCollection); its table then serves sequences only."""
    max_len: int | None = None
    """Keep at most this many ids per row: the last ``max_len`` (for a history, the most recent)."""
    boundaries: list[float] | None = None
    """Bucketize the numeric ``source`` column: id = number of boundaries <= value (nulls: no id)."""
    cross: list[str] | None = None
    """Id columns crossed per row and hashed into the table (a row with a null part gets no id)."""
    raw: bool = False
    """Integers passed through unchanged (no table, no range check); models that read them say so."""
    negatives: NegativeSampling | None = None
    """Draw this feature's ids per training batch (sampled-softmax negatives); it reads no column."""

    def __post_init__(self) -> None:
        where = f"features.sparse '{self.name}'"
        if self.raw:
            if self.table is not None or self.hash or self.boundaries is not None or self.cross or self.weights or self.negatives:
                raise ConfigError(f"{where}: a raw feature has no table, hash, boundaries, cross, weights or negatives; "
                                  "remove them or drop 'raw: true'")
        elif self.table is None:
            raise ConfigError(f"{where}: set 'table' (the features.tables entry it looks up), or 'raw: true' for "
                              "integers passed to the model as they are")
        if self.negatives is not None and (self.source or self.hash or self.boundaries is not None or self.cross
                                           or self.weights or self.sequence or self.max_len):
            raise ConfigError(f"{where}: a negatives feature reads no column: remove source, hash, boundaries, cross, "
                              "weights, sequence and max_len")
        if self.max_len is not None and self.max_len <= 0:
            raise ConfigError(f"{where}: max_len must be > 0, got {self.max_len}")
        if self.boundaries is not None:
            if self.cross or self.weights or self.hash:
                raise ConfigError(f"{where}: boundaries cannot be combined with cross, weights or hash")
            if list(self.boundaries) != sorted(set(self.boundaries)) or not self.boundaries:
                raise ConfigError(f"{where}: boundaries must be a non-empty, strictly increasing list")
        if self.cross is not None:
            if len(self.cross) < 2 or self.source is not None or self.weights:
                raise ConfigError(f"{where}: cross needs two or more columns and no source or weights")
        if self.sequence and self.weights:
            raise ConfigError(f"{where}: a sequence feature cannot be weighted")

    @property
    def column(self) -> str:
        """The data column this feature reads (not used by combo features)."""
        return self.source or self.name

    @property
    def columns(self) -> list[str]:
        """Every data column this feature reads."""
        if self.negatives is not None:
            return []
        cols = list(self.cross) if self.cross else [self.column]
        return cols + ([self.weights] if self.weights else [])


@dataclass(kw_only=True)
class FeatureSchema:
    """The features a model reads and the tables behind them."""

    label: str | list[str] = "label"
    """Column holding the 0/1 label, or a list of them for multi-task models (labels ``[B, T]``)."""
    dense: list[DenseFeature] = field(default_factory=list)
    """Dense float features, in the order of the dense tensor's columns."""
    sparse: list[SparseFeature] = field(default_factory=list)
    """Sparse id features, in the order of the KeyedJaggedTensor's keys."""
    tables: list[TableConfig] = field(default_factory=list)
    """Embedding tables."""

    def __post_init__(self) -> None:
        tables = [t.name for t in self.tables]
        _check_unique(tables, "features.tables")
        _check_unique([f.name for f in self.dense] + [f.name for f in self.sparse], "features")
        for i, f in enumerate(self.sparse):
            if not f.raw and f.table not in tables:
                raise ConfigError(
                    f"features.sparse[{i}] ('{f.name}') names table '{f.table}', which is not in "
                    f"features.tables; known tables: {', '.join(tables) or '(none)'}"
                )
        used = {f.table for f in self.sparse}
        unused = [t for t in tables if t not in used]
        if unused:
            raise ConfigError(f"features.tables: table '{unused[0]}' is used by no sparse feature; remove it or bind a feature to it")
        for f in self.sparse:
            if f.boundaries is not None and self.table(f.table).num_embeddings < len(f.boundaries) + 1:
                raise ConfigError(
                    f"features.sparse '{f.name}': {len(f.boundaries)} boundaries make {len(f.boundaries) + 1} buckets, "
                    f"more than table '{f.table}' has rows; raise its num_embeddings"
                )
        self._check_negatives()
        if isinstance(self.label, list) and not self.label:
            raise ConfigError("features.label: a list of labels must name at least one column")

    def _check_negatives(self) -> None:
        for f in self.sparse:
            if f.negatives is None:
                continue
            of = [g for g in self.sparse if g.name == f.negatives.of]
            if not of or of[0].table != f.table or of[0].negatives is not None:
                raise ConfigError(f"features.sparse '{f.name}': negatives.of names '{f.negatives.of}', which must be a "
                                  f"sparse feature over the same table '{f.table}' (the positive item)")

    def without_raw(self) -> FeatureSchema:
        """This schema without its raw features (for models that read none)."""
        if not any(f.raw for f in self.sparse):
            return self
        return FeatureSchema(label=self.label, dense=self.dense, sparse=[f for f in self.sparse if not f.raw], tables=self.tables)

    @property
    def labels(self) -> list[str]:
        """Label columns, one per task."""
        return list(self.label) if isinstance(self.label, list) else [self.label]

    @property
    def weighted_names(self) -> list[str]:
        """Keys of weighted features (``Batch.weighted_features``), in schema order."""
        return [f.name for f in self.sparse if f.weights]

    @property
    def unweighted_names(self) -> list[str]:
        """Keys of ``Batch.sparse_features``: every feature without weights, in schema order."""
        return [f.name for f in self.sparse if not f.weights]

    def sequence_tables(self) -> list[str]:
        """Tables read by a sequence or negatives feature: every feature of such a table reaches the
        model unpooled."""
        return sorted({f.table for f in self.sparse if (f.sequence or f.negatives) and f.table})

    def table(self, name: str) -> TableConfig:
        """Returns the table called ``name``."""
        return next(t for t in self.tables if t.name == name)

    def features_of(self, table: str) -> list[str]:
        """Names of the sparse features that look up ``table``, in schema order."""
        return [f.name for f in self.sparse if f.table == table]

    @property
    def sparse_names(self) -> list[str]:
        """KeyedJaggedTensor keys in order."""
        return [f.name for f in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        """Dense columns in order."""
        return [f.name for f in self.dense]


def _check_unique(names: list[str], key: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ConfigError(f"{key}: name '{n}' appears twice; names must be unique")
        seen.add(n)


def criteo_schema(
    *, num_dense: int = 13, num_sparse: int = 26, rows: list[int] | None = None, dim: int = 16
) -> FeatureSchema:
    """The Criteo layout: label, I1..I13 (log1p, missing as 0), C1..C26 hashed into one table each."""
    rows = rows or [1000] * num_sparse
    if len(rows) != num_sparse:
        raise ConfigError(f"criteo_schema: {len(rows)} row counts given for {num_sparse} sparse features")
    return FeatureSchema(
        label="label",
        dense=[DenseFeature(name=f"I{i + 1}", fill_missing=0.0, transform="log1p") for i in range(num_dense)],
        sparse=[SparseFeature(name=f"C{i + 1}", table=f"t_C{i + 1}", hash=True) for i in range(num_sparse)],
        tables=[TableConfig(name=f"t_C{i + 1}", num_embeddings=r, embedding_dim=dim) for i, r in enumerate(rows)],
    )
