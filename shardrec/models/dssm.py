"""DSSM (Huang et al. 2013): a user tower and an item tower whose cosine similarity scores a pair."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import MLPConfig, check_layer_sizes, mlp_block
from shardrec.models.registry import register
from shardrec.models.retrieval import (
    FeatureLookup,
    RetrievalLoss,
    RetrievalLossConfig,
    RetrievalModel,
    RetrievalOutput,
    negative_ids,
    negatives_feature,
    resolve_item_feature,
)


@dataclass(kw_only=True)
class DSSMConfig:
    """The ``model`` section for ``name: dssm``."""

    item_feature: str | None = None
    """The item id feature; unset: the non-sequence feature over the history's table."""
    item_side_features: list[str] = field(default_factory=list)
    """Further features of the item tower (e.g. genres); every other feature feeds the user tower."""
    user_layer_sizes: list[int] = field(default_factory=lambda: [128, 64])
    """Widths of the user tower's MLP; the last is the vector width."""
    item_layer_sizes: list[int] = field(default_factory=lambda: [128, 64])
    """Widths of the item tower's MLP; must end in the user tower's width."""
    normalize: bool = True
    """L2-normalize both vectors so that their dot product is the cosine similarity (the paper's)."""
    loss: RetrievalLossConfig = field(default_factory=RetrievalLossConfig)
    """Training loss (in-batch softmax by default)."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """Activation, dropout, norm of both towers (:class:`shardrec.models.layers.MLPConfig`); ``user_mlp`` and ``item_mlp`` override it key by key."""
    user_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The user tower (its last layer linear by default); unset keys: ``mlp``'s."""
    item_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The item tower (its last layer linear by default); unset keys: ``mlp``'s."""

    def __post_init__(self) -> None:
        check_layer_sizes(self.user_layer_sizes, key="model.user_layer_sizes")
        check_layer_sizes(self.item_layer_sizes, key="model.item_layer_sizes")
        if self.user_layer_sizes[-1] != self.item_layer_sizes[-1]:
            raise ConfigError(f"model.user_layer_sizes and model.item_layer_sizes must end in the same width, got "
                              f"{self.user_layer_sizes[-1]} and {self.item_layer_sizes[-1]}")


class DSSM(RetrievalModel):
    """DSSM from Huang et al. 2013, "Learning Deep Structured Semantic Models for Web Search using
    Clickthrough Data", as the two-tower retrieval model.

    The user tower is an MLP over the pooled user features, the mean of each history's embeddings
    and the dense features; the item tower an MLP over the item id's embedding and the item-side
    features. Both end in a Tanh-free linear layer and are L2-normalized (cosine similarity).

    Example::

        # features.sparse: user_id (table user), item_id (table item),
        #                  history (table item, sequence: true, max_len: 3)
        model = DSSM(schema=schema, config=DSSMConfig(), device=torch.device("cpu"))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["user_id", "item_id", "history"],
            values=torch.tensor([4, 1, 7, 3, 1, 2]),
            lengths=torch.tensor([1, 1, 1, 1, 2, 0]),
        )
        out = model(torch.empty(2, 0), kjt)  # training: RetrievalOutput, out.user [2, 64]
    """

    def __init__(self, *, schema: FeatureSchema, config: DSSMConfig, device: torch.device) -> None:
        super().__init__()
        self.item_feature = resolve_item_feature(schema, config.item_feature, model="dssm")
        # In-batch softmax needs no drawn negatives; a negatives feature in the schema is then ignored.
        neg = negatives_feature(schema, item_feature=self.item_feature, model="dssm") if config.loss.kind != "in_batch" else None
        self.negatives = neg.name if neg is not None else None
        unknown = [n for n in config.item_side_features if n not in schema.sparse_names]
        if unknown:
            raise ConfigError(f"'model.item_side_features' names {', '.join(unknown)}, not sparse features; "
                              f"sparse features: {', '.join(schema.sparse_names)}")
        if neg is not None and config.item_side_features:
            raise ConfigError("model 'dssm': sampled negatives carry only item ids, so the item tower cannot read "
                              f"'model.item_side_features' ({', '.join(config.item_side_features)}) for them; empty that "
                              "list or drop the negatives feature and use 'model.loss.kind: in_batch'")
        self.lookup = FeatureLookup(schema, device=device)
        self.item_names = [self.item_feature, *config.item_side_features]
        skip = set(self.item_names) | {f.name for f in schema.sparse if f.negatives is not None}
        self.user_names = [f.name for f in schema.sparse if f.name not in skip and not f.raw and not f.weights]
        dim = {f.name: schema.table(f.table).embedding_dim for f in schema.sparse if f.table is not None}
        self.user_mlp = mlp_block(sum(dim[n] for n in self.user_names) + len(schema.dense), config.user_layer_sizes,
                                  config=config.user_mlp.over(config.mlp), key="model.user_mlp", device=device)
        self.item_mlp = mlp_block(sum(dim[n] for n in self.item_names), config.item_layer_sizes,
                                  config=config.item_mlp.over(config.mlp), key="model.item_mlp", device=device)
        self.normalize = config.normalize
        table = next(f.table for f in schema.sparse if f.name == self.item_feature)
        self.retrieval_loss = RetrievalLoss(config.loss, item_rows=schema.table(table).num_embeddings, negatives=neg)

    def _vector(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1) if self.normalize else x

    def _user(self, dense: torch.Tensor, pooled: dict[str, torch.Tensor], unpooled: dict[str, JaggedTensor]) -> torch.Tensor:
        parts = [self.lookup.feature_vector(n, pooled, unpooled) for n in self.user_names]
        return self._vector(self.user_mlp(torch.cat([*parts, dense], dim=1)))

    def _item(self, pooled: dict[str, torch.Tensor], unpooled: dict[str, JaggedTensor]) -> torch.Tensor:
        return self._vector(self.item_mlp(torch.cat([self.lookup.feature_vector(n, pooled, unpooled) for n in self.item_names], dim=1)))

    def user_vectors(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self._user(dense_features, *self.lookup(sparse_features))

    def item_vectors(self, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self._item(*self.lookup(sparse_features))

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> RetrievalOutput | torch.Tensor:
        """Training: a RetrievalOutput over the batch's rows; eval: user vectors ``[B, D]``."""
        pooled, unpooled = self.lookup(sparse_features)
        user = self._user(dense_features, pooled, unpooled)
        if not self.training:
            return user
        item = self._item(pooled, unpooled)
        ids = sparse_features[self.item_feature].values()
        neg_ids = negative_ids(sparse_features, self.negatives, ids)
        neg = self._vector(self.item_mlp(unpooled[self.negatives].values())) if self.negatives else item[:0]
        return RetrievalOutput((user * item).sum(dim=-1), user, item, ids, neg, neg_ids)


@register("dssm", DSSMConfig, retrieval=True)
def build_dssm(config: DSSMConfig, *, schema: FeatureSchema, device: torch.device) -> DSSM:
    """Builds a DSSM for ``schema`` on ``device``."""
    return DSSM(schema=schema, config=config, device=device)
