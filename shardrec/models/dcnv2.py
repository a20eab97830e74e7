"""DCN-V2 (Wang et al. 2021): matrix cross layers, optionally a mixture of low-rank experts, stacked
with or parallel to a deep MLP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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

Structure = Literal["stacked", "parallel"]
Gating = Literal["softmax", "sigmoid", "constant"]
ExpertActivation = Literal["tanh", "hardtanh", "relu", "identity"]

_ACTIVATIONS = {"tanh": torch.tanh, "hardtanh": nn.functional.hardtanh, "relu": torch.relu}


@dataclass(kw_only=True)
class DCNv2Config:
    """The ``model`` section for ``name: dcnv2``; defaults are the paper's best Criteo DCN-V2 (Table 6).

    The paper's best DCN-Mix on Criteo had 3 cross layers of 4 experts with a total rank of 258
    (``low_rank`` about 64), a constant gate and hardtanh, before a deep network of ``[512, 512]``.
    """

    num_cross_layers: int = 2
    """Number of cross layers; l layers model feature crosses up to degree l + 1."""
    deep_layer_sizes: list[int] = field(default_factory=lambda: [768, 768])
    """Widths of the ReLU layers of the deep network."""
    structure: Structure = "stacked"
    """stacked: cross network, then the deep network on its output; parallel: both on x0, outputs concatenated."""
    low_rank: int | None = None
    """Rank r of each expert's U, V (d x r): a mixture of low-rank cross layers; unset: full-rank d x d W."""
    num_experts: int = 1
    """Low-rank experts per cross layer (needs ``low_rank``)."""
    gating: Gating = "softmax"
    """With ``low_rank``: expert weights, softmax or sigmoid of a linear gate on x_l, or constant 1 (a plain sum)."""
    expert_activation: ExpertActivation = "tanh"
    """With ``low_rank``: g in an expert's U g(C g(V^T x_l)); identity drops C and g, leaving U (V^T x_l)."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The deep network: activation, dropout, norm, final_activation (default true: its output feeds the logit layer) (:class:`shardrec.models.layers.MLPConfig`)."""

    def __post_init__(self) -> None:
        if self.num_cross_layers < 1:
            raise ConfigError(f"'model.num_cross_layers' must be >= 1, got {self.num_cross_layers}")
        check_layer_sizes(self.deep_layer_sizes, key="model.deep_layer_sizes")
        if self.low_rank is not None and self.low_rank < 1:
            raise ConfigError(f"'model.low_rank' must be >= 1 (or unset for full-rank cross layers), got {self.low_rank}")
        if self.num_experts < 1:
            raise ConfigError(f"'model.num_experts' must be >= 1, got {self.num_experts}")
        if self.num_experts > 1 and self.low_rank is None:
            raise ConfigError(
                f"'model.num_experts' is {self.num_experts}, but experts are low-rank cross layers; "
                "set 'model.low_rank' (e.g. 64) or set 'model.num_experts' to 1"
            )


class MatrixCrossLayer(nn.Module):
    """Full-rank DCN-V2 cross layer: ``x_{l+1} = x0 * (W x_l + b) + x_l``.

    Args:
        in_features: width d of x0 and x_l.
        device: where the weights are created.
    """

    def __init__(self, in_features: int, *, device: torch.device) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, in_features, device=device)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Returns ``x_{l+1}`` ``[B, d]`` for the input ``x0`` and the previous layer's ``x`` (both ``[B, d]``)."""
        return x0 * self.linear(x) + x


