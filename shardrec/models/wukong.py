"""WuKong (Zhang et al. 2024): stacked layers of a factorization machine block and a linear compress
block over a set of embeddings, each with a residual and layer norm, then an MLP."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import (
    MLP,
    MLPConfig,
    build_ebc_if_tables,
    check_dense_embedding_dim,
    check_features,
    check_layer_sizes,
    field_dim,
    mlp_block,
    pooled_embeddings,
)
from shardrec.models.registry import register


@dataclass(kw_only=True)
class WuKongConfig:
    """The ``model`` section for ``name: wukong``."""

    num_layers: int = 3
    """Number of stacked Wukong layers (l)."""
    num_emb_lcb: int = 16
    """Embeddings each layer's linear compress block outputs (n_L)."""
    num_emb_fmb: int = 16
    """Embeddings each layer's factorization machine block outputs (n_F)."""
    rank: int = 24
    """Compressed dimension k of the optimized FM: X X^T Y with a learned Y of shape [n, k]."""
    fmb_layer_sizes: list[int] = field(default_factory=lambda: [512, 512])
    """Hidden widths of each FMB's MLP; a layer of width n_F * embedding_dim follows them."""
    dense_layer_sizes: list[int] = field(default_factory=lambda: [512])
    """Hidden widths of the MLP that embeds the dense features; a layer of width embedding_dim
    producing their one embedding follows them."""
    final_layer_sizes: list[int] = field(default_factory=lambda: [512, 512])
    """Hidden widths of the final MLP over the last layer's flattened embeddings; a width-1 logit
    layer follows them."""
    dense_embedding_dim: int | None = None
    """Width d of the embeddings in a schema without tables (dense features alone); unset: the
    tables' embedding_dim."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """Activation, dropout, norm of the dense and final MLPs (:class:`shardrec.models.layers.MLPConfig`; the FMBs' MLPs keep ReLU); ``dense_mlp`` and ``final_mlp`` override it key by key."""
    dense_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The MLP embedding the dense features (its last layer linear by default); unset keys: ``mlp``'s."""
    final_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The final MLP, ending in the logit; unset keys: ``mlp``'s."""

    def __post_init__(self) -> None:
        check_dense_embedding_dim(self.dense_embedding_dim)
        for key in ("num_layers", "num_emb_lcb", "num_emb_fmb", "rank"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"'model.{key}' must be > 0, got {getattr(self, key)}")
        check_layer_sizes(self.fmb_layer_sizes, key="model.fmb_layer_sizes")
        check_layer_sizes(self.dense_layer_sizes, key="model.dense_layer_sizes")
        check_layer_sizes(self.final_layer_sizes, key="model.final_layer_sizes")


class LinearCompressBlock(nn.Module):
    """LCB(X) = W X: a linear map over the embedding-number axis, ``[B, n_in, d] -> [B, n_out, d]``.

    It recombines embeddings without raising the interaction order.

    Args:
        num_in: embeddings in.
        num_out: embeddings out.
        device: where the weights are created.
    """

    def __init__(self, num_in: int, num_out: int, *, device: torch.device) -> None:
        super().__init__()
        self.linear = nn.Linear(num_in, num_out, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``[B, num_out, d]`` for ``x`` ``[B, num_in, d]``."""
        return self.linear(x.transpose(1, 2)).transpose(1, 2)


class FactorizationMachineBlock(nn.Module):
    """FMB(X) = reshape(MLP(LN(flatten(X X^T Y)))): the optimized FM, whose low-rank projection Y
    ``[n_in, k]`` makes it O(n k d) rather than O(n^2 d), then an MLP to ``num_out`` embeddings.

    Args:
        num_in: embeddings in (n).
        num_out: embeddings out (n_F).
        dim: embedding width (d).
        rank: compressed dimension (k).
        layer_sizes: hidden widths of the MLP.
        device: where the weights are created.
    """

    def __init__(
        self, *, num_in: int, num_out: int, dim: int, rank: int, layer_sizes: list[int], device: torch.device
    ) -> None:
        super().__init__()
        self.num_out, self.dim = num_out, dim
        self.projection = nn.Linear(num_in, rank, bias=False, device=device)
        self.norm = nn.LayerNorm(num_in * rank, device=device)
        self.mlp = MLP(num_in * rank, [*layer_sizes, num_out * dim], final_activation=False, device=device)

    def interactions(self, x: torch.Tensor) -> torch.Tensor:
        """The optimized FM X X^T Y ``[B, n, k]``, computed as X (X^T Y)."""
        return torch.bmm(x, self.projection(x.transpose(1, 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``[B, num_out, dim]`` for ``x`` ``[B, num_in, dim]``."""
        return self.mlp(self.norm(self.interactions(x).flatten(1))).unflatten(1, (self.num_out, self.dim))


class WukongLayer(nn.Module):
    """X_{i+1} = LN(concat(FMB(X_i), LCB(X_i)) + X_i), ``[B, n_in, d] -> [B, n_F + n_L, d]``.

    When n_in differs from n_F + n_L the residual goes through its own linear compress block,
    since the paper's identity residual needs equal counts.

    Args:
        num_in: embeddings in.
        dim: embedding width.
        config: the model config (n_F, n_L, k, the FMB's MLP).
        device: where the weights are created.
    """

    def __init__(self, *, num_in: int, dim: int, config: WuKongConfig, device: torch.device) -> None:
        super().__init__()
        self.num_out = config.num_emb_fmb + config.num_emb_lcb
        self.fmb = FactorizationMachineBlock(
            num_in=num_in, num_out=config.num_emb_fmb, dim=dim, rank=config.rank,
            layer_sizes=config.fmb_layer_sizes, device=device,
        )
        self.lcb = LinearCompressBlock(num_in, config.num_emb_lcb, device=device)
        self.residual = (
            nn.Identity() if num_in == self.num_out else LinearCompressBlock(num_in, self.num_out, device=device)
        )
        self.norm = nn.LayerNorm(dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``[B, n_F + n_L, dim]`` for ``x`` ``[B, num_in, dim]``."""
        return self.norm(torch.cat([self.fmb(x), self.lcb(x)], dim=1) + self.residual(x))


class WuKong(nn.Module):
    """WuKong from Zhang et al. 2024, "Wukong: Towards a Scaling Law for Large-Scale
    Recommendation".

    X_0 stacks each sparse feature's pooled embedding and one embedding an MLP makes from the dense
    features (n = num_sparse + 1 embeddings of width d); ``num_layers`` Wukong layers follow, and
    a final MLP maps the last layer's flattened ``[n_F + n_L, d]`` to one logit. All tables must
    share one embedding_dim d (``model.dense_embedding_dim`` without tables). Without dense
    features X_0 is the sparse embeddings alone; without sparse ones, the dense embedding alone.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        model = WuKong(schema=schema, config=WuKongConfig(), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model(torch.randn(2, 3), kjt)  # [2]
    """

    def __init__(self, *, schema: FeatureSchema, config: WuKongConfig, device: torch.device) -> None:
        super().__init__()
        check_features(schema, model="wukong")
        dim = field_dim(schema, configured=config.dense_embedding_dim, model="wukong")
        self.feature_names = schema.sparse_names
        self.ebc = build_ebc_if_tables(schema, device=device)
        self.dense_arch = (
            mlp_block(len(schema.dense), [*config.dense_layer_sizes, dim], config=config.dense_mlp.over(config.mlp),
                      key="model.dense_mlp", device=device)
            if schema.dense else None
        )
        num_in = len(self.feature_names) + (1 if schema.dense else 0)
        self.layers = build_layers(config, num_in=num_in, dim=dim, device=device)
        final_in = self.layers[-1].num_out * dim
        self.final = mlp_block(final_in, [*config.final_layer_sizes, schema.output_width], config=config.final_mlp.over(config.mlp),
                               key="model.final_mlp", logit=True, device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        sparse = pooled_embeddings(self.ebc, sparse_features, self.feature_names)
        dense = [] if self.dense_arch is None else [self.dense_arch(dense_features)]
        x = torch.stack([*dense, *sparse], dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.final(x.flatten(1)).squeeze(-1)


def build_layers(config: WuKongConfig, *, num_in: int, dim: int, device: torch.device) -> nn.ModuleList:
    """The interaction stack: the first layer reads ``num_in`` embeddings, the rest n_F + n_L."""
    layers = []
    for _ in range(config.num_layers):
        layers.append(WukongLayer(num_in=num_in, dim=dim, config=config, device=device))
        num_in = layers[-1].num_out
    return nn.ModuleList(layers)


@register("wukong", WuKongConfig)
def build_wukong(config: WuKongConfig, *, schema: FeatureSchema, device: torch.device) -> WuKong:
    """Builds a WuKong model for ``schema`` on ``device``."""
    return WuKong(schema=schema, config=config, device=device)
