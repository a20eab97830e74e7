"""Building blocks shared by the models: an MLP, EmbeddingBagCollections built from a schema, a
first-order (linear) part, and a helper that splits pooled embeddings per feature.

Everything here is created on the ``device`` it is given, which may be ``torch.device("meta")``
(the sharding planner builds models there), and holds no buffers: DistributedModelParallel
re-creates meta buffers as zeros, so any constant a forward needs is computed in the forward.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from shardrec.data.schema import FeatureSchema, TableConfig
from shardrec.errors import ConfigError

LINEAR_SUFFIX = "_linear"
"""Suffix of the first-order tables that wide/linear parts add next to each schema table."""
FIRST_ORDER_DIM = 4
"""Width of a first-order table: FBGEMM's kernels need widths divisible by 4, so each id's scalar
weight is kept as the sum of 4 numbers (the same linear model, slightly over-parameterized)."""

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


class MLP(nn.Sequential):
    """Stack of Linear layers with ReLU between them.

    Args:
        in_features: width of the input.
        layer_sizes: output width of each Linear layer, in order.
        final_activation: "relu" puts a ReLU after the last layer too; "none" leaves it linear.
        device: where the weights are created.
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: list[int],
        *,
        final_activation: Literal["relu", "none"] = "relu",
        device: torch.device,
    ) -> None:
        layers: list[nn.Module] = []
        widths = [in_features, *layer_sizes]
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(n_in, n_out, device=device))
            if i < len(layer_sizes) - 1 or final_activation == "relu":
                layers.append(nn.ReLU())
        super().__init__(*layers)


def check_layer_sizes(sizes: list[int], *, key: str) -> None:
    """Raises a ConfigError naming ``key`` unless ``sizes`` is a non-empty list of positive ints."""
    if not sizes or any(s <= 0 for s in sizes):
        raise ConfigError(f"'{key}' must be a non-empty list of positive layer widths, got {sizes}")


def check_features(schema: FeatureSchema, *, model: str) -> None:
    """Raises a ConfigError unless ``schema`` has at least one dense and one sparse feature."""
    if not schema.dense:
        raise ConfigError(f"model '{model}' needs at least one dense feature; add one under 'features.dense'")
    if not schema.sparse:
        raise ConfigError(f"model '{model}' needs at least one sparse feature; add one under 'features.sparse'")


def shared_embedding_dim(schema: FeatureSchema, *, model: str) -> int:
    """Returns the embedding_dim every table shares, or raises a ConfigError naming the tables."""
    dims = {t.embedding_dim for t in schema.tables}
    if len(dims) != 1:
        listing = ", ".join(f"{t.name}={t.embedding_dim}" for t in schema.tables)
        raise ConfigError(
            f"model '{model}' needs every table to have the same embedding_dim, but the tables differ "
            f"({listing}); set the same 'embedding_dim' on every table under 'features.tables'"
        )
    return dims.pop()


def build_ebc(schema: FeatureSchema, *, device: torch.device) -> EmbeddingBagCollection:
    """One EmbeddingBagConfig per schema table, named, sized and pooled as the table says."""
    configs = [_bag_config(t, schema, name=t.name, dim=t.embedding_dim) for t in schema.tables]
    return EmbeddingBagCollection(tables=configs, device=device)


def build_linear_ebc(schema: FeatureSchema, *, device: torch.device) -> EmbeddingBagCollection:
    """First-order weights: one table ``f"{table}_linear"`` of width FIRST_ORDER_DIM per schema table.

    Summed over its width, each pooled output is a feature's (summed or averaged) weight per id:
    the first-order term of a linear model over one-hot ids.
    """
    configs = [_bag_config(t, schema, name=f"{t.name}{LINEAR_SUFFIX}", dim=FIRST_ORDER_DIM) for t in schema.tables]
    return EmbeddingBagCollection(tables=configs, device=device)


def _bag_config(table: TableConfig, schema: FeatureSchema, *, name: str, dim: int) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(
        name=name,
        num_embeddings=table.num_embeddings,
        embedding_dim=dim,
        feature_names=schema.features_of(table.name),
        pooling=_POOLING[table.pooling],
    )


def pooled_by_feature(pooled: KeyedTensor, names: list[str]) -> list[torch.Tensor]:
    """Splits an EBC output into one ``[B, dim]`` tensor per feature, in the order of ``names``.

    The EBC orders its keys by table, so features sharing a table are grouped; ``names`` puts
    them back into schema order.
    """
    by_name = pooled.to_dict()
    return [by_name[n] for n in names]


def embedding_output_dim(schema: FeatureSchema) -> int:
    """Width of all pooled embeddings concatenated: the sum of each sparse feature's table dim."""
    return sum(schema.table(f.table).embedding_dim for f in schema.sparse)


class FirstOrder(nn.Module):
    """Linear model over the raw features: one learned weight per id plus a Linear over dense.

    Args:
        schema: features and tables; ``ebc`` gets one table ``f"{table}_linear"`` each.
        device: where the weights are created.
    """

    def __init__(self, *, schema: FeatureSchema, device: torch.device) -> None:
        super().__init__()
        self.ebc = build_linear_ebc(schema, device=device)
        self.dense = nn.Linear(len(schema.dense), 1, device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns ``[B, 1]``: the sum of every feature's id weights plus the dense Linear."""
        # Each key's pooled output is one column, so summing all columns needs no per-key split.
        return self.ebc(sparse_features).values().sum(dim=1, keepdim=True) + self.dense(dense_features)
