"""MIND (Li et al. 2019): several interest vectors per user, routed from the behaviours by capsule
dynamic routing, trained through label-aware attention."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import MLPConfig, mlp_block
from shardrec.models.multi_interest import (
    BilinearMaps,
    HistoryBatch,
    HistoryInputs,
    active_interests,
    dynamic_routing,
    fill_inactive,
    label_aware_attention,
    random_routing_logits,
)
from shardrec.models.registry import register
from shardrec.models.retrieval import RetrievalLoss, RetrievalLossConfig, RetrievalModel, RetrievalOutput, negative_ids


@dataclass(kw_only=True)
class MINDConfig:
    """The ``model`` section for ``name: mind``."""

    item_feature: str | None = None
    """The item id feature; unset: the non-sequence feature over the history's table."""
    history_feature: str | None = None
    """The behaviour sequence; unset: the first sequence feature over the item's table."""
    ignored_features: list[str] = field(default_factory=list)
    """Features left out of the user profile: the row item's own attributes (e.g. genres) would leak it."""
    num_interests: int = 4
    """Interest capsules per user (K)."""
    dynamic_interests: bool = False
    """Use the paper's adaptive count max(1, min(K, floor(log2(history length)))) per user."""
    routing_iterations: int = 3
    """Dynamic routing iterations."""
    hidden_layer_sizes: list[int] = field(default_factory=list)
    """ReLU layers mixing each capsule with the profile before the last, embedding-wide ReLU layer."""
    pow: float = 2.0
    """Sharpness p of the label-aware attention (the paper: 2 or larger; large: hard attention)."""
    loss: RetrievalLossConfig = field(default_factory=RetrievalLossConfig)
    """Training loss (in-batch softmax by default; the paper's is sampled softmax)."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The MLP over each interest capsule and the profile: activation, dropout, norm, final_activation (default true) (:class:`shardrec.models.layers.MLPConfig`)."""

    def __post_init__(self) -> None:
        if self.num_interests < 1:
            raise ConfigError(f"'model.num_interests' must be >= 1, got {self.num_interests}")
        if self.routing_iterations < 1:
            raise ConfigError(f"'model.routing_iterations' must be >= 1, got {self.routing_iterations}")
        if any(s <= 0 for s in self.hidden_layer_sizes):
            raise ConfigError(f"'model.hidden_layer_sizes' must be positive widths, got {self.hidden_layer_sizes}")
        if self.pow < 1:
            raise ConfigError(f"'model.pow' must be >= 1 (the paper uses 2 or larger), got {self.pow}")


class MIND(RetrievalModel):
    """MIND from Li et al. 2019, "Multi-Interest Network with Dynamic Routing for Recommendation at
    Tmall".

    Behaviour-to-interest routing: the history's embeddings, mapped by one shared bilinear map S,
    are routed into K squashed interest capsules; the routing logits start from fixed N(0, 1)
    draws (the same for every user, so serving is deterministic) and carry no gradient. Each
    capsule, concatenated with the user profile (every other feature, pooled, and the dense
    features), passes through ReLU layers ending in the embedding width. Training scores the label
    item against the label-aware attention of the interests; serving returns all K ``[B, K, D]``.
    Item vectors are the item ids' embeddings in the history's table.

    Example::

        # features.sparse: user_id (table user), item_id (table item),
        #                  history (table item, sequence: true, max_len: 3)
        model = MIND(schema=schema, config=MINDConfig(num_interests=2), device=torch.device("cpu"))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["user_id", "item_id", "history"],
            values=torch.tensor([4, 1, 7, 3, 1, 2]),
            lengths=torch.tensor([1, 1, 1, 1, 2, 0]),
        )
        out = model(torch.empty(2, 0), kjt)  # training: RetrievalOutput, out.user [2, D]
        model.user_vectors(torch.empty(2, 0), kjt)  # [2, 2, D]
    """

    def __init__(self, *, schema: FeatureSchema, config: MINDConfig, device: torch.device) -> None:
        super().__init__()
        self.inputs = HistoryInputs(schema, item_feature=config.item_feature, history_feature=config.history_feature,
                                    ignored_features=config.ignored_features, profile=True, model="mind", device=device)
        self.item_feature = self.inputs.item_feature
        dim = self.inputs.dim
        self.bilinear = BilinearMaps(dim, num_interests=config.num_interests, length=None, device=device)
        self.interest_mlp = mlp_block(dim + self.inputs.profile_dim + len(schema.dense), [*config.hidden_layer_sizes, dim],
                                      config=config.mlp, key="model.mlp", final_activation=True, device=device)
        self.num_interests = config.num_interests
        self.dynamic = config.dynamic_interests
        self.iterations = config.routing_iterations
        self.pow = config.pow
        self.retrieval_loss = RetrievalLoss(config.loss, item_rows=self.inputs.item_rows, negatives=self.inputs.negative_feature)

    def _interests(self, dense: torch.Tensor, x: HistoryBatch) -> torch.Tensor:
        behaviours = self.bilinear(x.history)
        logits = random_routing_logits(self.num_interests, self.inputs.max_len, x.history)
        capsules = dynamic_routing(behaviours, x.mask, logits, iterations=self.iterations)
        profile = torch.cat([x.profile, dense], dim=1).unsqueeze(1).expand(-1, self.num_interests, -1)
        return self.interest_mlp(torch.cat([capsules, profile], dim=2))

    def user_vectors(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        x = self.inputs(sparse_features)
        interests = self._interests(dense_features, x)
        return fill_inactive(interests, active_interests(x.mask, self.num_interests)) if self.dynamic else interests

    def item_vectors(self, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self.inputs(sparse_features).item

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> RetrievalOutput | torch.Tensor:
        """Training: a RetrievalOutput over the batch's rows; eval: interests ``[B, K, D]``."""
        x = self.inputs(sparse_features)
        interests = self._interests(dense_features, x)
        active = active_interests(x.mask, self.num_interests) if self.dynamic else None
        if not self.training:
            return interests if active is None else fill_inactive(interests, active)
        user = label_aware_attention(interests, x.item, pow=self.pow, active=active)
        ids = sparse_features[self.item_feature].values()
        neg_ids = negative_ids(sparse_features, self.inputs.negatives, ids)
        return RetrievalOutput((user * x.item).sum(dim=-1), user, x.item, ids, x.negatives, neg_ids)


@register("mind", MINDConfig, retrieval=True)
def build_mind(config: MINDConfig, *, schema: FeatureSchema, device: torch.device) -> MIND:
    """Builds a MIND for ``schema`` on ``device``."""
    return MIND(schema=schema, config=config, device=device)
