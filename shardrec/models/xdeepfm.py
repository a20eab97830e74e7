"""xDeepFM (Lian et al. 2018): a Compressed Interaction Network, a deep MLP and a linear part over
one set of embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import (
    DenseFieldEmbedding,
    FirstOrder,
    MLPConfig,
    build_ebc_if_tables,
    check_dense_embedding_dim,
    check_features,
    check_group_names,
    check_layer_sizes,
    field_dim,
    mlp_block,
    pooled_embeddings,
    resolve_groups,
    select_columns,
    stack_fields,
)
from shardrec.models.registry import register

PARTS = {
    "wide": "the linear part: id weights and a Linear over dense",
    "deep": "the CIN's fields and the deep MLP, which share their embeddings",
}
"""The groups of ``model.feature_groups`` for xDeepFM, and what each feeds."""


@dataclass(kw_only=True)
class XDeepFMConfig:
    """The ``model`` section for ``name: xdeepfm``; defaults are the paper's Criteo setting."""

    cin_layer_sizes: list[int] = field(default_factory=lambda: [200, 200, 200])
    """Number of feature maps H_k of each CIN layer."""
    split_half: bool = False
    """Each CIN layer but the last sends half its maps to the output and half to the next layer."""
    deep_layer_sizes: list[int] = field(default_factory=lambda: [400, 400])
    """Hidden widths of the deep MLP; a final width-1 layer producing its logit is added after them."""
    linear: bool = True
    """Add the linear part: ``<table>_linear`` first-order tables over the ids plus a Linear over dense."""
    dense_embedding_dim: int | None = None
    """Width of an embedded dense field in a schema without tables (dense features alone); unset:
    the tables' embedding_dim."""
    feature_groups: dict[str, list[str]] = field(default_factory=dict)
    """Features each part reads: ``wide`` (the linear part) and ``deep`` (the CIN's fields, its
    sparse features, and the MLP); a part left out reads every feature."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The deep MLP: activation, dropout, norm (:class:`shardrec.models.layers.MLPConfig`)."""

    def __post_init__(self) -> None:
        check_dense_embedding_dim(self.dense_embedding_dim)
        check_group_names(self.feature_groups, parts=PARTS)
        if "wide" in self.feature_groups and not self.linear:
            raise ConfigError("'model.feature_groups.wide' feeds the linear part, which 'model.linear: false' leaves "
                              "out; remove the group or set 'model.linear: true'")
        check_layer_sizes(self.cin_layer_sizes, key="model.cin_layer_sizes")
        check_layer_sizes(self.deep_layer_sizes, key="model.deep_layer_sizes")
        odd = [h for h in self.cin_layer_sizes[:-1] if h % 2]
        if self.split_half and odd:
            raise ConfigError(
                f"'model.cin_layer_sizes' must be even in every layer but the last when 'model.split_half' "
                f"is true (each is split in two halves), got {self.cin_layer_sizes}; make {odd} even"
            )


