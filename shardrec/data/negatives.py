"""Negative sampling for sampled-softmax retrieval training.

A sparse feature with ``negatives:`` reads no column: the reader leaves it empty, and
:class:`NegativeSampler` fills row 0 of every training batch with ``num`` ids drawn from the
feature's table, shared by all rows (the other rows stay empty). Draws depend only on (seed, rank,
step), so a resumed run draws what an uninterrupted one would.

Distributions: ``uniform`` over every row of the table; ``popularity``, P(id) proportional to
``count(id) ** alpha`` with the counts of the positive feature (``of``) in the training data,
counted once when the sampler is built.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.batch import Batch
from shardrec.data.schema import FeatureSchema, SparseFeature
from shardrec.data.sparse import decode_sparse
from shardrec.errors import DataError

_SEED_STRIDE = 1_000_003


class NegativeSampler:
    """Fills the negatives features of training batches.

    Args:
        schema: the job's features; every feature with ``negatives`` is filled.
        train_files: the training data's Parquet files (counted for ``popularity``).
        seed: the job's seed.
        rank: this rank (each rank draws its own negatives).
    """

    def __init__(self, schema: FeatureSchema, *, train_files: list[Path | str], seed: int, rank: int) -> None:
        self.keys = schema.unweighted_names
        self.features = [f for f in schema.sparse if f.negatives is not None and not f.weights]
        self.seed, self.rank = seed, rank
        self.rows = {f.name: schema.table(f.table).num_embeddings for f in self.features}  # type: ignore[arg-type]
        self.weights = {f.name: self._weights(f, schema, train_files) for f in self.features}

    @staticmethod
    def active(schema: FeatureSchema) -> bool:
        """Whether ``schema`` has a feature to fill."""
        return any(f.negatives is not None for f in schema.sparse)

    def _weights(self, f: SparseFeature, schema: FeatureSchema, files: list[Path | str]) -> torch.Tensor | None:
        spec = f.negatives
        assert spec is not None and f.table is not None
        if spec.distribution == "uniform":
            return None
        rows = schema.table(f.table).num_embeddings
        of = next(g for g in schema.sparse if g.name == spec.of)
        counts = np.zeros(rows, dtype=np.float64)
        for file in files:
            pf = pq.ParquetFile(file)
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g, columns=of.columns)
                ids = decode_sparse(table, of, schema.sparse.index(of), schema, f"{file}, row group {g}").values
                counts += np.bincount(ids, minlength=rows)
        if not counts.any():
            raise DataError(f"negatives of '{f.name}': feature '{spec.of}' has no ids in the training data "
                            f"({', '.join(map(str, files))}); use 'distribution: uniform'")
        return torch.from_numpy(np.power(counts, spec.alpha) * (counts > 0))

    def draw(self, f: SparseFeature, step: int) -> torch.Tensor:
        """The ``num`` ids of feature ``f`` for training step ``step``."""
        spec = f.negatives
        assert spec is not None and f.table is not None
        gen = torch.Generator().manual_seed((self.seed * _SEED_STRIDE + step) * 4099 + self.rank)
        weights = self.weights[f.name]
        if weights is None:
            return torch.randint(0, self.rows[f.name], (spec.num,), generator=gen)
        return torch.multinomial(weights, spec.num, replacement=True, generator=gen)

    def fill(self, batch: Batch, step: int) -> Batch:
        """``batch`` with each negatives feature's row 0 holding this step's draws."""
        kjt = batch.sparse_features
        lengths, values = kjt.lengths().clone(), kjt.values()
        offsets = kjt.offset_per_key()
        stride = kjt.stride()
        inserts = []
        for f in self.features:
            k = self.keys.index(f.name)
            ids = self.draw(f, step)
            lengths[k * stride] = ids.numel()
            inserts.append((offsets[k], ids))
        parts, start = [], 0
        for at, ids in sorted(inserts, key=lambda x: x[0]):
            parts += [values[start:at], ids.to(values.dtype)]
            start = at
        parts.append(values[start:])
        out = KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(parts), lengths=lengths, stride=stride)
        return Batch(dense_features=batch.dense_features, sparse_features=out, labels=batch.labels,
                     weighted_features=batch.weighted_features)
