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
from typing import Iterable

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.batch import Batch
from shardrec.data.catalogue import Catalogue, catalogue_kjt
from shardrec.data.schema import FeatureSchema
from shardrec.models.retrieval import RetrievalModel
from shardrec.train.config import RetrievalEvalConfig


def _share(n: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's row indices: equal counts on every rank, the last row repeated as padding."""
    per = -(-n // world_size)
    return np.minimum(np.arange(rank * per, (rank + 1) * per), n - 1)


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


