"""Full-ranking evaluation of retrieval models: every evaluation row's user vector against the
vectors of every item of a catalogue, exact top-k in item chunks, and Recall/HR/NDCG/MRR at k.

The catalogue (``data.items_path``) is a Parquet file with one row per item: the item id column
(the model's ``item_feature``) and the item-side feature columns the model's item tower reads
(``shardrec data prepare movielens`` writes ``items.parquet``). Each rank embeds an equal share of
its rows through the sharded model (the embedding lookups are collectives, so every rank makes the
same calls) and the shares are gathered, so each rank then holds all N item vectors and ranks its
own evaluation rows against them.

Metrics, per evaluation row with target items T (one here: the row's item) and top-k list L:
``recall@k = |L ∩ T| / |T|``, ``hr@k = [L ∩ T non-empty]``, ``ndcg@k = DCG / ideal DCG`` with gain
``1 / log2(position + 2)``, ``mrr = 1 / (position of the first hit + 1)`` within the largest k
(0 without a hit); each averaged over rows. With one target recall@k equals hr@k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.batch import Batch
from shardrec.data.schema import FeatureSchema
from shardrec.data.sparse import decode_sparse
from shardrec.errors import ConfigError, DataError
from shardrec.models.retrieval import RetrievalModel


@dataclass(kw_only=True)
class RetrievalEvalConfig:
    """The ``train.retrieval`` section: full-ranking evaluation of retrieval models."""

    ks: list[int] = field(default_factory=lambda: [10, 50])
    """Cut-offs of recall, hit rate and NDCG; MRR is taken within the largest."""
    exclude_feature: str | None = None
    """Sparse feature (e.g. the history) whose ids are not ranked for the row; unset: rank every item."""
    item_batch_size: int = 4096
    """Catalogue rows embedded per call."""
    score_chunk: int = 65536
    """Items scored at a time against a batch of users (bounds the score matrix)."""
    export_items: bool = True
    """Write ``item_embeddings.parquet`` (id, vector) into the run folder after the final evaluation."""

    def __post_init__(self) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ConfigError(f"train.retrieval.ks must be a non-empty list of positive cut-offs, got {self.ks}")
        if self.item_batch_size <= 0 or self.score_chunk <= 0:
            raise ConfigError("train.retrieval.item_batch_size and train.retrieval.score_chunk must be > 0")


def topk_items(
    user: torch.Tensor, items: torch.Tensor, k: int, *, chunk: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` items by dot product for each user, scoring ``chunk`` items at a time.

    A multi-interest user (``[B, K, D]``, MIND/ComiRec) scores an item by its best interest: the
    union of each interest's retrievals, merged by score.

    Args:
        user: ``[B, D]`` query vectors, or ``[B, K, D]``: K interest vectors per user.
        items: ``[N, D]`` item vectors.
        k: list length (at most N).
        chunk: items scored per matrix product.
        exclude: ``[2, E]`` (row, item index) pairs never ranked.

    Returns:
        ``(scores [B, k], item indices [B, k])``, best first.
    """
    k = min(k, items.size(0))
    best_s = user.new_full((user.size(0), 0), float("-inf"))
    best_i = torch.zeros(user.size(0), 0, dtype=torch.long, device=user.device)
    for start in range(0, items.size(0), chunk):
        scores = user @ items[start : start + chunk].t()
        if scores.dim() == 3:
            scores = scores.max(dim=1).values
        if exclude is not None:
            inside = (exclude[1] >= start) & (exclude[1] < start + scores.size(1))
            scores[exclude[0][inside], exclude[1][inside] - start] = float("-inf")
        idx = torch.arange(start, start + scores.size(1), device=user.device).expand_as(scores)
        merged_s, merged_i = torch.cat([best_s, scores], dim=1), torch.cat([best_i, idx], dim=1)
        top = torch.topk(merged_s, min(k, merged_s.size(1)), dim=1)
        best_s, best_i = top.values, merged_i.gather(1, top.indices)
    return best_s, best_i