def cin_layer(x: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One CIN layer (xDeepFM Eq. 6): ``X^k_h = sum_{i,j} W_{h,(i,j)} (X^{k-1}_i * X^0_j)``.

    Args:
        x: the previous layer's maps ``[B, H_{k-1}, D]``.
        x0: the field embeddings ``[B, m, D]``.
        weight: ``[H_k, H_{k-1} * m]``; column ``i * m + j`` weighs the Hadamard product of map i and field j.

    Returns:
        ``[B, H_k, D]``.
    """
    z = torch.einsum("bid,bjd->bijd", x, x0).flatten(1, 2)
    return torch.einsum("hn,bnd->bhd", weight, z)


class CIN(nn.Module):
    """Compressed Interaction Network: stacked :func:`cin_layer` s, each layer's output maps sum-pooled
    over the embedding dimension and concatenated.

    Args:
        num_fields: number of fields m.
        layer_sizes: H_k of each layer.
        split_half: every layer but the last passes half its maps on and sends half to the output.
        device: where the weights are created.
    """

    def __init__(self, num_fields: int, layer_sizes: list[int], *, split_half: bool, device: torch.device) -> None:
        super().__init__()
        last = len(layer_sizes) - 1
        # Maps each layer passes on; it sends as many to the output (all of them without split_half).
        self.widths = [h // 2 if split_half and k < last else h for k, h in enumerate(layer_sizes)]
        inputs = [num_fields, *self.widths[:-1]]
        self.layers = nn.ModuleList(
            nn.Linear(h_in * num_fields, h, bias=False, device=device) for h_in, h in zip(inputs, layer_sizes)
        )
        self.output_dim = sum(self.widths)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Returns ``[B, output_dim]`` for field embeddings ``x0`` ``[B, m, D]``."""
        x = x0
        pooled = []
        for layer, width in zip(self.layers, self.widths):
            z = cin_layer(x, x0, layer.weight)
            x, direct = z[:, :width], z[:, -width:]
            pooled.append(direct.sum(dim=2))
        return torch.cat(pooled, dim=1)


class XDeepFM(nn.Module):
    """xDeepFM from Lian et al. 2018, "xDeepFM: Combining Explicit and Implicit Feature Interactions for
    Recommender Systems".

    logit = linear part (first-order tables over the ids + Linear over dense; optional) + Linear over
    the CIN's pooled maps of the sparse fields' embeddings + deep MLP over [pooled embeddings, dense].
    All tables must share one embedding_dim D. ``feature_groups`` gives the linear part and the
    CIN and MLP (which share embeddings) their own features; a deep group of dense features alone
    gives the CIN one field per dense feature, ``v_j * x_j`` (width ``model.dense_embedding_dim``
    when no table sets it).

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        model = XDeepFM(schema=schema, config=XDeepFMConfig(), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model(torch.randn(2, 3), kjt)  # [2]
    """

    def __init__(self, *, schema: FeatureSchema, config: XDeepFMConfig, device: torch.device) -> None:
        super().__init__()
        check_features(schema, model="xdeepfm")
        groups = resolve_groups(config.feature_groups, schema, parts=list(PARTS), model="xdeepfm")
        deep, wide = groups["deep"].schema, groups["wide"]
        dim = field_dim(deep, configured=config.dense_embedding_dim, model="xdeepfm")
        self.feature_names = deep.sparse_names
        self.dense_columns = groups["deep"].dense_columns
        self.ebc = build_ebc_if_tables(deep, device=device)
        # The CIN's fields are the sparse features, or the embedded dense ones when there are none.
        self.dense_embedding = (
            None if deep.sparse else DenseFieldEmbedding(len(deep.dense), dim, init="normal", device=device)
        )
        num_fields = len(self.feature_names) or len(deep.dense)
        self.cin = CIN(num_fields, config.cin_layer_sizes, split_half=config.split_half, device=device)
        self.cin_logit = nn.Linear(self.cin.output_dim, schema.output_width, device=device)
        deep_in = len(self.feature_names) * dim + len(deep.dense)
        self.deep = mlp_block(deep_in, [*config.deep_layer_sizes, schema.output_width], config=config.mlp, key="model.mlp", logit=True,
                              device=device)
        self.linear = (
            FirstOrder(schema=wide.schema, dense_columns=wide.dense_columns, device=device) if config.linear else None
        )

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        sparse = pooled_embeddings(self.ebc, sparse_features, self.feature_names)
        dense = select_columns(dense_features, self.dense_columns)
        fields = stack_fields(sparse, None if self.dense_embedding is None else self.dense_embedding(dense))
        logit = self.cin_logit(self.cin(fields)) + self.deep(torch.cat([*sparse, dense], dim=1))
        if self.linear is not None:
            logit = logit + self.linear(dense_features, sparse_features)
        return logit.squeeze(-1)


@register("xdeepfm", XDeepFMConfig)
def build_xdeepfm(config: XDeepFMConfig, *, schema: FeatureSchema, device: torch.device) -> XDeepFM:
    """Builds an xDeepFM for ``schema`` on ``device``."""
    return XDeepFM(schema=schema, config=config, device=device)
