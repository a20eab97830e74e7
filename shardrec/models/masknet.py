"""MaskNet (Wang et al. 2021): instance-guided masks multiply the embedding and hidden layers
element-wise; MaskBlocks chained (SerMaskNet) or side by side (ParaMaskNet)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import (
    DenseFieldEmbedding,
    MLPConfig,
    build_ebc_if_tables,
    check_dense_embedding_dim,
    check_features,
    check_layer_sizes,
    field_dim,
    mlp_block,
    pooled_embeddings,
    stack_fields,
)
from shardrec.models.registry import register


@dataclass(kw_only=True)
class MaskNetConfig:
    """The ``model`` section for ``name: masknet``."""

    structure: Literal["serial", "parallel"] = "parallel"
    """serial: SerMaskNet, each MaskBlock masks the previous one's output; parallel: ParaMaskNet,
    every MaskBlock masks the embeddings and an MLP merges their concatenated outputs."""
    num_blocks: int = 3
    """Number of MaskBlocks."""
    block_dim: int = 400
    """Width of each MaskBlock's feed-forward layer (the paper's 400-wide hidden layers)."""
    reduction_ratio: float = 2.0
    """Width of a mask's aggregation layer over the width of what it masks (the paper's r = 2)."""
    mlp_layer_sizes: list[int] = field(default_factory=lambda: [400, 400])
    """parallel only: widths of the MLP over the concatenated block outputs; a width-1 logit
    layer follows. Serial MaskNet feeds its last block straight to the logit layer."""
    dense_embedding_dim: int | None = None
    """Width of an embedded dense field in a schema without tables (dense features alone); unset:
    the tables' embedding_dim."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """parallel only: the MLP over the block outputs: activation, dropout, norm (:class:`shardrec.models.layers.MLPConfig`)."""

    def __post_init__(self) -> None:
        check_dense_embedding_dim(self.dense_embedding_dim)
        if self.num_blocks <= 0:
            raise ConfigError(f"'model.num_blocks' must be > 0, got {self.num_blocks}")
        if self.block_dim <= 0:
            raise ConfigError(f"'model.block_dim' must be > 0, got {self.block_dim}")
        if self.reduction_ratio <= 0:
            raise ConfigError(f"'model.reduction_ratio' must be > 0, got {self.reduction_ratio}")
        check_layer_sizes(self.mlp_layer_sizes, key="model.mlp_layer_sizes")


class InstanceGuidedMask(nn.Module):
    """V_mask = W2 ReLU(W1 V_emb + b1) + b2: an aggregation layer, then a projection layer to the
    width of what the mask multiplies.

    Args:
        emb_width: width of V_emb, the concatenated embeddings of the instance.
        out_width: width of the masked input (embeddings or the previous MaskBlock's output).
        reduction_ratio: aggregation width over ``out_width``.
        device: where the weights are created.
    """

    def __init__(self, *, emb_width: int, out_width: int, reduction_ratio: float, device: torch.device) -> None:
        super().__init__()
        agg_width = max(1, round(out_width * reduction_ratio))
        self.aggregation = nn.Linear(emb_width, agg_width, device=device)
        self.projection = nn.Linear(agg_width, out_width, device=device)

    def forward(self, v_emb: torch.Tensor) -> torch.Tensor:
        """Returns the mask ``[B, out_width]`` for V_emb ``[B, emb_width]``."""
        return self.projection(torch.relu(self.aggregation(v_emb)))


class MaskBlock(nn.Module):
    """ReLU(LN(W (V_mask ⊙ x))): an instance-guided mask on ``x``, then a feed-forward layer with
    layer norm. ``x`` is the layer-normed embeddings (MaskBlock on feature embedding) or the
    previous block's output (MaskBlock on MaskBlock).

    Args:
        emb_width: width of V_emb, from which the mask is computed.
        in_width: width of ``x``.
        out_width: width of the feed-forward layer.
        reduction_ratio: the mask's aggregation width over ``in_width``.
        device: where the weights are created.
    """

    def __init__(
        self, *, emb_width: int, in_width: int, out_width: int, reduction_ratio: float, device: torch.device
    ) -> None:
        super().__init__()
        self.mask = InstanceGuidedMask(
            emb_width=emb_width, out_width=in_width, reduction_ratio=reduction_ratio, device=device
        )
        # No bias: the layer norm right after adds its own.
        self.linear = nn.Linear(in_width, out_width, bias=False, device=device)
        self.norm = nn.LayerNorm(out_width, device=device)

    def forward(self, x: torch.Tensor, v_emb: torch.Tensor) -> torch.Tensor:
        """Returns ``[B, out_width]`` for ``x`` ``[B, in_width]`` and V_emb ``[B, emb_width]``."""
        return torch.relu(self.norm(self.linear(self.mask(v_emb) * x)))


