"""Shared parts of the generative sequential retrieval models (GRU4Rec, SASRec, HSTU).

Such a model reads one history feature (``sequence: true``, oldest first) and the row's target item
(``item_feature``) over one table, and encodes the history causally: the output at history position
``p`` predicts the item at ``p + 1``, and the output at the last valid position predicts the row's
target. Training scores every valid position (:func:`next_in_sequence` builds the positives), so a
batch yields one (user vector, positive item) pair per history item; serving uses the last valid
position (:func:`last_position`). Item vectors are the rows of the item table itself.

Histories arrive right-padded to the feature's ``max_len`` (:func:`padded_sequence`) with a validity
mask; since padding follows every valid position, a causal encoder never lets it reach a valid one.

This module registers no model, so each of those models may import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers.embedding import data_type
from shardrec.models.layers.jagged import jagged_last, jagged_next, jagged_prefix
from shardrec.models.retrieval import (
    RetrievalLoss,
    RetrievalLossConfig,
    RetrievalModel,
    RetrievalOutput,
    item_table,
    negative_ids,
    negatives_feature,
    resolve_item_feature,
    single,
)
from shardrec.models.sequence import padded_sequence


# torch.fx.wrap patches only the module that names it: the jagged helpers are leaves here too.
for _leaf in ("jagged_last", "jagged_next", "jagged_prefix"):
    torch.fx.wrap(_leaf)

@dataclass(kw_only=True)
class SeqRecConfig:
    """The ``model`` keys every sequential retrieval model shares."""

    item_feature: str | None = None
    """The target item id feature; unset: the non-sequence feature over the history's table."""
    history_feature: str | None = None
    """The history (``sequence: true``) over the item's table; unset: the first such feature."""
    dropout: float = 0.2
    """Dropout rate inside the encoder."""
    loss: RetrievalLossConfig = field(default_factory=lambda: RetrievalLossConfig(kind="sampled", temperature=1.0))
    """Training loss: by default sampled softmax over the batch's shared negatives on raw dot products
    (temperature 1); keys a YAML ``loss`` section leaves out keep these defaults."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"'model.dropout' must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True, kw_only=True)
class SeqRecLayout:
    """Where a sequential retrieval model's inputs come from in a schema."""

    item: str
    """Key of the target item feature."""
    history: str
    """Key of the history feature."""
    negatives: str | None
    """Key of the sampled negatives over the item table, if any."""
    table: str
    """The item table."""
    max_len: int
    """Histories are padded to this length."""
    dim: int
    """Embedding width of the item table."""


def seqrec_layout(schema: FeatureSchema, config: SeqRecConfig, *, model: str) -> SeqRecLayout:
    """Resolves the item, history and negatives features of ``schema`` for ``model``."""
    item = resolve_item_feature(schema, config.item_feature, model=model)
    table = item_table(schema, item, model=model)
    histories = [f for f in schema.sparse if f.sequence and not f.raw and f.table == table]
    if config.history_feature is not None:
        named = [f for f in histories if f.name == config.history_feature]
        if not named:
            raise ConfigError(f"'model.history_feature' names '{config.history_feature}', not a sequence feature over "
                              f"table '{table}' (the item's); candidates: {', '.join(f.name for f in histories) or 'none'}")
        histories = named
    if not histories:
        raise ConfigError(f"model '{model}' needs a history over table '{table}': a sparse feature with 'sequence: true', "
                          f"'max_len' and 'table: {table}' under 'features.sparse'")
    hist = histories[0]
    if hist.max_len is None:
        raise ConfigError(f"model '{model}' pads histories to a fixed length; set 'max_len' on features.sparse '{hist.name}'")
    neg = negatives_feature(schema, item_feature=item, model=model)
    return SeqRecLayout(item=item, history=hist.name, negatives=neg.name if neg is not None else None, table=table,
                        max_len=hist.max_len, dim=schema.table(table).embedding_dim)


def build_item_ec(schema: FeatureSchema, layout: SeqRecLayout, *, device: torch.device) -> EmbeddingCollection:
    """One EmbeddingCollection over the item table for the target, the history and the negatives."""
    names = [n for n in (layout.item, layout.history, layout.negatives) if n is not None]
    table = schema.table(layout.table)
    config = EmbeddingConfig(name=table.name, num_embeddings=table.num_embeddings, embedding_dim=table.embedding_dim,
                             feature_names=names, data_type=data_type(table))
    return EmbeddingCollection(tables=[config], device=device)


@torch.fx.wrap
def padded_ids(jt: JaggedTensor, length: int) -> torch.Tensor:
    """``[B, length]``: each row's values right-padded with 0 (or cut) to ``length``."""
    return jt.to_padded_dense(desired_length=length, padding_value=0)


