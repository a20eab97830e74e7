"""Embedding blocks: EmbeddingBagCollections built from a schema, the per-feature split of their
output, learned position embeddings and dense features embedded as fields."""

from __future__ import annotations

import math
from typing import Iterator, Literal

import torch
from torch import nn
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from shardrec.data.schema import FeatureSchema, TableConfig

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}


def data_type(table: TableConfig) -> DataType:
    """TorchRec's data type for ``table``'s storage precision (``precision`` / ``features.table_precision``).

    Every embedding config of the zoo takes it, so an fp16 table is fp16 everywhere: on the meta
    device the planner sizes (2 bytes a weight), in the fbgemm kernels the trainer builds, and in
    its checkpoint entries. Lookups still hand the model fp32 vectors (TorchRec's default output
    dtype, and its unsharded modules' ``.float()``).
    """
    return _DATA_TYPES[table.storage]


def table_configs(module: nn.Module) -> Iterator[BaseEmbeddingConfig]:
    """The config of every table of every EmbeddingBagCollection and EmbeddingCollection in ``module``."""
    for m in module.modules():
        if isinstance(m, EmbeddingBagCollection):
            yield from m.embedding_bag_configs()
        elif isinstance(m, EmbeddingCollection):
            yield from m.embedding_configs()


def build_ebc(schema: FeatureSchema, *, device: torch.device) -> EmbeddingBagCollection:
    """One EmbeddingBagConfig per schema table, named, sized and pooled as the table says."""
    configs = [bag_config(t, schema, name=t.name, dim=t.embedding_dim) for t in schema.tables]
    return EmbeddingBagCollection(tables=configs, device=device)


def build_ebc_if_tables(schema: FeatureSchema, *, device: torch.device) -> EmbeddingBagCollection | None:
    """:func:`build_ebc`, or None for a schema without tables: a model of dense features alone holds
    no EmbeddingBagCollection at all (nothing for the planner to place)."""
    return build_ebc(schema, device=device) if schema.tables else None


def bag_config(table: TableConfig, schema: FeatureSchema, *, name: str, dim: int) -> EmbeddingBagConfig:
    """The EmbeddingBagConfig of ``table`` under ``name`` and width ``dim``, over its schema features."""
    return EmbeddingBagConfig(
        name=name,
        num_embeddings=table.num_embeddings,
        embedding_dim=dim,
        feature_names=schema.features_of(table.name),
        pooling=_POOLING[table.pooling],
        data_type=data_type(table),
    )


def pooled_by_feature(pooled: KeyedTensor, names: list[str]) -> list[torch.Tensor]:
    """Splits an EBC output into one ``[B, dim]`` tensor per feature, in the order of ``names``.

    The EBC orders its keys by table, so features sharing a table are grouped; ``names`` puts
    them back into schema order.
    """
    by_name = pooled.to_dict()
    return [by_name[n] for n in names]


def pooled_embeddings(
    ebc: EmbeddingBagCollection | None, sparse_features: KeyedJaggedTensor, names: list[str]
) -> list[torch.Tensor]:
    """``ebc``'s pooled output of each feature in ``names`` (:func:`pooled_by_feature`); an empty
    list when there is no EBC (:func:`build_ebc_if_tables`)."""
    if ebc is None:
        return []
    return pooled_by_feature(ebc(sparse_features), names)


def stack_fields(pooled: list[torch.Tensor], dense_fields: torch.Tensor | None) -> torch.Tensor:
    """``[B, F, D]``: the sparse features' pooled embeddings, then the embedded dense fields
    (``[B, num_dense, D]`` or None); either part may be missing, not both."""
    parts = ([torch.stack(pooled, dim=1)] if pooled else []) + ([dense_fields] if dense_fields is not None else [])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def select_columns(dense_features: torch.Tensor, columns: list[int] | None) -> torch.Tensor:
    """The ``columns`` of ``dense_features`` ``[B, num_dense]`` (a feature group's), or all of them for None."""
    if columns is None:
        return dense_features
    if not columns:
        # A slice, not an index by []: TorchScript (shardrec export) reads an empty list as List[Tensor].
        return dense_features[:, :0]
    return dense_features[:, columns]


def embedding_output_dim(schema: FeatureSchema) -> int:
    """Width of all pooled embeddings concatenated: the sum of each sparse feature's table dim."""
    return sum(schema.table(f.table).embedding_dim for f in schema.sparse)


class PositionEmbedding(nn.Module):
    """One learned vector per sequence position, added to the item embeddings.

    Args:
        positions: sequence length S the input always has.
        dim: embedding width D.
        device: where the weights are created.
    """

    def __init__(self, positions: int, dim: int, *, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(positions, dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, S, D]`` -> ``x`` plus the embedding of each position."""
        return x + self.weight.unsqueeze(0)


DenseInit = Literal["normal", "uniform"]


class DenseFieldEmbedding(nn.Module):
    """Dense features as fields: ``e_j = v_j * x_j``, one learned vector per dense feature.

    Args:
        num_dense: number of dense features.
        dim: the embedding width D shared with the sparse fields.
        init: "normal": N(0, 0.01^2), the AutoInt authors' initialization of every field embedding;
            "uniform": U(-1/sqrt(D), 1/sqrt(D)), MaskNet's.
        device: where the weights are created.
    """

    def __init__(self, num_dense: int, dim: int, *, init: DenseInit, device: torch.device) -> None:
        super().__init__()
        if init not in ("normal", "uniform"):
            raise ValueError(f"DenseFieldEmbedding init must be 'normal' or 'uniform', got '{init}'")
        self.init = init
        self.weight = nn.Parameter(torch.empty(num_dense, dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "normal":
            nn.init.normal_(self.weight, std=0.01)
        else:
            bound = 1.0 / math.sqrt(self.weight.size(1))
            nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, dense_features: torch.Tensor) -> torch.Tensor:
        """Returns ``[B, num_dense, D]`` for ``dense_features`` ``[B, num_dense]``."""
        return dense_features.unsqueeze(-1) * self.weight
