"""The first-order (linear) part of wide and FM-style models: one learned weight per id, kept in
EmbeddingBagCollection tables next to the schema's own, plus a Linear over the dense features."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.models.layers.embedding import bag_config, select_columns

LINEAR_SUFFIX = "_linear"
"""Suffix of the first-order tables that wide/linear parts add next to each schema table."""
FIRST_ORDER_DIM = 4
"""Width of a first-order table: FBGEMM's kernels need widths divisible by 4, so each id's scalar
weight is kept as the sum of 4 numbers (the same linear model, slightly over-parameterized)."""


def build_linear_ebc(schema: FeatureSchema, *, device: torch.device) -> EmbeddingBagCollection:
    """First-order weights: one table ``f"{table}_linear"`` of width FIRST_ORDER_DIM per schema table.

    Summed over its width, each pooled output is a feature's (summed or averaged) weight per id:
    the first-order term of a linear model over one-hot ids.
    """
    configs = [bag_config(t, schema, name=f"{t.name}{LINEAR_SUFFIX}", dim=FIRST_ORDER_DIM) for t in schema.tables]
    return EmbeddingBagCollection(tables=configs, device=device)


class FirstOrder(nn.Module):
    """Linear model over the raw features: one learned weight per id plus a Linear over dense.

    A schema without tables has no id weights, one without dense features no Linear (and so no
    bias: the models that hold a FirstOrder add their own).

    Args:
        schema: features and tables; ``ebc`` gets one table ``f"{table}_linear"`` each.
        dense_columns: where ``schema``'s dense features are in the dense tensor (a feature
            group's); None: it holds exactly them.
        device: where the weights are created.
    """

    def __init__(self, *, schema: FeatureSchema, dense_columns: list[int] | None = None, device: torch.device) -> None:
        super().__init__()
        self.dense_columns = dense_columns
        self.ebc = build_linear_ebc(schema, device=device) if schema.tables else None
        self.dense = nn.Linear(len(schema.dense), 1, device=device) if schema.dense else None

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns ``[B, 1]``: the sum of every feature's id weights plus the dense Linear."""
        if self.ebc is None:
            return self.dense(select_columns(dense_features, self.dense_columns))  # type: ignore[misc]
        # Each key's pooled output is one column, so summing all columns needs no per-key split.
        ids = self.ebc(sparse_features).values().sum(dim=1, keepdim=True)
        if self.dense is None:
            return ids
        return ids + self.dense(select_columns(dense_features, self.dense_columns))
