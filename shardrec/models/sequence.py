"""Shared parts of the sequence models (DIN, BST, DIEN): which features hold the history and the
target, the EmbeddingCollection over the sequence tables, the pooled context features, padding,
and the activations their MLPs may use.

A sequence model reads one history feature (``sequence: true``) and one target feature over the
same table. A table read by a sequence feature reaches the model unpooled, so the target is looked
up through the same EmbeddingCollection; every other sparse feature is pooled by an
EmbeddingBagCollection as a user/context feature. Both collections are called directly on the
``sparse_features`` KJT (TrainPipelineSparseDist pipelines only such calls) and each reads only
the keys of its own tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema, SparseFeature
from shardrec.errors import ConfigError
from shardrec.models.layers import build_ebc, pooled_by_feature
from shardrec.models.layers.embedding import data_type

SequenceActivation = Literal["dice", "prelu"]
"""The activations DIN and DIEN offer for their MLPs (:class:`shardrec.models.layers.MLP`)."""


@dataclass(frozen=True, kw_only=True)
class SequenceLayout:
    """Where a sequence model's inputs come from in a schema."""

    history: str
    """Key of the history feature (oldest id first)."""
    target: str
    """Key of the target item feature, over the history's table."""
    max_len: int
    """Histories are padded to this length (the history feature's ``max_len``)."""
    dim: int
    """Embedding width of the history's table."""
    context: FeatureSchema | None
    """The pooled user/context features and their tables; None when there are none."""
    num_dense: int
    """Number of dense features."""

    @property
    def context_dim(self) -> int:
        """Width of the pooled context features concatenated."""
        if self.context is None:
            return 0
        return sum(self.context.table(f.table).embedding_dim for f in self.context.sparse)


def sequence_layout(schema: FeatureSchema, *, history: str | None, target: str | None, model: str) -> SequenceLayout:
    """Resolves the history and target features of ``schema`` (defaults: the first sequence feature
    and the first non-sequence feature over its table) and checks what the model can read."""
    seq = [f for f in schema.sparse if f.sequence]
    if not seq:
        raise ConfigError(
            f"model '{model}' needs a history: a sparse feature with 'sequence: true' and 'max_len' under 'features.sparse'"
        )
    hist = _named(schema, history, key="model.history_feature", model=model) if history else seq[0]
    if not hist.sequence:
        raise ConfigError(f"'model.history_feature' names '{hist.name}', which is not a sequence feature; "
                          f"sequence features: {', '.join(f.name for f in seq)}")
    if hist.max_len is None:
        raise ConfigError(f"model '{model}' pads histories to a fixed length; set 'max_len' on features.sparse '{hist.name}'")
    same_table = [f for f in schema.sparse if f.table == hist.table and f is not hist]
    if target:
        tgt = _named(schema, target, key="model.target_feature", model=model)
    elif same_table and not same_table[0].sequence:
        tgt = same_table[0]
    else:
        raise ConfigError(f"model '{model}' needs a target feature over table '{hist.table}' (the history's table); "
                          f"add one to 'features.sparse' or name it in 'model.target_feature'")
    if tgt.table != hist.table or tgt.sequence:
        raise ConfigError(f"'model.target_feature' '{tgt.name}' must be a non-sequence feature over table "
                          f"'{hist.table}' (the history's), not '{tgt.table}'")
    _check_unread(schema, read={hist.name, tgt.name}, model=model)
    return SequenceLayout(
        history=hist.name, target=tgt.name, max_len=hist.max_len, dim=schema.table(hist.table).embedding_dim,
        context=_context_schema(schema), num_dense=len(schema.dense),
    )


def _named(schema: FeatureSchema, name: str, *, key: str, model: str) -> SparseFeature:
    found = [f for f in schema.sparse if f.name == name]
    if not found:
        raise ConfigError(f"'{key}' names '{name}', which model '{model}' cannot find; sparse features: "
                          f"{', '.join(schema.sparse_names)}")
    return found[0]


def _check_unread(schema: FeatureSchema, *, read: set[str], model: str) -> None:
    tables = set(schema.sequence_tables())
    extra = [f.name for f in schema.sparse if f.table in tables and f.name not in read]
    if extra:
        raise ConfigError(f"model '{model}' reads one history and one target; features {', '.join(extra)} on "
                          f"sequence tables would be ignored: remove them from 'features.sparse'")


def _context_schema(schema: FeatureSchema) -> FeatureSchema | None:
    # Weighted features travel in Batch.weighted_features, which models do not receive.
    seq_tables = set(schema.sequence_tables())
    sparse = [f for f in schema.sparse if f.table not in seq_tables and not f.weights]
    if not sparse:
        return None
    used = {f.table for f in sparse}
    return FeatureSchema(sparse=sparse, tables=[t for t in schema.tables if t.name in used])


def build_sequence_ec(schema: FeatureSchema, *, device: torch.device) -> EmbeddingCollection:
    """One EmbeddingConfig per sequence table, holding every feature over it (history and target)."""
    configs = [
        EmbeddingConfig(
            name=name,
            num_embeddings=schema.table(name).num_embeddings,
            embedding_dim=schema.table(name).embedding_dim,
            feature_names=schema.features_of(name),
            data_type=data_type(schema.table(name)),
        )
        for name in schema.sequence_tables()
    ]
    return EmbeddingCollection(tables=configs, device=device)


class SequenceInputs(nn.Module):
    """The embedding lookups of a sequence model.

    Args:
        schema: features and tables.
        layout: the history, target and context features (:func:`sequence_layout`).
        device: where the tables are created.
    """

    def __init__(self, *, schema: FeatureSchema, layout: SequenceLayout, device: torch.device) -> None:
        super().__init__()
        self.layout = layout
        self.ec = build_sequence_ec(schema, device=device)
        self.ebc = build_ebc(layout.context, device=device) if layout.context is not None else None

    def forward(self, sparse_features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(history [B, L, D], mask [B, L] bool, target [B, D], context [B, context_dim])``."""
        lay = self.layout
        seq = self.ec(sparse_features)
        history, mask = padded_sequence(seq[lay.history], lay.max_len)
        target = padded_sequence(seq[lay.target], 1)[0].squeeze(1)
        if self.ebc is None:
            return history, mask, target, history.new_zeros(history.size(0), 0)
        pooled = pooled_by_feature(self.ebc(sparse_features), lay.context.sparse_names)  # type: ignore[union-attr]
        return history, mask, target, torch.cat(pooled, dim=1)


@torch.fx.wrap
def padded_sequence(jt: JaggedTensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads each row's embeddings to ``length``: ``([B, length, D], valid mask [B, length])``."""
    # A leaf for the pipeline's tracer: the padding needs concrete lengths.
    emb = jt.to_padded_dense(desired_length=length, padding_value=0.0)
    mask = torch.arange(length, device=emb.device).unsqueeze(0) < jt.lengths().unsqueeze(1)
    return emb, mask


def check_activation(name: str, *, key: str) -> None:
    """Raises a ConfigError naming ``key`` unless ``name`` is dice or prelu."""
    if name not in ("dice", "prelu"):
        raise ConfigError(f"'{key}' must be 'dice' or 'prelu', got '{name}'")
