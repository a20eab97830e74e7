"""Shared parts of the history-based matching models (YouTubeDNN, MIND, ComiRec): which features
hold the history, the item and the user profile, their lookups, and the multi-interest pieces
(squash, dynamic routing of behaviour capsules into interest capsules, label-aware attention).

A history model reads one history feature (``sequence: true``) over the item table; the row's item
vector is the item id's embedding from that same table (the paper's output embeddings). Its
sampled negatives, if the schema draws any, come from the same table. The profile (MIND's user
profile, YouTubeDNN's user and context features) is every other feature but the
``ignored_features``; ComiRec reads none.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema, SparseFeature
from shardrec.errors import ConfigError
from shardrec.models.retrieval import FeatureLookup, negatives_feature, resolve_item_feature, single
from shardrec.models.sequence import padded_sequence

ROUTING_SEED = 20190417
"""Seed of MIND's fixed random routing logits (the same on every rank, in training and serving)."""


class HistoryBatch(NamedTuple):
    """What :class:`HistoryInputs` reads from a batch."""

    history: torch.Tensor
    """``[B, L, D]`` history embeddings, oldest first, zero-padded on the right."""
    mask: torch.Tensor
    """``[B, L]`` bool: valid history positions."""
    item: torch.Tensor
    """``[B, D]`` embedding of each row's item."""
    profile: torch.Tensor
    """``[B, P]`` the profile features' embeddings concatenated (``P = 0`` without a profile)."""
    negatives: torch.Tensor
    """``[N, D]`` embeddings of the batch's sampled negatives (``N = 0`` without a sampler)."""


class HistoryInputs(nn.Module):
    """The embedding lookups of a history model over the part of the schema it reads.

    Features outside that part (ignored ones; for ``profile=False`` every profile feature) get no
    table: a collection reads only its own keys from the KJT.

    Args:
        schema: features and tables.
        item_feature: the item id feature; None: the non-sequence feature over the history's table.
        history_feature: the history; None: the first sequence feature over the item's table.
        ignored_features: features the model must not read (e.g. the row item's own genres).
        profile: read the profile features (every feature not named above).
        model: the model's name, for errors.
        device: where the tables are created.
    """

    def __init__(
        self, schema: FeatureSchema, *, item_feature: str | None, history_feature: str | None,
        ignored_features: list[str], profile: bool, model: str, device: torch.device,
    ) -> None:
        super().__init__()
        unknown = [n for n in ignored_features if n not in schema.sparse_names]
        if unknown:
            raise ConfigError(f"'model.ignored_features' names {', '.join(unknown)}, not sparse features; "
                              f"sparse features: {', '.join(schema.sparse_names)}")
        self.item_feature = resolve_item_feature(schema, item_feature, model=model)
        item = next(f for f in schema.sparse if f.name == self.item_feature)
        hist = _history(schema, history_feature, table=item.table, model=model)  # type: ignore[arg-type]
        self.history, self.max_len = hist.name, hist.max_len
        neg = negatives_feature(schema, item_feature=self.item_feature, model=model)
        self.negative_feature = neg
        self.negatives = neg.name if neg is not None else None
        core = {self.item_feature, self.history, *([self.negatives] if self.negatives else []), *ignored_features}
        self.profile_names = [f.name for f in schema.sparse
                              if profile and f.name not in core and not f.raw and not f.weights]
        read = core - set(ignored_features) | set(self.profile_names)
        sub = _sub_schema(schema, read)
        self.lookup = FeatureLookup(sub, device=device)
        self.dim = schema.table(item.table).embedding_dim  # type: ignore[arg-type]
        self.item_rows = schema.table(item.table).num_embeddings  # type: ignore[arg-type]
        self.profile_dim = sum(schema.table(f.table).embedding_dim for f in sub.sparse if f.name in self.profile_names)  # type: ignore[arg-type]

    def forward(self, sparse_features: KeyedJaggedTensor) -> HistoryBatch:
        pooled, unpooled = self.lookup(sparse_features)
        history, mask = padded_sequence(unpooled[self.history], self.max_len)
        item = single(unpooled[self.item_feature])
        parts = [self.lookup.feature_vector(n, pooled, unpooled) for n in self.profile_names]
        profile = torch.cat(parts, dim=1) if parts else item[:, :0]
        negatives = unpooled[self.negatives].values() if self.negatives else item[:0]
        return HistoryBatch(history, mask, item, profile, negatives)


def _history(schema: FeatureSchema, name: str | None, *, table: str, model: str) -> SparseFeature:
    found = [f for f in schema.sparse if f.sequence and f.table == table and (name is None or f.name == name)]
    if not found:
        what = f"'model.history_feature' names '{name}', which is not" if name else f"model '{model}' needs"
        raise ConfigError(f"{what} a sequence feature over the item table '{table}'; sequence features: "
                          f"{', '.join(f.name for f in schema.sparse if f.sequence) or '(none)'}")
    if found[0].max_len is None:
        raise ConfigError(f"model '{model}' pads histories to a fixed length; set 'max_len' on features.sparse '{found[0].name}'")
    return found[0]


def _sub_schema(schema: FeatureSchema, names: set[str]) -> FeatureSchema:
    sparse = [f for f in schema.sparse if f.name in names]
    used = {f.table for f in sparse}
    return FeatureSchema(label=schema.label, dense=schema.dense, sparse=sparse, tables=[t for t in schema.tables if t.name in used])


