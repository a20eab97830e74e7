"""DCN (Wang et al. 2017): a cross network of vector cross layers in parallel with a deep MLP."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import (
    MLPConfig,
    build_ebc_if_tables,
    check_features,
    check_layer_sizes,
    embedding_output_dim,
    mlp_block,
    pooled_embeddings,
)
from shardrec.models.registry import register


@dataclass(kw_only=True)
class DCNConfig:
    """The ``model`` section for ``name: dcn``; defaults are the paper's best Criteo setting."""

    num_cross_layers: int = 6
    """Number of cross layers; l layers model feature crosses up to degree l + 1."""
    deep_layer_sizes: list[int] = field(default_factory=lambda: [1024, 1024])
    """Widths of the ReLU layers of the deep network, which runs beside the cross network."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The deep network: activation, dropout, norm, final_activation (default true: its output joins the cross network's) (:class:`shardrec.models.layers.MLPConfig`)."""

    def __post_init__(self) -> None:
        if self.num_cross_layers < 1:
            raise ConfigError(f"'model.num_cross_layers' must be >= 1, got {self.num_cross_layers}")
        check_layer_sizes(self.deep_layer_sizes, key="model.deep_layer_sizes")


class CrossLayer(nn.Module):
    """One DCN cross layer: ``x_{l+1} = x0 * (x_l . w) + b + x_l`` with a weight vector ``w``.

    Args:
        in_features: width d of x0 and x_l.
        device: where the weights are created.
    """

    def __init__(self, in_features: int, *, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, device=device))
        self.bias = nn.Parameter(torch.empty(in_features, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-normal ``w`` (taken as a d x 1 matrix) and a zero bias."""
        nn.init.xavier_normal_(self.weight.unsqueeze(1))
        nn.init.zeros_(self.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Returns ``x_{l+1}`` ``[B, d]`` for the input ``x0`` and the previous layer's ``x`` (both ``[B, d]``)."""
        return x0 * (x @ self.weight).unsqueeze(1) + self.bias + x


class DCN(nn.Module):
    """DCN from Wang et al. 2017, "Deep & Cross Network for Ad Click Predictions".

    x0 = [pooled embeddings, dense features] goes through a cross network and, in parallel, a deep
    ReLU network; their outputs, concatenated, go through one Linear to the logit. Tables may have
    different embedding_dims; x0 may hold embeddings alone or dense values alone.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        model = DCN(schema=schema, config=DCNConfig(), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model(torch.randn(2, 3), kjt)  # [2]
    """

    def __init__(self, *, schema: FeatureSchema, config: DCNConfig, device: torch.device) -> None:
        super().__init__()
        check_features(schema, model="dcn")
        self.feature_names = schema.sparse_names
        self.ebc = build_ebc_if_tables(schema, device=device)
        d = embedding_output_dim(schema) + len(schema.dense)
        self.cross = nn.ModuleList(CrossLayer(d, device=device) for _ in range(config.num_cross_layers))
        self.deep = mlp_block(d, config.deep_layer_sizes, config=config.mlp, key="model.mlp", final_activation=True, device=device)
        self.logit = nn.Linear(d + config.deep_layer_sizes[-1], schema.output_width, device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        emb = pooled_embeddings(self.ebc, sparse_features, self.feature_names)
        x0 = torch.cat([*emb, dense_features], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.logit(torch.cat([x, self.deep(x0)], dim=1)).squeeze(-1)


@register("dcn", DCNConfig)
def build_dcn(config: DCNConfig, *, schema: FeatureSchema, device: torch.device) -> DCN:
    """Builds a DCN for ``schema`` on ``device``."""
    return DCN(schema=schema, config=config, device=device)
