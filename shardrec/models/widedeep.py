"""Wide & Deep (Cheng et al. 2016): a linear model over the raw features plus a deep MLP over
embeddings, trained jointly."""

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
    embedding_output_dim,
    mlp_block,
    pooled_by_feature,
)
from shardrec.models.registry import register


@dataclass(kw_only=True)
class WideDeepConfig:
    """The ``model`` section for ``name: widedeep``."""

    deep_layer_sizes: list[int] = field(default_factory=lambda: [128, 64])
    """Hidden widths of the deep MLP; a final width-1 layer producing its logit is added after them."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The deep MLP: activation, dropout, norm (:class:`shardrec.models.layers.MLPConfig`)."""

    def __post_init__(self) -> None:
        check_layer_sizes(self.deep_layer_sizes, key="model.deep_layer_sizes")


class WideDeep(nn.Module):
    """Wide & Deep from Cheng et al. 2016, "Wide & Deep Learning for Recommender Systems".

    logit = wide (first-order tables over the ids + Linear over dense) + deep MLP over [pooled
    embeddings, dense]. Tables may have different embedding_dims.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        model = WideDeep(schema=schema, config=WideDeepConfig(), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model(torch.randn(2, 3), kjt)  # [2]
    """

    def __init__(self, *, schema: FeatureSchema, config: WideDeepConfig, device: torch.device) -> None:
        super().__init__()
        check_features(schema, model="widedeep")
        self.feature_names = schema.sparse_names
        self.ebc = build_ebc(schema, device=device)
        self.wide = FirstOrder(schema=schema, device=device)
        deep_in = embedding_output_dim(schema) + len(schema.dense)
        self.deep = mlp_block(deep_in, [*config.deep_layer_sizes, 1], config=config.mlp, key="model.mlp", logit=True, device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        emb = pooled_by_feature(self.ebc(sparse_features), self.feature_names)
        deep = self.deep(torch.cat([*emb, dense_features], dim=1))
        return (self.wide(dense_features, sparse_features) + deep).squeeze(-1)


@register("widedeep", WideDeepConfig)
def build_widedeep(config: WideDeepConfig, *, schema: FeatureSchema, device: torch.device) -> WideDeep:
    """Builds a Wide & Deep model for ``schema`` on ``device``."""
    return WideDeep(schema=schema, config=config, device=device)
