"""GRU4Rec (Hidasi et al. 2016): a GRU over the item history, trained on every next item."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.registry import register
from shardrec.models.seqrec import SeqRecConfig, SequentialRetrievalModel, seqrec_layout


@dataclass(kw_only=True)
class GRU4RecConfig(SeqRecConfig):
    """The ``model`` section for ``name: gru4rec``."""

    hidden_size: int = 100
    """Units per GRU layer (the paper's 100)."""
    num_layers: int = 1
    """Stacked GRU layers (the paper found one best)."""
    normalize: bool = False
    """L2-normalize user and item vectors."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size <= 0 or self.num_layers <= 0:
            raise ConfigError(f"'model.hidden_size' and 'model.num_layers' must be > 0, got {self.hidden_size}, {self.num_layers}")


class GRU4Rec(SequentialRetrievalModel):
    """GRU4Rec from Hidasi et al. 2016, "Session-based Recommendations with Recurrent Neural Networks".

    The history's item embeddings, scaled by ``sqrt(D)``, go through dropout, ``num_layers`` GRU
    layers (dropout between them and on the output) and a bias-free linear projection back to the
    embedding width; the output at
    position ``p`` is scored against the item table's embeddings and trained to predict item
    ``p + 1``, the last valid position the row's target. Each history is one session run from an
    empty state (no session-parallel mini-batches); a unidirectional GRU never carries right padding
    into a valid position, so no packing is needed.

    Example::

        # features.sparse: item_id (table item), history (table item, sequence: true, max_len: 3),
        #                  neg_item_ids (table item, negatives: {num: 2, of: item_id})
        model = GRU4Rec(schema=schema, config=GRU4RecConfig(), device=torch.device("cpu"))
        # B = 2; row 0: history [1, 2], next item 7; row 1: history [5], next item 3; negatives [4, 9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["item_id", "history", "neg_item_ids"],
            values=torch.tensor([7, 3, 1, 2, 5, 4, 9]),
            lengths=torch.tensor([1, 1, 2, 1, 2, 0]),
        )
        out = model(torch.empty(2, 0), kjt)  # training: 3 pairs (1->2, 2->7, 5->3), out.user [3, D]
    """

    def __init__(self, *, schema: FeatureSchema, config: GRU4RecConfig, device: torch.device) -> None:
        layout = seqrec_layout(schema, config, model="gru4rec")
        super().__init__(schema=schema, layout=layout, loss=config.loss, normalize=config.normalize, device=device)
        self.dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(layout.dim, config.hidden_size, num_layers=config.num_layers, batch_first=True,
                          dropout=config.dropout if config.num_layers > 1 else 0.0, device=device)
        # No bias: it would add the same vector to every user, a popularity term the GRU must outgrow.
        self.projection = nn.Linear(config.hidden_size, layout.dim, bias=False, device=device)

    def encode(self, history: torch.Tensor, mask: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """``[B, L, D]`` GRU outputs of ``history [B, L, D]`` projected to the embedding width."""
        # Scaled as SASRec does: small-initialized tables would otherwise feed the GRU inputs far
        # below its biases, so that every state starts out alike.
        states, _ = self.gru(self.dropout(history * math.sqrt(history.size(-1))))
        return self.projection(self.dropout(states))


@register("gru4rec", GRU4RecConfig, retrieval=True)
def build_gru4rec(config: GRU4RecConfig, *, schema: FeatureSchema, device: torch.device) -> GRU4Rec:
    """Builds a GRU4Rec for ``schema`` on ``device``."""
    return GRU4Rec(schema=schema, config=config, device=device)
