"""The item catalogue of retrieval models: a Parquet file with one row per item (``data.items_path``).

It holds the item id column (the model's ``item_feature``) and the item-side feature columns the
model's item tower reads (``shardrec data prepare movielens`` writes ``items.parquet``). Read here
into ids plus a KeyedJaggedTensor of the training batches' keys; the item vectors the trainer
computes from it are written back as ``item_embeddings.parquet``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.data.sparse import decode_sparse
from shardrec.errors import DataError


@dataclass
class Catalogue:
    """Every item's id and vector, the same on every rank."""

    ids: torch.Tensor
    """``[N]`` item ids, in catalogue order."""
    vectors: torch.Tensor
    """``[N, D]``."""

    def __post_init__(self) -> None:
        # Built once: every evaluation batch maps its targets (and exclusions) through it.
        self._position = torch.full((int(self.ids.max()) + 1,), -1, dtype=torch.long, device=self.ids.device)
        self._position[self.ids] = torch.arange(self.ids.numel(), device=self.ids.device)

    def index_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Catalogue position of each id; -1 for ids not in the catalogue."""
        inside = (ids >= 0) & (ids < self._position.numel())
        return torch.where(inside, self._position[ids.clamp(0, self._position.numel() - 1)], torch.full_like(ids, -1))


def read_catalogue(path: str | Path, schema: FeatureSchema, *, item_feature: str) -> tuple[torch.Tensor, pa.Table]:
    """The catalogue's item ids and the table of its columns that ``schema`` reads.

    Raises:
        DataError: the file is missing, lacks the ``item_feature`` column, or repeats an id.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"item catalogue '{path}' (data.items_path) does not exist; point data.items_path at a Parquet "
                        "file with one row per item (shardrec data prepare movielens writes items.parquet)")
    f = next(g for g in schema.sparse if g.name == item_feature)
    names = set(pq.read_schema(path).names)
    if f.column not in names:
        raise DataError(f"item catalogue '{path}' (data.items_path) has no column '{f.column}' (the model's item "
                        f"feature '{item_feature}'); its columns: {', '.join(sorted(names))}")
    wanted = [c for g in schema.sparse for c in g.columns if c in names]
    table = pq.read_table(path, columns=list(dict.fromkeys(wanted)))
    ids = decode_sparse(table, f, schema.sparse.index(f), schema, str(path))
    if not (ids.lengths == 1).all():
        raise DataError(f"item catalogue '{path}': column '{f.column}' must hold exactly one id per row")
    unique, counts = np.unique(ids.values, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"item catalogue '{path}': item id {unique[counts > 1][0]} appears twice; keep one row per item")
    return torch.from_numpy(np.array(ids.values)), table


def catalogue_kjt(table: pa.Table, schema: FeatureSchema, *, where: str) -> KeyedJaggedTensor:
    """A KJT of the schema's unweighted keys for the rows of ``table``: features whose columns it
    has are decoded, the others (user side, negatives) are empty.

    The key list is the training batches' one: a sharded collection fixes its input layout on the
    first call.
    """
    names = set(table.column_names)
    lengths, values = [], []
    for i, f in enumerate(schema.sparse):
        if f.weights:
            continue
        if f.negatives is None and f.columns and all(c in names for c in f.columns):
            col = decode_sparse(table, f, i, schema, where)
            lengths.append(col.lengths)
            values.append(col.values)
        else:
            lengths.append(np.zeros(table.num_rows, dtype=np.int32))
    return KeyedJaggedTensor(
        keys=schema.unweighted_names,
        values=torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.int64)),
        lengths=torch.from_numpy(np.concatenate(lengths)),
        stride=table.num_rows,
    )


def write_item_embeddings(path: Path, catalogue: Catalogue) -> None:
    """Writes ``(id, vector)`` rows to ``path`` (Parquet) under a temporary name, then renames it."""
    vectors = catalogue.vectors.float().cpu().numpy()
    table = pa.table({
        "id": pa.array(catalogue.ids.cpu().numpy()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
    })
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