class MaskNet(nn.Module):
    """MaskNet from Wang et al. 2021, "MaskNet: Introducing Feature-Wise Multiplication to CTR
    Ranking Models by Instance-Guided Mask".

    Fields are the sparse features' pooled embeddings and one embedding per dense feature
    (v_j * x_j); V_emb is their concatenation. LN-EMB layer-norms each field's embedding. Serial
    (SerMaskNet): block 1 masks LN-EMB(V_emb), block i masks block i-1's output, the last block
    feeds the logit layer. Parallel (ParaMaskNet): every block masks LN-EMB(V_emb), and an MLP
    over their concatenated outputs feeds the logit layer. Every mask is computed from V_emb.
    All tables must share one embedding_dim (``model.dense_embedding_dim`` without tables); either
    kind of field may be missing from the schema.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        model = MaskNet(schema=schema, config=MaskNetConfig(), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model(torch.randn(2, 3), kjt)  # [2]
    """

    def __init__(self, *, schema: FeatureSchema, config: MaskNetConfig, device: torch.device) -> None:
        super().__init__()
        check_features(schema, model="masknet")
        dim = field_dim(schema, configured=config.dense_embedding_dim, model="masknet")
        self.feature_names = schema.sparse_names
        self.parallel = config.structure == "parallel"
        self.ebc = build_ebc_if_tables(schema, device=device)
        self.dense_embedding = (
            DenseFieldEmbedding(len(schema.dense), dim, init="uniform", device=device) if schema.dense else None
        )
        self.emb_norm = nn.LayerNorm(dim, device=device)
        emb_width = (len(self.feature_names) + len(schema.dense)) * dim
        self.blocks = build_blocks(config, emb_width=emb_width, device=device)
        self.head = build_head(config, outputs=schema.output_width, device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        dense = None if self.dense_embedding is None else self.dense_embedding(dense_features)
        fields = stack_fields(pooled_embeddings(self.ebc, sparse_features, self.feature_names), dense)
        v_emb = fields.flatten(1)
        ln_emb = self.emb_norm(fields).flatten(1)
        if self.parallel:
            hidden = torch.cat([block(ln_emb, v_emb) for block in self.blocks], dim=1)
        else:
            hidden = ln_emb
            for block in self.blocks:
                hidden = block(hidden, v_emb)
        return self.head(hidden).squeeze(-1)


def build_blocks(config: MaskNetConfig, *, emb_width: int, device: torch.device) -> nn.ModuleList:
    """The MaskBlocks: each reads LN-EMB(V_emb) (parallel) or the previous block (serial)."""
    blocks = []
    in_width = emb_width
    for _ in range(config.num_blocks):
        blocks.append(
            MaskBlock(
                emb_width=emb_width, in_width=in_width, out_width=config.block_dim,
                reduction_ratio=config.reduction_ratio, device=device,
            )
        )
        if config.structure == "serial":
            in_width = config.block_dim
    return nn.ModuleList(blocks)


def build_head(config: MaskNetConfig, *, outputs: int, device: torch.device) -> nn.Module:
    """Serial: a Linear from the last block to the logit; parallel: an MLP over all blocks, then it."""
    if config.structure == "serial":
        return nn.Linear(config.block_dim, outputs, device=device)
    width = config.num_blocks * config.block_dim
    return mlp_block(width, [*config.mlp_layer_sizes, outputs], config=config.mlp, key="model.mlp", logit=True, device=device)


@register("masknet", MaskNetConfig)
def build_masknet(config: MaskNetConfig, *, schema: FeatureSchema, device: torch.device) -> MaskNet:
    """Builds a MaskNet for ``schema`` on ``device``."""
    return MaskNet(schema=schema, config=config, device=device)
