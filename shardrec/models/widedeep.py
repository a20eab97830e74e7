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
    build_ebc_if_tables,
    check_features,
    check_group_names,
    check_layer_sizes,
    embedding_output_dim,
    mlp_block,
    pooled_embeddings,
    resolve_groups,
    select_columns,
)
from shardrec.models.registry import register

PARTS = {"wide": "the linear part: id weights and a Linear over dense", "deep": "the MLP over embeddings and dense"}
"""The groups of ``model.feature_groups`` for Wide & Deep, and what each feeds."""


@dataclass(kw_only=True)
class WideDeepConfig:
    """The ``model`` section for ``name: widedeep``."""

    deep_layer_sizes: list[int] = field(default_factory=lambda: [128, 64])
    """Hidden widths of the deep MLP; a final width-1 layer producing its logit is added after them."""
    feature_groups: dict[str, list[str]] = field(default_factory=dict)
    """Features each part reads: ``wide`` (e.g. ids and crossed ids, features.sparse entries with
    ``cross``) and ``deep`` (e.g. ids and dense values); a part left out reads every feature."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The deep MLP: activation, dropout, norm (:class:`shardrec.models.layers.MLPConfig`)."""

    def __post_init__(self) -> None:
        check_layer_sizes(self.deep_layer_sizes, key="model.deep_layer_sizes")
        check_group_names(self.feature_groups, parts=PARTS)


class WideDeep(nn.Module):
    """Wide & Deep from Cheng et al. 2016, "Wide & Deep Learning for Recommender Systems".

    logit = wide (first-order tables over the ids + Linear over dense) + deep MLP over [pooled
    embeddings, dense]. Tables may have different embedding_dims. ``feature_groups`` gives each part
    its own features (the paper's wide part reads ids and their crosses, its deep part embeddings
    and continuous values); a schema without dense (or without sparse) features leaves that input
    out of both parts.

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
        groups = resolve_groups(config.feature_groups, schema, parts=list(PARTS), model="widedeep")
        wide, deep = groups["wide"], groups["deep"]
        self.feature_names = deep.schema.sparse_names
        self.dense_columns = deep.dense_columns
        self.ebc = build_ebc_if_tables(deep.schema, device=device)
        self.wide = FirstOrder(schema=wide.schema, dense_columns=wide.dense_columns, device=device)
        deep_in = embedding_output_dim(deep.schema) + len(deep.schema.dense)
        self.deep = mlp_block(deep_in, [*config.deep_layer_sizes, schema.output_width], config=config.mlp, key="model.mlp", logit=True,
                              device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        emb = pooled_embeddings(self.ebc, sparse_features, self.feature_names)
        deep = self.deep(torch.cat([*emb, select_columns(dense_features, self.dense_columns)], dim=1))
        return (self.wide(dense_features, sparse_features) + deep).squeeze(-1)


@register("widedeep", WideDeepConfig)
def build_widedeep(config: WideDeepConfig, *, schema: FeatureSchema, device: torch.device) -> WideDeep:
    """Builds a Wide & Deep model for ``schema`` on ``device``."""
    return WideDeep(schema=schema, config=config, device=device)
