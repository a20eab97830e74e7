"""SASRec (Kang & McAuley 2018): causal self-attention over the item history, trained on every next item."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import PositionEmbedding, TransformerBlock
from shardrec.models.registry import register
from shardrec.models.seqrec import SeqRecConfig, SequentialRetrievalModel, seqrec_layout


@dataclass(kw_only=True)
class SASRecConfig(SeqRecConfig):
    """The ``model`` section for ``name: sasrec``."""

    num_blocks: int = 2
    """Self-attention blocks (the paper's b = 2)."""
    num_heads: int = 1
    """Attention heads (the paper uses one); must divide the item table's embedding_dim."""
    normalize: bool = False
    """L2-normalize user and item vectors (the paper scores raw dot products)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_blocks <= 0 or self.num_heads <= 0:
            raise ConfigError(f"'model.num_blocks' and 'model.num_heads' must be > 0, got {self.num_blocks}, {self.num_heads}")


class SASRec(SequentialRetrievalModel):
    """SASRec from Kang & McAuley 2018, "Self-Attentive Sequential Recommendation".

    The history's item embeddings, scaled by ``sqrt(D)``, plus a learned embedding per position go
    through dropout and ``num_blocks`` pre-norm blocks of causal multi-head self-attention and a
    point-wise feed-forward net (residuals, dropout), then a final LayerNorm. The output at position
    ``p`` is scored against item embeddings of the same table (shared input/output embeddings) and
    trained to predict item ``p + 1``; the last valid position predicts the row's target. Padded
    positions are zeroed after each block and masked as keys.

    Example::

        # features.sparse: item_id (table item), history (table item, sequence: true, max_len: 3),
        #                  neg_item_ids (table item, negatives: {num: 2, of: item_id})
        model = SASRec(schema=schema, config=SASRecConfig(), device=torch.device("cpu"))
        # B = 2; row 0: history [1, 2], next item 7; row 1: history [5], next item 3; negatives [4, 9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["item_id", "history", "neg_item_ids"],
            values=torch.tensor([7, 3, 1, 2, 5, 4, 9]),
            lengths=torch.tensor([1, 1, 2, 1, 2, 0]),
        )
        out = model(torch.empty(2, 0), kjt)  # training: 3 pairs (1->2, 2->7, 5->3), out.user [3, D]
    """

    def __init__(self, *, schema: FeatureSchema, config: SASRecConfig, device: torch.device) -> None:
        layout = seqrec_layout(schema, config, model="sasrec")
        if layout.dim % config.num_heads:
            raise ConfigError(f"'model.num_heads' ({config.num_heads}) must divide the item table's embedding_dim "
                              f"({layout.dim}); pick a divisor of {layout.dim}")
        super().__init__(schema=schema, layout=layout, loss=config.loss, normalize=config.normalize, device=device)
        self.positions = PositionEmbedding(layout.max_len, layout.dim, device=device)
        self.dropout = nn.Dropout(config.dropout)
        # The paper's block with pre-norm residuals and a point-wise Linear-ReLU-Dropout-Linear FFN.
        self.blocks = nn.ModuleList(
            TransformerBlock(layout.dim, config.num_heads, ffn_dim=layout.dim, activation="relu", dropout=config.dropout,
                             attention_dropout=config.dropout, ffn_dropout=config.dropout, causal=True, device=device)
            for _ in range(config.num_blocks)
        )
        self.final_norm = nn.LayerNorm(layout.dim, device=device)

    def encode(self, history: torch.Tensor, mask: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """``[B, L, D]`` causal outputs of ``history [B, L, D]`` under ``mask [B, L]``."""
        keep = mask.unsqueeze(-1).to(history.dtype)
        x = self.dropout(self.positions(history * math.sqrt(history.size(-1)))) * keep
        for block in self.blocks:
            x = block(x, mask) * keep
        return self.final_norm(x)


@register("sasrec", SASRecConfig, retrieval=True)
def build_sasrec(config: SASRecConfig, *, schema: FeatureSchema, device: torch.device) -> SASRec:
    """Builds a SASRec for ``schema`` on ``device``."""
    return SASRec(schema=schema, config=config, device=device)