def ranking_metrics(topk: torch.Tensor, targets: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-row metrics (summed over rows, so ranks can add them up) of top-k lists.

    Args:
        topk: ``[B, K]`` ranked item indices, K >= max(ks).
        targets: ``[B, T]`` each row's relevant item indices, -1 padded.
        ks: cut-offs.

    Returns:
        ``recall@k``, ``hr@k``, ``ndcg@k`` for each k and ``mrr``: sums over the B rows.
    """
    n_rel = (targets >= 0).sum(dim=1).clamp(min=1).double()
    hit = (topk.unsqueeze(2) == targets.unsqueeze(1)).any(dim=2) & (topk >= 0)  # [B, K]
    gain = 1.0 / torch.log2(torch.arange(topk.size(1), device=topk.device, dtype=torch.double) + 2)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        h = hit[:, :k].double()
        ideal = torch.cumsum(gain[:k], 0)[(n_rel.clamp(max=k) - 1).long()]
        out[f"recall@{k}"] = (h.sum(dim=1) / n_rel).sum()
        out[f"hr@{k}"] = (h.sum(dim=1) > 0).double().sum()
        out[f"ndcg@{k}"] = ((h * gain[:k]).sum(dim=1) / ideal).sum()
    first = torch.where(hit.any(dim=1), hit.double().argmax(dim=1).double(), torch.full_like(n_rel, math.inf))
    out["mrr"] = (1.0 / (first + 1)).sum()
    return out


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


def _share(n: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's row indices: equal counts on every rank, the last row repeated as padding."""
    per = -(-n // world_size)
    return np.minimum(np.arange(rank * per, (rank + 1) * per), n - 1)


@torch.no_grad()
def embed_catalogue(
    model: RetrievalModel, ids: torch.Tensor, table: pa.Table, schema: FeatureSchema, *, batch_size: int,
    device: torch.device, where: str,
) -> Catalogue:
    """Every catalogue item's vector (``ids`` and ``table`` from :func:`read_catalogue`, read once
    per run) through the (sharded) ``model``, gathered onto every rank; ``where`` names the file."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    rows = _share(len(ids), rank, world)
    parts = []
    for start in range(0, len(rows), batch_size):
        part = table.take(pa.array(rows[start : start + batch_size]))
        parts.append(model.item_vectors(catalogue_kjt(part, schema, where=where).to(device)))
    mine = torch.cat(parts)
    if world > 1:
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        mine = torch.cat(gathered)
    return Catalogue(ids=ids.to(device), vectors=mine[: len(ids)])


@torch.no_grad()
def evaluate_retrieval(
    model: RetrievalModel, batches: Iterable[Batch], catalogue: Catalogue, config: RetrievalEvalConfig,
    *, device: torch.device,
) -> dict[str, float]:
    """Recall/HR/NDCG@k and MRR of ``model`` over this rank's ``batches``, summed over ranks."""
    k = max(config.ks)
    sums: dict[str, torch.Tensor] = {}
    rows = 0
    for batch in batches:
        batch = batch.to(device)
        kjt = batch.sparse_features
        user = model.user_vectors(batch.dense_features, kjt)
        targets = catalogue.index_of(kjt[model.item_feature].values()).unsqueeze(1)
        exclude = _excluded(kjt, config.exclude_feature, catalogue) if config.exclude_feature else None
        _, top = topk_items(user.float(), catalogue.vectors.float(), k, chunk=config.score_chunk, exclude=exclude)
        for name, value in ranking_metrics(top, targets, config.ks).items():
            sums[name] = sums.get(name, 0) + value
        rows += user.size(0)
    names = sorted(sums)
    total = torch.tensor([float(sums[n]) for n in names] + [float(rows)], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(total)
    n = max(float(total[-1]), 1.0)
    return {**{name: float(v) / n for name, v in zip(names, total[:-1])}, "rows": int(total[-1]), "items": len(catalogue.ids)}


def _excluded(kjt: KeyedJaggedTensor, feature: str, catalogue: Catalogue) -> torch.Tensor:
    """``[2, E]`` (row, catalogue index) pairs of the ids of ``feature`` in each row."""
    jt = kjt[feature]
    rows = torch.repeat_interleave(torch.arange(jt.lengths().numel(), device=jt.values().device), jt.lengths().long())
    cols = catalogue.index_of(jt.values())
    keep = cols >= 0
    return torch.stack([rows[keep], cols[keep]])


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


def catalogue_checks(schema: FeatureSchema, exclude_feature: str | None) -> None:
    """Raises a ConfigError when ``train.retrieval.exclude_feature`` names no sparse feature."""
    if exclude_feature is not None and exclude_feature not in schema.unweighted_names:
        raise ConfigError(f"train.retrieval.exclude_feature names '{exclude_feature}', which is not a sparse feature; "
                          f"sparse features: {', '.join(schema.unweighted_names)}")
