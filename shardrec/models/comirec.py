"""ComiRec (Cen et al. 2020): multi-interest extraction by dynamic routing (ComiRec-DR) or
self-attention (ComiRec-SA), trained on the interest closest to the target, and the paper's
controllable aggregation of the interests' retrievals."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.multi_interest import BilinearMaps, HistoryBatch, HistoryInputs, dynamic_routing
from shardrec.models.registry import register
from shardrec.models.retrieval import RetrievalLoss, RetrievalLossConfig, RetrievalModel, RetrievalOutput, negative_ids


@dataclass(kw_only=True)
class ComiRecDRConfig:
    """The ``model`` section for ``name: comirec_dr``."""

    item_feature: str | None = None
    """The item id feature; unset: the non-sequence feature over the history's table."""
    history_feature: str | None = None
    """The behaviour sequence; unset: the first sequence feature over the item's table."""
    num_interests: int = 4
    """Interests per user (K)."""
    routing_iterations: int = 3
    """Dynamic routing iterations."""
    loss: RetrievalLossConfig = field(default_factory=RetrievalLossConfig)
    """Training loss (in-batch softmax by default; the paper's is sampled softmax)."""

    def __post_init__(self) -> None:
        _check_interests(self.num_interests)
        if self.routing_iterations < 1:
            raise ConfigError(f"'model.routing_iterations' must be >= 1, got {self.routing_iterations}")


@dataclass(kw_only=True)
class ComiRecSAConfig:
    """The ``model`` section for ``name: comirec_sa``."""

    item_feature: str | None = None
    """The item id feature; unset: the non-sequence feature over the history's table."""
    history_feature: str | None = None
    """The behaviour sequence; unset: the first sequence feature over the item's table."""
    num_interests: int = 4
    """Attention heads, one interest each (K)."""
    attention_size: int | None = None
    """Width of W1 in softmax(W2 tanh(W1 H^T)); unset: 4 x the embedding width (ComiRec's code)."""
    loss: RetrievalLossConfig = field(default_factory=RetrievalLossConfig)
    """Training loss (in-batch softmax by default; the paper's is sampled softmax)."""

    def __post_init__(self) -> None:
        _check_interests(self.num_interests)
        if self.attention_size is not None and self.attention_size <= 0:
            raise ConfigError(f"'model.attention_size' must be > 0, got {self.attention_size}")


def _check_interests(k: int) -> None:
    if k < 1:
        raise ConfigError(f"'model.num_interests' must be >= 1, got {k}")