class BilinearMaps(nn.Module):
    """The maps of behaviours into interest capsules: MIND's one shared ``S`` or ComiRec-DR's
    ``W_ij``, one per (history position i, interest j) (its code's ``bilinear_type=2``). Initialized
    N(0, 1) as in both papers' code: smaller maps squash the capsules to near zero and training stalls.

    Args:
        dim: embedding width (D).
        num_interests: interests (K).
        length: history positions (L) for one map per (position, interest); None: one shared map.
        device: where the weights are created.
    """

    def __init__(self, dim: int, *, num_interests: int, length: int | None, device: torch.device) -> None:
        super().__init__()
        self.num_interests = num_interests
        self.shared = length is None
        lead = (length, num_interests) if length is not None else ()
        self.weight = nn.Parameter(torch.empty(*lead, dim, dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1.0)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` -> ``[B, K, L, D]``: each behaviour mapped for each interest."""
        if self.shared:
            return (history @ self.weight.t()).unsqueeze(1).expand(-1, self.num_interests, -1, -1)
        return torch.einsum("lked,ble->bkld", self.weight, history)


def squash(z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Capsule squash ``|z|^2 / (1 + |z|^2) * z / |z|`` over the last dimension: norms fall in [0, 1)."""
    n2 = z.pow(2).sum(dim=-1, keepdim=True)
    return z * (n2 / (1 + n2) / torch.sqrt(n2 + eps))


def dynamic_routing(
    behaviours: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor, *, iterations: int
) -> torch.Tensor:
    """Routes behaviour capsules into interest capsules (MIND's B2I routing, ComiRec-DR's).

    Each iteration gives every behaviour a softmax over the interests of its routing logits,
    squashes the weighted sums into interest capsules, and adds each (behaviour, capsule)
    agreement to the logits. All but the last iteration see the behaviours detached, so the
    routing logits and weights carry no gradient (MIND: not back-propagated); the last sum does.

    Args:
        behaviours: ``[B, K, L, D]`` each behaviour mapped for each interest (MIND: one shared map, expanded).
        mask: ``[B, L]`` valid behaviours; padding gets no weight.
        logits: ``[B or 1, K, L]`` initial routing logits.
        iterations: routing iterations (>= 1).

    Returns:
        ``[B, K, D]`` interest capsules.
    """
    valid = mask.unsqueeze(1).to(behaviours.dtype)
    fixed = behaviours.detach()
    b = logits.detach().expand(behaviours.shape[:3])
    for _ in range(iterations - 1):
        w = torch.softmax(b, dim=1) * valid
        capsules = squash(torch.einsum("bkl,bkld->bkd", w, fixed))
        b = b + torch.einsum("bkld,bkd->bkl", fixed, capsules)
    w = (torch.softmax(b, dim=1) * valid).detach()
    return squash(torch.einsum("bkl,bkld->bkd", w, behaviours))


@torch.fx.wrap
def random_routing_logits(num_interests: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """``[1, K, L]`` routing logits drawn from N(0, 1) with a fixed seed: they break the symmetry of
    MIND's shared map without being learned, and stay the same across batches, ranks and serving."""
    # A leaf for the pipeline's tracer: a generator is not a graph value.
    gen = torch.Generator().manual_seed(ROUTING_SEED)
    return torch.randn(1, num_interests, length, generator=gen).to(device=like.device, dtype=like.dtype)


def active_interests(mask: torch.Tensor, num_interests: int) -> torch.Tensor:
    """``[B, K]`` bool: MIND's dynamic interest count ``max(1, min(K, floor(log2(history length))))``."""
    length = mask.sum(dim=1).clamp(min=1).to(torch.float32)
    count = torch.log2(length).floor().clamp(min=1, max=num_interests)
    return torch.arange(num_interests, device=mask.device).unsqueeze(0) < count.unsqueeze(1)


def fill_inactive(interests: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Replaces inactive interests by the first one, so that serving's best-interest score ignores them."""
    return torch.where(active.unsqueeze(-1), interests, interests[:, :1].expand_as(interests))


def label_aware_attention(
    interests: torch.Tensor, target: torch.Tensor, *, pow: float, active: torch.Tensor | None = None
) -> torch.Tensor:
    """MIND's label-aware attention: ``sum_k softmax_k((target . v_k)^pow) v_k``.

    A negative score keeps its sign under the power (``sign(s) |s|^pow``): equal to the paper's
    ``s^pow`` wherever ``s >= 0``, but an even ``pow`` then never prefers an opposed interest and a
    non-integer one stays defined. Large ``pow`` approaches hard attention to the best-matching
    interest; 1 is a plain softmax over the scores.

    Args:
        interests: ``[B, K, D]``.
        target: ``[B, D]`` the label item's vector.
        pow: the attention's sharpness p.
        active: ``[B, K]`` interests to attend over (None: all).

    Returns:
        ``[B, D]`` one user vector per row.
    """
    s = torch.einsum("bkd,bd->bk", interests, target)
    s = torch.sign(s) * s.abs().pow(pow)
    if active is not None:
        s = s.masked_fill(~active, float("-inf"))
    return torch.einsum("bk,bkd->bd", torch.softmax(s, dim=1), interests)
