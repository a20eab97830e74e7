"""DLRM (Naumov et al. 2019): bottom MLP, embedding bags, pairwise dot interaction, top MLP."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import (
    DenseFieldEmbedding,
    MLPConfig,
    build_ebc,
    check_dense_embedding_dim,
    check_features,
    check_layer_sizes,
    field_dim,
    mlp_block,
    pooled_by_feature,
)
from shardrec.models.registry import register


@dataclass(kw_only=True)
class DLRMConfig:
    """The ``model`` section for ``name: dlrm``."""

    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 16])
    """Bottom MLP widths over the dense features; the last must equal the tables' embedding_dim
    (unused when the schema has no dense features)."""
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [64, 32, 1])
    """Top MLP widths over [bottom output, interactions]; the last must be 1 (the logit; a multiclass
    label's num_classes take its place)."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """Activation, dropout, norm of every MLP block of the model (:class:`shardrec.models.layers.MLPConfig`); the blocks' own sections below override it key by key."""
    dense_arch_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The bottom MLP over the dense features (ReLU after every layer by default); unset keys: ``mlp``'s."""
    over_arch_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The top MLP, ending in the logit; unset keys: ``mlp``'s."""
    dense_embedding_dim: int | None = None
    """For a schema without sparse features: each dense feature becomes a field ``v_j * x_j`` of this
    width, interacting with the bottom MLP's output in place of the id embeddings (the bottom MLP
    then ends in this width). Unset with tables: their embedding_dim."""

    def __post_init__(self) -> None:
        check_dense_embedding_dim(self.dense_embedding_dim)
        check_layer_sizes(self.dense_arch_layer_sizes, key="model.dense_arch_layer_sizes")
        check_layer_sizes(self.over_arch_layer_sizes, key="model.over_arch_layer_sizes")
        if self.over_arch_layer_sizes[-1] != 1:
            raise ConfigError(
                f"'model.over_arch_layer_sizes' must end in 1 (one logit), got {self.over_arch_layer_sizes}; "
                "set its last entry to 1"
            )


@torch.fx.wrap
def _strict_upper_triangle(z: torch.Tensor) -> torch.Tensor:
    # fx.wrap keeps this a leaf when the train pipeline traces the model: triu_indices needs a
    # concrete size and device, and a buffer would come back as zeros after meta materialization.
    n = z.size(1)
    # Indexed rather than unpacked: TorchScript (shardrec export) cannot unpack a tensor.
    index = torch.triu_indices(n, n, offset=1, device=z.device)
    return z[:, index[0], index[1]]


def dot_interaction(dense: torch.Tensor | None, sparse: torch.Tensor) -> torch.Tensor:
    """Dot products of every pair among [dense, sparse_1, ..., sparse_F] (without dense: among the
    sparse embeddings alone).

    Args:
        dense: bottom MLP output ``[B, D]``, or None for a schema without dense features.
        sparse: pooled embeddings ``[B, F, D]``.

    Returns:
        ``[B, (F + 1) * F / 2]`` (``[B, F * (F - 1) / 2]`` without dense): <x_i, x_j> for i < j,
        row-major over the strict upper triangle.
    """
    x = sparse if dense is None else torch.cat([dense.unsqueeze(1), sparse], dim=1)
    return _strict_upper_triangle(torch.bmm(x, x.transpose(1, 2)))


class DLRM(nn.Module):
    """DLRM from Naumov et al. 2019, "Deep Learning Recommendation Model for Personalization and
    Recommendation Systems".

    Dense features go through a bottom MLP to the embedding width D; the pairwise dot products of
    [bottom output, each feature's pooled embedding], concatenated with the bottom output, go
    through a top MLP to one logit. Without dense features there is no bottom MLP: the top MLP
    reads the pairwise dot products of the embeddings alone. Without sparse features each dense
    feature is embedded as a field (``model.dense_embedding_dim``) and these fields take the id
    embeddings' place, so the dot products are a factorization machine over the dense features.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        model = DLRM(schema=schema, config=DLRMConfig(), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model(torch.randn(2, 3), kjt)  # [2]
    """

    def __init__(self, *, schema: FeatureSchema, config: DLRMConfig, device: torch.device) -> None:
        super().__init__()
        check_features(schema, model="dlrm")
        dim = field_dim(schema, configured=config.dense_embedding_dim, model="dlrm")
        self.feature_names = schema.sparse_names
        # Dense alone: the dense features, embedded, are the fields the interaction takes.
        self.dense_fields = DenseFieldEmbedding(len(schema.dense), dim, init="normal", device=device) if not schema.sparse else None
        num_f = len(self.feature_names) if schema.sparse else len(schema.dense)
        self.ebc = build_ebc(schema, device=device) if schema.sparse else None
        dense_mlp, over_mlp = config.dense_arch_mlp.over(config.mlp), config.over_arch_mlp.over(config.mlp)
        self.dense_arch: nn.Module | None = None
        if schema.dense:
            _check_dense_arch(config.dense_arch_layer_sizes, dim)
            self.dense_arch = mlp_block(len(schema.dense), config.dense_arch_layer_sizes, config=dense_mlp,
                                        key="model.dense_arch_mlp", final_activation=True, device=device)
            over_in = dim + (num_f + 1) * num_f // 2
        else:
            _check_pairs(num_f)
            over_in = num_f * (num_f - 1) // 2
        self.over_arch = mlp_block(over_in, [*config.over_arch_layer_sizes[:-1], schema.output_width], config=over_mlp,
                                   key="model.over_arch_mlp", logit=True, device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        if self.dense_fields is not None:
            sparse = self.dense_fields(dense_features)
        else:
            sparse = torch.stack(pooled_by_feature(self.ebc(sparse_features), self.feature_names), dim=1)
        if self.dense_arch is None:
            return self.over_arch(dot_interaction(None, sparse)).squeeze(-1)
        dense = self.dense_arch(dense_features)
        interactions = dot_interaction(dense, sparse)
        return self.over_arch(torch.cat([dense, interactions], dim=1)).squeeze(-1)


def _check_pairs(num_sparse: int) -> None:
    if num_sparse < 2:
        raise ConfigError(
            "model 'dlrm' without dense features reads only the dot products of pairs of sparse features, and "
            f"'features.sparse' has {num_sparse}; add a second sparse feature, or a dense feature under 'features.dense'"
        )


def _check_dense_arch(sizes: list[int], dim: int) -> None:
    if sizes[-1] != dim:
        raise ConfigError(
            f"'model.dense_arch_layer_sizes' must end in the fields' width ({dim}: the tables' embedding_dim, or "
            f"'model.dense_embedding_dim' without tables) so the bottom output can be dotted with the fields, got {sizes}; "
            f"set its last entry to {dim}"
        )


@register("dlrm", DLRMConfig)
def build_dlrm(config: DLRMConfig, *, schema: FeatureSchema, device: torch.device) -> DLRM:
    """Builds a DLRM for ``schema`` on ``device``."""
    return DLRM(schema=schema, config=config, device=device)