@torch.fx.wrap
def best_interest(interests: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B, D]``: each row's interest with the largest dot product with its target (ComiRec's hard readout)."""
    # A leaf for the pipeline's tracer: it indexes by data.
    best = torch.einsum("bkd,bd->bk", interests, target).argmax(dim=1)
    return interests[torch.arange(interests.size(0), device=interests.device), best]


class SelfAttentiveExtractor(nn.Module):
    """ComiRec-SA's extractor: ``A = softmax(W2 tanh(W1 (H + P)^T))`` over the valid positions, K
    heads, interests ``A H`` (the learned positional embeddings P steer the attention only, as in
    ComiRec's code).

    Args:
        length: history positions (L).
        dim: embedding width (D).
        hidden: width of W1.
        num_interests: heads (K).
        device: where the weights are created.
    """

    def __init__(self, length: int, dim: int, hidden: int, num_interests: int, *, device: torch.device) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.empty(length, dim, device=device))
        self.w1 = nn.Linear(dim, hidden, device=device)
        self.w2 = nn.Linear(hidden, num_interests, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``history [B, L, D]``, ``mask [B, L]`` -> interests ``[B, K, D]`` (zeros for an empty history)."""
        logits = self.w2(torch.tanh(self.w1(history + self.position))).transpose(1, 2)  # [B, K, L]
        # A finite fill: an empty history then attends uniformly over its zeros instead of giving NaN.
        logits = logits.masked_fill(~mask.unsqueeze(1), -1e9)
        return torch.softmax(logits, dim=2) @ history


class ComiRec(RetrievalModel):
    """ComiRec from Cen et al. 2020, "Controllable Multi-Interest Framework for Recommendation":
    ``comirec_dr`` (dynamic routing) and ``comirec_sa`` (self-attention).

    The history alone gives K interest vectors; item vectors are the item ids' embeddings in the
    history's table. Training scores each row's target against its interest with the largest dot
    product with the target (the paper's argmax); serving returns all K ``[B, K, D]`` and an item
    scores by its best interest (:func:`controllable_topk` trades some of that score for category
    diversity).

    DR routes the behaviours, mapped by one matrix per (position, interest), from zero routing
    logits; SA attends over the history plus positional embeddings with K heads.

    Example::

        # features.sparse: item_id (table item), history (table item, sequence: true, max_len: 3)
        model = build_comirec_sa(ComiRecSAConfig(num_interests=2), schema=schema, device=torch.device("cpu"))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["item_id", "history"], values=torch.tensor([1, 7, 3, 1, 2]), lengths=torch.tensor([1, 1, 1, 2]),
        )
        out = model(torch.empty(2, 0), kjt)  # training: RetrievalOutput, out.user [2, D]
        model.user_vectors(torch.empty(2, 0), kjt)  # [2, 2, D]
    """

    def __init__(self, *, schema: FeatureSchema, config: ComiRecDRConfig | ComiRecSAConfig, device: torch.device) -> None:
        super().__init__()
        name = "comirec_dr" if isinstance(config, ComiRecDRConfig) else "comirec_sa"
        self.inputs = HistoryInputs(schema, item_feature=config.item_feature, history_feature=config.history_feature,
                                    ignored_features=[], profile=False, model=name, device=device)
        self.item_feature = self.inputs.item_feature
        dim, length, k = self.inputs.dim, self.inputs.max_len, config.num_interests
        self.num_interests = k
        if isinstance(config, ComiRecDRConfig):
            self.bilinear: BilinearMaps | None = BilinearMaps(dim, num_interests=k, length=length, device=device)
            self.attention: SelfAttentiveExtractor | None = None
            self.iterations = config.routing_iterations
        else:
            self.bilinear = None
            self.attention = SelfAttentiveExtractor(length, dim, config.attention_size or 4 * dim, k, device=device)
        self.retrieval_loss = RetrievalLoss(config.loss, item_rows=self.inputs.item_rows, negatives=self.inputs.negative_feature)

    def _interests(self, x: HistoryBatch) -> torch.Tensor:
        if self.bilinear is not None:
            behaviours = self.bilinear(x.history)
            logits = behaviours.new_zeros(1, 1, 1)  # ComiRec-DR's routing starts from zeros
            return dynamic_routing(behaviours, x.mask, logits, iterations=self.iterations)
        return self.attention(x.history, x.mask)  # type: ignore[misc]

    def user_vectors(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self._interests(self.inputs(sparse_features))

    def item_vectors(self, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self.inputs(sparse_features).item

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> RetrievalOutput | torch.Tensor:
        """Training: a RetrievalOutput over the batch's rows; eval: interests ``[B, K, D]``."""
        x = self.inputs(sparse_features)
        interests = self._interests(x)
        if not self.training:
            return interests
        user = best_interest(interests, x.item)
        ids = sparse_features[self.item_feature].values()
        neg_ids = negative_ids(sparse_features, self.inputs.negatives, ids)
        return RetrievalOutput((user * x.item).sum(dim=-1), user, x.item, ids, x.negatives, neg_ids)


def controllable_topk(
    user_interests: torch.Tensor, item_vectors: torch.Tensor, item_categories: torch.Tensor, k: int, lam: float
) -> torch.Tensor:
    """ComiRec's controllable aggregation (Section 3.4, greedy Algorithm 1).

    The candidates M are the union of each interest's top-k items; starting from S = {}, k times
    the candidate maximizing ``f(u, i) + lam * sum_{j in S} [CATE(i) != CATE(j)]`` joins S, where
    ``f(u, i) = max_k e_i . v_k``. ``lam = 0`` is plain top-k by best interest; a large ``lam``
    takes items of categories not yet chosen first.

    Args:
        user_interests: ``[K, D]`` one user's interests, or ``[B, K, D]``.
        item_vectors: ``[N, D]``.
        item_categories: ``[N]`` an integer category per item.
        k: items to return (at most N).
        lam: weight of the diversity term (>= 0).

    Returns:
        ``[k]`` (or ``[B, k]``) item indices in the order chosen.
    """
    if not 0 < k <= item_vectors.size(0):
        raise ValueError(f"controllable_topk: k must be in [1, {item_vectors.size(0)}] (the number of items), got {k}")
    if lam < 0:
        raise ValueError(f"controllable_topk: lam must be >= 0, got {lam}")
    interests = user_interests.unsqueeze(0) if user_interests.dim() == 2 else user_interests
    scores = torch.einsum("bkd,nd->bkn", interests, item_vectors)
    top = scores.topk(k, dim=2).indices.flatten(1)
    candidate = torch.zeros_like(scores[:, 0], dtype=torch.bool).scatter(1, top, True)
    gain = scores.max(dim=1).values.masked_fill(~candidate, float("-inf"))
    diversity = torch.zeros_like(gain)
    chosen = []
    for _ in range(k):
        j = (gain + lam * diversity).argmax(dim=1)
        chosen.append(j)
        gain = gain.scatter(1, j.unsqueeze(1), float("-inf"))
        diversity = diversity + (item_categories.unsqueeze(0) != item_categories[j].unsqueeze(1)).to(diversity.dtype)
    out = torch.stack(chosen, dim=1)
    return out.squeeze(0) if user_interests.dim() == 2 else out


@register("comirec_dr", ComiRecDRConfig, retrieval=True)
def build_comirec_dr(config: ComiRecDRConfig, *, schema: FeatureSchema, device: torch.device) -> ComiRec:
    """Builds a ComiRec-DR for ``schema`` on ``device``."""
    return ComiRec(schema=schema, config=config, device=device)


@register("comirec_sa", ComiRecSAConfig, retrieval=True)
def build_comirec_sa(config: ComiRecSAConfig, *, schema: FeatureSchema, device: torch.device) -> ComiRec:
    """Builds a ComiRec-SA for ``schema`` on ``device``."""
    return ComiRec(schema=schema, config=config, device=device)