@torch.fx.wrap
def next_in_sequence(seq: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What each position predicts: ``seq[:, p + 1]``, and ``target`` at each row's last valid position.

    ``seq [B, L, ...]``, ``target [B, ...]``, ``mask [B, L]``; positions past a row's length hold junk.
    """
    shifted = torch.cat([seq[:, 1:], torch.zeros_like(seq[:, :1])], dim=1)
    last = torch.arange(seq.size(1), device=seq.device).unsqueeze(0) == (mask.sum(dim=1, keepdim=True) - 1)
    last = last.view(*last.shape, *([1] * (seq.dim() - 2)))
    return torch.where(last, target.unsqueeze(1), shifted)


@torch.fx.wrap
def last_position(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, D]``: ``x [B, L, D]`` at each row's last valid position (position 0 for an empty row)."""
    index = (mask.sum(dim=1) - 1).clamp(min=0)
    return x[torch.arange(x.size(0), device=x.device), index]


@torch.fx.wrap
def valid_positions(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x [B, L, ...]`` at the valid positions of ``mask [B, L]``, flattened to ``[M, ...]``."""
    return x[mask]


class SequentialRetrievalModel(RetrievalModel):
    """Base of the next-item models: lookups, training pairs and vectors around the encoder.

    Subclasses implement ``encode(history [B, L, D], mask [B, L], sparse_features) -> [B, L, D]``,
    causal over positions, on histories right-padded to ``max_len``. A subclass that sets
    ``jagged = True`` implements ``encode_jagged(values [T, D], lengths [B], sparse_features) ->
    [T, D]`` instead, over the history's tokens without padding (:mod:`shardrec.models.layers.jagged`);
    both paths cut a row to its first ``max_len`` items and give the same vectors and pairs.
    ``normalize`` L2-normalizes user and item vectors.
    """

    jagged: bool = False
    """Whether :meth:`encode_jagged` encodes (instead of :meth:`encode`)."""

    def __init__(self, *, schema: FeatureSchema, layout: SeqRecLayout, loss: RetrievalLossConfig, normalize: bool,
                 device: torch.device) -> None:
        super().__init__()
        self.layout = layout
        self.item_feature = layout.item
        self.negatives = layout.negatives
        self.normalize = normalize
        self.ec = build_item_ec(schema, layout, device=device)
        neg = next((f for f in schema.sparse if f.name == layout.negatives), None)
        self.retrieval_loss = RetrievalLoss(loss, item_rows=schema.table(layout.table).num_embeddings, negatives=neg)

    def encode(self, history: torch.Tensor, mask: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """``[B, L, D]`` output per history position; position ``p`` sees positions ``<= p`` only."""
        raise NotImplementedError

    def encode_jagged(self, values: torch.Tensor, lengths: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """``[T, D]`` output per history token of ``values [T, D]`` (rows of ``lengths [B]``); a
        token sees only its row's tokens up to itself."""
        raise NotImplementedError

    def _vector(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1) if self.normalize else x

    def _encoded(
        self, sparse_features: KeyedJaggedTensor
    ) -> tuple[dict[str, JaggedTensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embeddings by feature, history [B, L, D], mask [B, L], encoded [B, L, D])``."""
        emb = self.ec(sparse_features)
        history, mask = padded_sequence(emb[self.layout.history], self.layout.max_len)
        return emb, history, mask, self.encode(history, mask, sparse_features)

    def _encoded_jagged(
        self, sparse_features: KeyedJaggedTensor
    ) -> tuple[dict[str, JaggedTensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(embeddings by feature, history [T, D], lengths [B], encoded [T, D])``."""
        emb = self.ec(sparse_features)
        jt = emb[self.layout.history]
        values, lengths = jagged_prefix(jt.values(), jt.lengths(), self.layout.max_len)
        return emb, values, lengths, self.encode_jagged(values, lengths, sparse_features)

    def user_vectors(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        if self.jagged:
            _, _, lengths, out = self._encoded_jagged(sparse_features)
            return self._vector(jagged_last(out, lengths))
        _, _, mask, out = self._encoded(sparse_features)
        return self._vector(last_position(out, mask))

    def item_vectors(self, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self._vector(single(self.ec(sparse_features)[self.item_feature]))

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> RetrievalOutput | torch.Tensor:
        """Training: one pair per valid history position (``M`` = total history length); eval: user vectors ``[B, D]``."""
        if self.jagged:
            return self._forward_jagged(sparse_features)
        emb, history, mask, out = self._encoded(sparse_features)
        if not self.training:
            return self._vector(last_position(out, mask))
        lay = self.layout
        target_ids = padded_ids(sparse_features[lay.item], 1).squeeze(1)
        next_ids = next_in_sequence(padded_ids(sparse_features[lay.history], lay.max_len), target_ids, mask)
        next_emb = next_in_sequence(history, single(emb[lay.item]), mask)
        user = self._vector(valid_positions(out, mask))
        item = self._vector(valid_positions(next_emb, mask))
        ids = valid_positions(next_ids, mask)
        return self._output(user, item, ids, emb, sparse_features)

    def _forward_jagged(self, sparse_features: KeyedJaggedTensor) -> RetrievalOutput | torch.Tensor:
        """:meth:`forward` over the jagged history: the same pairs, in the same order."""
        emb, history, lengths, out = self._encoded_jagged(sparse_features)
        if not self.training:
            return self._vector(jagged_last(out, lengths))
        lay = self.layout
        target_ids = padded_ids(sparse_features[lay.item], 1).squeeze(1)
        hist = sparse_features[lay.history]
        ids = jagged_next(jagged_prefix(hist.values(), hist.lengths(), lay.max_len)[0], lengths, target_ids)
        item = self._vector(jagged_next(history, lengths, single(emb[lay.item])))
        return self._output(self._vector(out), item, ids, emb, sparse_features)

    def _output(self, user: torch.Tensor, item: torch.Tensor, ids: torch.Tensor, emb: dict[str, JaggedTensor],
                sparse_features: KeyedJaggedTensor) -> RetrievalOutput:
        neg = self._vector(emb[self.negatives].values()) if self.negatives else item[:0]
        neg_ids = negative_ids(sparse_features, self.negatives, ids)
        return RetrievalOutput((user * item).sum(dim=-1), user, item, ids, neg, neg_ids)
