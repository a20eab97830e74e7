"""Feature schema: dense features, sparse id features and the embedding tables they look up.

Example YAML (the ``features`` section of a job)::

    features:
      label: label                         # a 0/1 column; or typed tasks:
      # label: [{name: rating, type: regression, loss: huber}, {name: genre, type: multiclass, num_classes: 18}]
      dense:
        - {name: I1, fill_missing: 0.0, transform: log1p}
        - {name: price, fill_missing: mean, clip: [0, 10000], normalize: log_zscore}
      sparse:
        - {name: C1, table: t_C1, hash: true}
        - {name: C2, table: t_C1}          # two features may share one table
        - {name: price_bucket, source: price, num_buckets: 32, table: t_price}  # quantile buckets
      tables:
        - {name: t_C1, num_embeddings: 100000, embedding_dim: 16}
        - {name: t_price, num_embeddings: 32, embedding_dim: 16, precision: fp32}
      table_precision: fp16                # every table's weights in fp16 unless it says otherwise

Normalization, ``fill_missing: mean`` and ``num_buckets`` need statistics of the training data
(:mod:`shardrec.data.feature_stats`): a run computes them in one pass before its first step and
keeps them in its folder; readers get a schema that carries them (``apply_stats``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from shardrec.errors import ConfigError

TablePrecision = Literal["fp32", "fp16"]
"""Storage precision of an embedding table's weights."""


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
    precision: TablePrecision | None = None
    """Storage precision of the weights: fp32, or fp16 (half the memory; the fused optimizer's
    state stays fp32, and on CUDA fbgemm rounds each update stochastically, while its CPU kernels
    round to nearest); unset: ``features.table_precision``."""
    resolved: TablePrecision | None = field(default=None, init=False, repr=False, compare=False)
    """``precision``, or the schema's ``table_precision`` where unset (set by FeatureSchema); not a YAML key."""

    @property
    def storage(self) -> TablePrecision:
        """The precision the weights are stored in."""
        return self.precision or self.resolved or "fp32"

    def __post_init__(self) -> None:
        if self.num_embeddings <= 0:
            raise ConfigError(f"table '{self.name}': num_embeddings must be > 0, got {self.num_embeddings}")
        if self.embedding_dim <= 0:
            raise ConfigError(f"table '{self.name}': embedding_dim must be > 0, got {self.embedding_dim}")


TaskType = Literal["binary", "regression", "multiclass"]
Loss = Literal["bce", "mse", "huber", "softmax_ce"]
_LOSSES: dict[str, tuple[str, ...]] = {"binary": ("bce",), "regression": ("mse", "huber"), "multiclass": ("softmax_ce",)}


@dataclass(kw_only=True)
class LabelConfig:
    """A label column and the task it defines: what the model predicts for it and how that is scored.

    binary: one logit, a probability at serving, AUC and log loss; regression: one value, RMSE, MAE
    and R²; multiclass: ``num_classes`` logits, class probabilities, accuracy, log loss and top-k
    accuracy. A multiclass column holds class ids ``0 .. num_classes - 1``, or strings, which are
    mapped to ids through the training data's sorted classes (kept with the run's feature statistics).
    """

    name: str
    """Column name in the data."""
    type: TaskType = "binary"
    """binary (0/1 values), regression (any finite number) or multiclass."""
    num_classes: int | None = None
    """Number of classes (multiclass only; required)."""
    loss: Loss | None = None
    """bce (binary); mse or huber (regression); softmax_ce (multiclass); unset: the first of these."""
    huber_delta: float = 1.0
    """Where huber turns from quadratic to linear."""
    weight: float = 1.0
    """This task's weight in the summed loss (multiplied by model.task_weights where a model has them)."""
    class_names: list[str] | None = None
    """The string classes of a multiclass label in id order (num_classes of them); unset: the
    sorted classes of the training data (then a class only the evaluation data hold is an error)."""
    classes: list[str] | None = field(default=None, init=False, repr=False, compare=False)
    """String classes in id order: ``class_names``, or the training data's (set by ``apply_stats``); not a YAML key."""

    def __post_init__(self) -> None:
        where = f"features.label '{self.name}'"
        if self.type not in _LOSSES:
            raise ConfigError(f"{where}: type must be binary, regression or multiclass, got '{self.type}'")
        if self.type == "multiclass":
            if self.num_classes is None or self.num_classes < 2:
                raise ConfigError(f"{where}: a multiclass label needs num_classes >= 2, got {self.num_classes}")
            if self.class_names is not None:
                if len(self.class_names) != self.num_classes or len(set(self.class_names)) != len(self.class_names):
                    raise ConfigError(f"{where}: class_names must list num_classes ({self.num_classes}) distinct classes, "
                                      f"got {len(self.class_names)}")
                self.classes = list(self.class_names)
        elif self.num_classes is not None or self.class_names is not None:
            raise ConfigError(f"{where}: num_classes and class_names are for type: multiclass; remove them or set the type")
        if self.loss is not None and self.loss not in _LOSSES[self.type]:
            raise ConfigError(f"{where}: loss '{self.loss}' does not fit a {self.type} label; use {' or '.join(_LOSSES[self.type])}")
        if not self.huber_delta > 0:
            raise ConfigError(f"{where}: huber_delta must be > 0, got {self.huber_delta}")
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise ConfigError(f"{where}: weight must be a finite number >= 0, got {self.weight}")

    @property
    def loss_name(self) -> str:
        """The loss this task trains with."""
        return self.loss or _LOSSES[self.type][0]

    @property
    def width(self) -> int:
        """Outputs the model predicts for this task: ``num_classes`` for multiclass, else 1."""
        return self.num_classes if self.type == "multiclass" else 1  # type: ignore[return-value]