class LowRankMixtureCrossLayer(nn.Module):
    """Mixture of low-rank cross layer (DCN-V2 Eq. 3-4).

    ``x_{l+1} = sum_i G_i(x_l) E_i(x_l) + x_l`` with ``E_i(x_l) = x0 * (U_i g(C_i g(V_i^T x_l)) + b)``;
    U_i, V_i are d x r, C_i is r x r and the bias b is shared by the experts.

    Args:
        in_features: width d of x0 and x_l.
        rank: r.
        num_experts: number of experts K.
        gating: how G weights the experts (see :class:`DCNv2Config`).
        activation: g; "identity" leaves out C and g.
        device: where the weights are created.
    """

    def __init__(
        self,
        in_features: int,
        *,
        rank: int,
        num_experts: int,
        gating: Gating,
        activation: ExpertActivation,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.empty(num_experts, in_features, rank, device=device))
        self.v = nn.Parameter(torch.empty(num_experts, in_features, rank, device=device))
        self.c = nn.Parameter(torch.empty(num_experts, rank, rank, device=device)) if activation != "identity" else None
        self.bias = nn.Parameter(torch.empty(in_features, device=device))
        self.activation = _ACTIVATIONS.get(activation)
        self.softmax_gate = gating == "softmax"
        # A softmax over one expert is always 1: its gate would never get a gradient.
        needs_gate = gating == "sigmoid" or (gating == "softmax" and num_experts > 1)
        self.gate = nn.Linear(in_features, num_experts, bias=False, device=device) if needs_gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-normal U_i, V_i, C_i per expert and a zero bias (the gate is an nn.Linear)."""
        for kernel in [self.u, self.v] + ([self.c] if self.c is not None else []):
            for expert in kernel:
                nn.init.xavier_normal_(expert)
        nn.init.zeros_(self.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Returns ``x_{l+1}`` ``[B, d]`` for the input ``x0`` and the previous layer's ``x`` (both ``[B, d]``)."""
        h = torch.einsum("bd,kdr->bkr", x, self.v)
        if self.c is not None:
            h = self.activation(torch.einsum("krs,bks->bkr", self.c, self.activation(h)))
        experts = x0.unsqueeze(1) * (torch.einsum("kdr,bkr->bkd", self.u, h) + self.bias)
        return self.mix(experts, x) + x

    def mix(self, experts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Sums the experts ``[B, K, d]`` weighted by the gate on ``x`` ``[B, d]`` (or unweighted)."""
        if self.gate is None:
            return experts.sum(dim=1)
        scores = self.gate(x)
        weights = scores.softmax(dim=1) if self.softmax_gate else scores.sigmoid()
        return torch.einsum("bk,bkd->bd", weights, experts)


def build_cross_layer(in_features: int, config: DCNv2Config, *, device: torch.device) -> nn.Module:
    """A full-rank cross layer, or a mixture of low-rank experts when ``config.low_rank`` is set."""
    if config.low_rank is None:
        return MatrixCrossLayer(in_features, device=device)
    return LowRankMixtureCrossLayer(
        in_features, rank=config.low_rank, num_experts=config.num_experts, gating=config.gating,
        activation=config.expert_activation, device=device,
    )


class DCNv2(nn.Module):
    """DCN-V2 from Wang et al. 2021, "DCN V2: Improved Deep & Cross Network and Practical Lessons for
    Web-scale Learning to Rank Systems".

    x0 = [pooled embeddings, dense features]. Stacked: x0 -> cross network -> deep network -> Linear
    to the logit. Parallel: [cross network(x0), deep network(x0)] -> Linear to the logit. Tables may
    have different embedding_dims; x0 may hold embeddings alone or dense values alone.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        model = DCNv2(schema=schema, config=DCNv2Config(low_rank=8, num_experts=4), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model(torch.randn(2, 3), kjt)  # [2]
    """

    def __init__(self, *, schema: FeatureSchema, config: DCNv2Config, device: torch.device) -> None:
        super().__init__()
        check_features(schema, model="dcnv2")
        self.feature_names = schema.sparse_names
        self.parallel = config.structure == "parallel"
        self.ebc = build_ebc_if_tables(schema, device=device)
        d = embedding_output_dim(schema) + len(schema.dense)
        self.cross = nn.ModuleList(build_cross_layer(d, config, device=device) for _ in range(config.num_cross_layers))
        self.deep = mlp_block(d, config.deep_layer_sizes, config=config.mlp, key="model.mlp", final_activation=True, device=device)
        logit_in = config.deep_layer_sizes[-1] + (d if self.parallel else 0)
        self.logit = nn.Linear(logit_in, schema.output_width, device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        emb = pooled_embeddings(self.ebc, sparse_features, self.feature_names)
        x0 = torch.cat([*emb, dense_features], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        final = torch.cat([x, self.deep(x0)], dim=1) if self.parallel else self.deep(x)
        return self.logit(final).squeeze(-1)


@register("dcnv2", DCNv2Config)
def build_dcnv2(config: DCNv2Config, *, schema: FeatureSchema, device: torch.device) -> DCNv2:
    """Builds a DCN-V2 for ``schema`` on ``device``."""
    return DCNv2(schema=schema, config=config, device=device)
