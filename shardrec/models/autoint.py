"""AutoInt (Song et al. 2019): multi-head self-attention over the sparse and dense fields' embeddings,
with residual connections; AutoInt+ adds a deep MLP."""

from __future__ import annotations

from dataclasses import dataclass, field

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
class AutoIntConfig:
    """The ``model`` section for ``name: autoint``; defaults are the paper's (Section 5.1.4)."""

    num_attention_layers: int = 3
    """Number of interacting layers."""
    num_heads: int = 2
    """Attention heads per interacting layer."""
    attention_dim: int = 32
    """d': width of each head's queries, keys and values; a layer outputs num_heads * d' per field."""
    residual: bool = True
    """Add the residual projection W_res e_m inside each interacting layer's ReLU."""
    deep_layer_sizes: list[int] | None = None
    """Hidden widths of a deep MLP over the field embeddings whose logit is added (AutoInt+, e.g. [400, 400])."""
    dense_embedding_dim: int | None = None
    """Width of an embedded dense field in a schema without tables (dense features alone); unset:
    the tables' embedding_dim."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The deep MLP of AutoInt+ (with ``deep_layer_sizes``): activation, dropout, norm (:class:`shardrec.models.layers.MLPConfig`)."""

    def __post_init__(self) -> None:
        check_dense_embedding_dim(self.dense_embedding_dim)
        for key in ("num_attention_layers", "num_heads", "attention_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'model.{key}' must be >= 1, got {getattr(self, key)}")
        if self.deep_layer_sizes is not None:
            check_layer_sizes(self.deep_layer_sizes, key="model.deep_layer_sizes")


class InteractingLayer(nn.Module):
    """One interacting layer (AutoInt Eq. 5-8): multi-head self-attention across the fields, scored by
    the plain inner product <W_Q e_m, W_K e_k>, then ``ReLU(concat of heads + W_res e_m)``.

    Args:
        in_features: width of each field's input.
        num_heads: number of heads H.
        head_dim: d'.
        residual: add the residual projection W_res.
        device: where the weights are created.
    """

    def __init__(self, in_features: int, *, num_heads: int, head_dim: int, residual: bool, device: torch.device) -> None:
        super().__init__()
        out = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.query = nn.Linear(in_features, out, bias=False, device=device)
        self.key = nn.Linear(in_features, out, bias=False, device=device)
        self.value = nn.Linear(in_features, out, bias=False, device=device)
        self.residual = nn.Linear(in_features, out, bias=False, device=device) if residual else None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, M, H * d']`` -> ``[B, H, M, d']``."""
        return x.unflatten(2, (self.num_heads, self.head_dim)).transpose(1, 2)

    def attention(self, e: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B, H, M, M]`` for fields ``e`` ``[B, M, in_features]``; each row sums to 1."""
        q, k = self.split_heads(self.query(e)), self.split_heads(self.key(e))
        return (q @ k.transpose(2, 3)).softmax(dim=-1)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """Returns ``[B, M, H * d']`` for fields ``e`` ``[B, M, in_features]``."""
        attended = (self.attention(e) @ self.split_heads(self.value(e))).transpose(1, 2).flatten(2)
        if self.residual is not None:
            attended = attended + self.residual(e)
        return torch.relu(attended)


class AutoInt(nn.Module):
    """AutoInt from Song et al. 2019, "AutoInt: Automatic Feature Interaction Learning via Self-Attentive
    Neural Networks".

    The fields are each sparse feature's pooled embedding and each dense feature times its own
    learned vector; they go through the interacting layers, and one Linear over all fields' outputs
    gives the logit (plus a deep MLP's logit over the field embeddings for AutoInt+). All tables must
    share one embedding_dim D (``model.dense_embedding_dim`` without tables); the paper averages
    multi-hot bags (``pooling: mean``). Either kind of field may be missing from the schema.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        model = AutoInt(schema=schema, config=AutoIntConfig(), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model(torch.randn(2, 3), kjt)  # [2]
    """

    def __init__(self, *, schema: FeatureSchema, config: AutoIntConfig, device: torch.device) -> None:
        super().__init__()
        check_features(schema, model="autoint")
        dim = field_dim(schema, configured=config.dense_embedding_dim, model="autoint")
        self.feature_names = schema.sparse_names
        num_fields = len(self.feature_names) + len(schema.dense)
        self.ebc = build_ebc_if_tables(schema, device=device)
        self.dense_embedding = (
            DenseFieldEmbedding(len(schema.dense), dim, init="normal", device=device) if schema.dense else None
        )
        out = config.num_heads * config.attention_dim
        widths = [dim] + [out] * (config.num_attention_layers - 1)
        self.interacting = nn.ModuleList(
            InteractingLayer(
                w, num_heads=config.num_heads, head_dim=config.attention_dim, residual=config.residual, device=device
            )
            for w in widths
        )
        self.logit = nn.Linear(num_fields * out, schema.output_width, device=device)
        deep = config.deep_layer_sizes
        self.deep = (mlp_block(num_fields * dim, [*deep, schema.output_width], config=config.mlp, key="model.mlp", logit=True,
                               device=device) if deep else None)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        dense = None if self.dense_embedding is None else self.dense_embedding(dense_features)
        e = stack_fields(pooled_embeddings(self.ebc, sparse_features, self.feature_names), dense)
        x = e
        for layer in self.interacting:
            x = layer(x)
        logit = self.logit(x.flatten(1))
        if self.deep is not None:
            logit = logit + self.deep(e.flatten(1))
        return logit.squeeze(-1)


@register("autoint", AutoIntConfig)
def build_autoint(config: AutoIntConfig, *, schema: FeatureSchema, device: torch.device) -> AutoInt:
    """Builds an AutoInt (AutoInt+ with ``deep_layer_sizes``) for ``schema`` on ``device``."""
    return AutoInt(schema=schema, config=config, device=device)
