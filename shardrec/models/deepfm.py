"""DeepFM (Guo et al. 2017): first-order weights, a factorization machine and a deep MLP that share
one set of embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.models.layers import (
    FirstOrder,
    MLPConfig,
    build_ebc,
    check_features,
    check_layer_sizes,
    mlp_block,
    pooled_by_feature,
    shared_embedding_dim,
)
from shardrec.models.registry import register


@dataclass(kw_only=True)
class DeepFMConfig:
    """The ``model`` section for ``name: deepfm``."""

    deep_layer_sizes: list[int] = field(default_factory=lambda: [128, 64])
    """Hidden widths of the deep MLP; a final width-1 layer producing its logit is added after them."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The deep MLP: activation, dropout, norm (:class:`shardrec.models.layers.MLPConfig`)."""

    def __post_init__(self) -> None:
        check_layer_sizes(self.deep_layer_sizes, key="model.deep_layer_sizes")


def fm_second_order(emb: torch.Tensor) -> torch.Tensor:
    """Factorization machine pairwise term: sum over pairs i < j of <v_i, v_j>.

    Computed in O(F * D) as 0.5 * sum_k((sum_i v_ik)^2 - sum_i v_ik^2).

    Args:
        emb: pooled embeddings ``[B, F, D]``.

    Returns:
        ``[B, 1]``.
    """
    square_of_sum = emb.sum(dim=1).pow(2)
    sum_of_square = emb.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_square).sum(dim=1, keepdim=True)


class DeepFM(nn.Module):
    """DeepFM from Guo et al. 2017, "DeepFM: A Factorization-Machine based Neural Network for CTR
    Prediction".

    logit = first order (first-order tables over the ids + Linear over dense) + FM pairwise term over the
    pooled embeddings + deep MLP over [pooled embeddings, dense]. All tables must share one
    embedding_dim D.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        model = DeepFM(schema=schema, config=DeepFMConfig(), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model(torch.randn(2, 3), kjt)  # [2]
    """

    def __init__(self, *, schema: FeatureSchema, config: DeepFMConfig, device: torch.device) -> None:
        super().__init__()
        check_features(schema, model="deepfm")
        dim = shared_embedding_dim(schema, model="deepfm")
        self.feature_names = schema.sparse_names
        self.ebc = build_ebc(schema, device=device)
        self.first_order = FirstOrder(schema=schema, device=device)
        deep_in = len(self.feature_names) * dim + len(schema.dense)
        self.deep = mlp_block(deep_in, [*config.deep_layer_sizes, 1], config=config.mlp, key="model.mlp", logit=True, device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        emb = torch.stack(pooled_by_feature(self.ebc(sparse_features), self.feature_names), dim=1)
        deep = self.deep(torch.cat([emb.flatten(1), dense_features], dim=1))
        return (self.first_order(dense_features, sparse_features) + fm_second_order(emb) + deep).squeeze(-1)


@register("deepfm", DeepFMConfig)
def build_deepfm(config: DeepFMConfig, *, schema: FeatureSchema, device: torch.device) -> DeepFM:
    """Builds a DeepFM for ``schema`` on ``device``."""
    return DeepFM(schema=schema, config=config, device=device)
