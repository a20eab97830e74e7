"""YouTubeDNN (Covington et al. 2016): the candidate-generation network, a ReLU tower over the mean
watch-history embedding and the user's features, scored against the items' output embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.models.layers import MLPConfig, check_layer_sizes, mlp_block
from shardrec.models.multi_interest import HistoryInputs
from shardrec.models.registry import register
from shardrec.models.retrieval import (
    RetrievalLoss,
    RetrievalLossConfig,
    RetrievalModel,
    RetrievalOutput,
    masked_mean,
    negative_ids,
)


@dataclass(kw_only=True)
class YouTubeDNNConfig:
    """The ``model`` section for ``name: youtubednn``."""

    item_feature: str | None = None
    """The item id feature; unset: the non-sequence feature over the history's table."""
    history_feature: str | None = None
    """The watch history; unset: the first sequence feature over the item's table."""
    ignored_features: list[str] = field(default_factory=list)
    """Features the user tower must not read: the row item's own attributes (e.g. genres) would leak it."""
    layer_sizes: list[int] = field(default_factory=lambda: [256, 128])
    """Hidden ReLU layers of the user tower; a last linear layer of the item table's width follows."""
    loss: RetrievalLossConfig = field(default_factory=lambda: RetrievalLossConfig(kind="sampled"))
    """Training loss: sampled softmax by default (the paper's), which needs a negatives feature."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The user tower: activation, dropout, norm, final_activation (default false: the user vector is linear) (:class:`shardrec.models.layers.MLPConfig`)."""

    def __post_init__(self) -> None:
        check_layer_sizes(self.layer_sizes, key="model.layer_sizes")


class YouTubeDNN(RetrievalModel):
    """YouTubeDNN from Covington et al. 2016, "Deep Neural Networks for YouTube Recommendations",
    candidate generation.

    The user vector is a ReLU tower over [mean of the history's embeddings, the pooled user and
    context features, the dense features] ending in the embedding width; an item's vector is its
    id's embedding in the history's table (the softmax's output embeddings, shared with the input).
    Unlike the paper's tower the top layer is linear: a ReLU there leaves the user vectors
    non-negative, and on small widths most of them stayed at zero and training stalled.

    Example::

        # features.sparse: user_id (table user), item_id (table item),
        #                  history (table item, sequence: true, max_len: 3),
        #                  neg_item_ids (table item, negatives: {num: 2, of: item_id})
        model = YouTubeDNN(schema=schema, config=YouTubeDNNConfig(), device=torch.device("cpu"))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["user_id", "item_id", "history", "neg_item_ids"],
            values=torch.tensor([4, 1, 7, 3, 1, 2, 5, 9]),
            lengths=torch.tensor([1, 1, 1, 1, 2, 0, 2, 0]),
        )
        out = model(torch.empty(2, 0), kjt)  # training: RetrievalOutput, out.user [2, D], out.negatives [2, D]
    """

    def __init__(self, *, schema: FeatureSchema, config: YouTubeDNNConfig, device: torch.device) -> None:
        super().__init__()
        self.inputs = HistoryInputs(schema, item_feature=config.item_feature, history_feature=config.history_feature,
                                    ignored_features=config.ignored_features, profile=True, model="youtubednn",
                                    device=device)
        self.item_feature = self.inputs.item_feature
        dim = self.inputs.dim
        self.user_mlp = mlp_block(dim + self.inputs.profile_dim + len(schema.dense), [*config.layer_sizes, dim],
                                  config=config.mlp, key="model.mlp", device=device)
        self.retrieval_loss = RetrievalLoss(config.loss, item_rows=self.inputs.item_rows, negatives=self.inputs.negative_feature)

    def _user(self, dense: torch.Tensor, history: torch.Tensor, mask: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        return self.user_mlp(torch.cat([masked_mean(history, mask), profile, dense], dim=1))

    def user_vectors(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        x = self.inputs(sparse_features)
        return self._user(dense_features, x.history, x.mask, x.profile)

    def item_vectors(self, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self.inputs(sparse_features).item

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> RetrievalOutput | torch.Tensor:
        """Training: a RetrievalOutput over the batch's rows; eval: user vectors ``[B, D]``."""
        x = self.inputs(sparse_features)
        user = self._user(dense_features, x.history, x.mask, x.profile)
        if not self.training:
            return user
        ids = sparse_features[self.item_feature].values()
        neg_ids = negative_ids(sparse_features, self.inputs.negatives, ids)
        return RetrievalOutput((user * x.item).sum(dim=-1), user, x.item, ids, x.negatives, neg_ids)


@register("youtubednn", YouTubeDNNConfig, retrieval=True)
def build_youtubednn(config: YouTubeDNNConfig, *, schema: FeatureSchema, device: torch.device) -> YouTubeDNN:
    """Builds a YouTubeDNN for ``schema`` on ``device``."""
    return YouTubeDNN(schema=schema, config=config, device=device)
