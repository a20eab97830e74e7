"""DeepFM (Guo et al. 2017): first-order weights, a factorization machine and a deep MLP that share
one set of embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.models.layers import (
    DenseFieldEmbedding,
    FirstOrder,
    MLPConfig,
    build_ebc_if_tables,
    check_dense_embedding_dim,
    check_features,
    check_group_names,
    check_layer_sizes,
    embedding_output_dim,
    field_dim,
    field_names,
    group_of,
    mlp_block,
    pooled_embeddings,
    resolve_groups,
    select_columns,
    stack_fields,
)
from shardrec.models.registry import register

PARTS = {
    "wide": "the first-order part: id weights and a Linear over dense",
    "fm": "the factorization machine's fields: id embeddings and embedded dense features",
    "deep": "the MLP over embeddings and dense",
}
"""The groups of ``model.feature_groups`` for DeepFM, and what each feeds."""


@dataclass(kw_only=True)
class DeepFMConfig:
    """The ``model`` section for ``name: deepfm``."""

    deep_layer_sizes: list[int] = field(default_factory=lambda: [128, 64])
    """Hidden widths of the deep MLP; a final width-1 layer producing its logit is added after them."""
    dense_embedding_dim: int | None = None
    """Width of an embedded dense field when no table among the FM fields sets it (e.g. a schema of
    dense features alone); unset: the FM tables' embedding_dim."""
    feature_groups: dict[str, list[str]] = field(default_factory=dict)
    """Features each part reads: ``wide``, ``fm`` (a dense feature listed here is embedded as a
    field) and ``deep``; left out, ``fm`` reads every sparse feature (in a schema of dense features
    alone: every dense one) and the others every feature."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The deep MLP: activation, dropout, norm (:class:`shardrec.models.layers.MLPConfig`)."""

    def __post_init__(self) -> None:
        check_layer_sizes(self.deep_layer_sizes, key="model.deep_layer_sizes")
        check_dense_embedding_dim(self.dense_embedding_dim)
        check_group_names(self.feature_groups, parts=PARTS)


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
    pooled embeddings + deep MLP over [pooled embeddings, dense]. The FM fields' tables must share
    one embedding_dim D. ``feature_groups`` gives each part its own features; a dense feature among
    the FM fields is embedded as ``v_j * x_j``, as the paper does for continuous fields, which is how
    a schema of dense features alone gets its FM fields.

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
        groups = resolve_groups(
            config.feature_groups, schema, parts=list(PARTS), model="deepfm", defaults={"fm": field_names(schema)}
        )
        fm, deep = groups["fm"], groups["deep"]
        dim = field_dim(fm.schema, configured=config.dense_embedding_dim, model="deepfm")
        self.fm_names, self.fm_columns = fm.schema.sparse_names, fm.dense_columns
        self.deep_names, self.deep_columns = deep.schema.sparse_names, deep.dense_columns
        # One lookup serves both parts: the FM and the deep MLP share their features' embeddings.
        looked_up = group_of(schema, self.fm_names + self.deep_names).schema
        self.lookup_names = looked_up.sparse_names
        self.ebc = build_ebc_if_tables(looked_up, device=device)
        self.dense_embedding = (
            DenseFieldEmbedding(len(fm.schema.dense), dim, init="normal", device=device) if fm.schema.dense else None
        )
        wide = groups["wide"]
        self.first_order = FirstOrder(schema=wide.schema, dense_columns=wide.dense_columns, device=device)
        deep_in = embedding_output_dim(deep.schema) + len(deep.schema.dense)
        self.deep = mlp_block(deep_in, [*config.deep_layer_sizes, schema.output_width], config=config.mlp, key="model.mlp", logit=True,
                              device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        emb = dict(zip(self.lookup_names, pooled_embeddings(self.ebc, sparse_features, self.lookup_names)))
        dense_fields = None
        if self.dense_embedding is not None:
            dense_fields = self.dense_embedding(select_columns(dense_features, self.fm_columns))
        fields = stack_fields([emb[n] for n in self.fm_names], dense_fields)
        deep_in = [*(emb[n] for n in self.deep_names), select_columns(dense_features, self.deep_columns)]
        deep = self.deep(torch.cat(deep_in, dim=1))
        return (self.first_order(dense_features, sparse_features) + fm_second_order(fields) + deep).squeeze(-1)


@register("deepfm", DeepFMConfig)
def build_deepfm(config: DeepFMConfig, *, schema: FeatureSchema, device: torch.device) -> DeepFM:
    """Builds a DeepFM for ``schema`` on ``device``."""
    return DeepFM(schema=schema, config=config, device=device)