@dataclass(frozen=True)
class DenseStats:
    """What the training data say about one dense feature, over its non-missing rows after
    ``clip`` (``mean``/``std``/``min``/``max`` also after the log of ``log1p`` and ``log_zscore``)."""

    count: int
    """Non-missing rows."""
    missing: int
    """Null or NaN rows."""
    raw_mean: float
    """Mean of the clipped values before any log: the value ``fill_missing: mean`` fills in."""
    mean: float
    std: float
    min: float
    max: float


Normalize = Literal["none", "zscore", "minmax", "log_zscore"]


@dataclass(kw_only=True)
class DenseFeature:
    """A float column fed to the model as one entry of the dense tensor.

    Each value goes through, in order: ``clip``, filling of nulls/NaN (``fill_missing``), the log of
    ``transform: log1p`` or ``normalize: log_zscore``, then ``normalize`` with statistics of the
    training data.
    """

    name: str
    """Column name in the data."""
    fill_missing: float | Literal["mean"] | None = None
    """Value for null or NaN entries, or ``mean`` (the training data's mean after clip); None rejects them with an error."""
    transform: Literal["none", "log1p"] = "none"
    """Applied after filling: log1p computes log(1 + max(x, 0)), the usual Criteo transform."""
    normalize: Normalize = "none"
    """zscore: (x - mean) / std; minmax: (x - min) / (max - min) into [0, 1] on the training range;
    log_zscore: zscore of log(1 + max(x, 0)); statistics from the training data only."""
    clip: list[float] | None = None
    """``[lo, hi]``: values are clipped into this range first (before filling and statistics)."""
    stats: DenseStats | None = field(default=None, init=False, repr=False, compare=False)
    """The training data's statistics, set by ``apply_stats`` on the schema a reader gets; not a YAML key."""

    def __post_init__(self) -> None:
        where = f"features.dense '{self.name}'"
        if self.normalize not in ("none", "zscore", "minmax", "log_zscore"):
            raise ConfigError(f"{where}: normalize must be one of none, zscore, minmax, log_zscore; got '{self.normalize}'")
        if self.normalize == "log_zscore" and self.transform == "log1p":
            raise ConfigError(f"{where}: normalize: log_zscore already takes log1p; drop 'transform: log1p' or use normalize: zscore")
        if self.clip is not None:
            if len(self.clip) != 2 or not all(math.isfinite(v) for v in self.clip) or self.clip[0] >= self.clip[1]:
                raise ConfigError(f"{where}: clip must be [lo, hi] with finite lo < hi, got {self.clip}")
        if isinstance(self.fill_missing, float) and not math.isfinite(self.fill_missing):
            raise ConfigError(f"{where}: fill_missing must be a finite number or 'mean', got {self.fill_missing}")

    @property
    def needs_stats(self) -> bool:
        """Whether reading this feature needs statistics of the training data."""
        return self.normalize != "none" or self.fill_missing == "mean"

    @property
    def takes_log(self) -> bool:
        """Whether a log1p is applied (``transform: log1p`` or ``normalize: log_zscore``)."""
        return self.transform == "log1p" or self.normalize == "log_zscore"


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
    num_buckets: int | None = None
    """Bucketize the numeric ``source`` column into this many buckets at quantiles of the training
    data (fewer where values repeat); the table needs at least this many rows."""
    cross: list[str] | None = None
    """Id columns crossed per row and hashed into the table (a row with a null part gets no id)."""
    raw: bool = False
    """Integers passed through unchanged (no table, no range check); models that read them say so."""
    negatives: NegativeSampling | None = None
    """Draw this feature's ids per training batch (sampled-softmax negatives); it reads no column."""
    quantiles: list[float] | None = field(default=None, init=False, repr=False, compare=False)
    """The boundaries ``num_buckets`` found in the training data, set by ``apply_stats``; not a YAML key."""

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
        if self.num_buckets is not None:
            if self.boundaries is not None or self.cross or self.weights or self.hash or self.raw:
                raise ConfigError(f"{where}: num_buckets cannot be combined with boundaries, cross, weights, hash or raw")
            if self.num_buckets < 2:
                raise ConfigError(f"{where}: num_buckets must be >= 2, got {self.num_buckets}")
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
    def bucketized(self) -> bool:
        """Whether the ids are buckets of a numeric column (``boundaries`` or ``num_buckets``)."""
        return self.boundaries is not None or self.num_buckets is not None

    @property
    def bucket_boundaries(self) -> list[float]:
        """The boundaries of a bucketized feature: ``boundaries``, or those ``num_buckets`` found."""
        if self.boundaries is not None:
            return self.boundaries
        if self.quantiles is None:
            raise ConfigError(f"features.sparse '{self.name}': num_buckets needs the training data's quantiles; read it "
                              "with a schema from shardrec.data.feature_stats.apply_stats (shardrec train does)")
        return self.quantiles

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

    label: str | LabelConfig | list[str | LabelConfig] = "label"
    """The label column (a name: a 0/1 label; or a LabelConfig with its task type), or a list of
    them for multi-task models (labels ``[B, T]``)."""
    dense: list[DenseFeature] = field(default_factory=list)
    """Dense float features, in the order of the dense tensor's columns."""
    sparse: list[SparseFeature] = field(default_factory=list)
    """Sparse id features, in the order of the KeyedJaggedTensor's keys."""
    tables: list[TableConfig] = field(default_factory=list)
    """Embedding tables."""
    table_precision: TablePrecision = "fp32"
    """Storage precision of every table that sets no ``precision`` of its own: fp32 or fp16."""

    def __post_init__(self) -> None:
        for t in self.tables:
            if t.resolved is None:  # a schema built from another's tables keeps what that one resolved
                t.resolved = t.precision or self.table_precision
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
            if f.num_buckets is not None and self.table(f.table).num_embeddings < f.num_buckets:
                raise ConfigError(
                    f"features.sparse '{f.name}': num_buckets {f.num_buckets} is more than table '{f.table}' has rows "
                    f"({self.table(f.table).num_embeddings}); raise its num_embeddings or lower num_buckets"
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

    @property
    def needs_stats(self) -> bool:
        """Whether reading the data needs statistics of the training data (normalization,
        ``fill_missing: mean``, ``num_buckets``, the classes of a multiclass label)."""
        return (any(f.needs_stats for f in self.dense) or any(f.num_buckets is not None for f in self.sparse)
                or any(t.type == "multiclass" and t.class_names is None for t in self.tasks))

    def without_raw(self) -> FeatureSchema:
        """This schema without its raw features (for models that read none)."""
        if not any(f.raw for f in self.sparse):
            return self
        return FeatureSchema(label=self.label, dense=self.dense, sparse=[f for f in self.sparse if not f.raw], tables=self.tables)

    @property
    def tasks(self) -> list[LabelConfig]:
        """Every label with its task, in label order (a bare name is a binary task)."""
        items = self.label if isinstance(self.label, list) else [self.label]
        return [LabelConfig(name=x) if isinstance(x, str) else x for x in items]

    @property
    def labels(self) -> list[str]:
        """Label columns, one per task."""
        return [t.name for t in self.tasks]

    @property
    def single_label(self) -> bool:
        """One label, read as labels ``[B]`` (a list, even of one, gives ``[B, T]``)."""
        return not isinstance(self.label, list)

    @property
    def output_width(self) -> int:
        """Outputs a model predicts per row: the sum of the tasks' widths."""
        return sum(t.width for t in self.tasks)

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
