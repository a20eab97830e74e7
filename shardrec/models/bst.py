"""BST (Chen et al. 2019): a transformer over the behaviour sequence with the target item appended."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import check_layer_sizes
from shardrec.models.registry import register
from shardrec.models.sequence import SequenceInputs, sequence_layout


@dataclass(kw_only=True)
class BSTConfig:
    """The ``model`` section for ``name: bst``."""

    history_feature: str | None = None
    """Sequence feature holding the behaviour history; unset: the first ``sequence: true`` feature."""
    target_feature: str | None = None
    """Candidate item feature over the history's table; unset: the first non-sequence one there."""
    num_layers: int = 1
    """Transformer layers (the paper found 1 best)."""
    num_heads: int = 2
    """Attention heads; must divide the history table's embedding_dim."""
    dropout: float = 0.1
    """Dropout on the attention and feed-forward outputs."""
    mlp_layer_sizes: list[int] = field(default_factory=lambda: [1024, 512, 256])
    """Hidden widths of the final LeakyReLU MLP; a width-1 layer (the logit) follows."""

    def __post_init__(self) -> None:
        check_layer_sizes(self.mlp_layer_sizes, key="model.mlp_layer_sizes")
        if self.num_layers <= 0 or self.num_heads <= 0:
            raise ConfigError(f"'model.num_layers' and 'model.num_heads' must be > 0, got {self.num_layers}, {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"'model.dropout' must be in [0, 1), got {self.dropout}")


class SelfAttention(nn.Module):
    """Multi-head self-attention whose keys skip padded positions.

    Own Linear projections rather than nn.MultiheadAttention, whose packed in-projection has no
    ``reset_parameters`` to re-initialize it after a meta-device build.
    """

    def __init__(self, dim: int, num_heads: int, *, device: torch.device) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, device=device)
        self.out = nn.Linear(dim, dim, device=device)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [B, S, D]``, ``mask [B, S]`` (True: a real position) -> ``[B, S, D]``."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        # Every row keeps its target unmasked, so no softmax row is all -inf.
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return self.out(out.transpose(1, 2).flatten(2))


class TransformerLayer(nn.Module):
    """BST's layer: ``S' = LayerNorm(S + Dropout(MH(S)))``,
    ``F = LayerNorm(S' + Dropout(LeakyReLU(S' W1 + b1) W2 + b2))``."""

    def __init__(self, dim: int, num_heads: int, *, dropout: float, device: torch.device) -> None:
        super().__init__()
        self.attention = SelfAttention(dim, num_heads, device=device)
        self.norm1 = nn.LayerNorm(dim, device=device)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 4 * dim, device=device), nn.LeakyReLU(), nn.Linear(4 * dim, dim, device=device)
        )
        self.norm2 = nn.LayerNorm(dim, device=device)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x [B, S, D]``, ``mask [B, S]`` -> ``[B, S, D]``."""
        x = self.norm1(x + self.dropout(self.attention(x, mask)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class PositionEmbedding(nn.Module):
    """One learned vector per sequence position, added to the item embeddings."""

    def __init__(self, positions: int, dim: int, *, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(positions, dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, S, D]`` -> ``x`` plus the embedding of each position."""
        return x + self.weight.unsqueeze(0)


@torch.fx.wrap
def target_then_recent_first(history: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[target, most recent item, ..., oldest item, padding]`` ``[B, 1 + L, D]`` and its mask.

    Histories come right-padded oldest first; reversing each row's real part makes slot ``k`` the
    item ``k`` steps back from the target in every row, so slots share a meaning across rows.
    """
    lengths = mask.sum(dim=1, keepdim=True)
    steps = torch.arange(1, history.size(1) + 1, device=history.device).unsqueeze(0)
    index = (lengths - steps).clamp(min=0)
    recent = torch.gather(history, 1, index.unsqueeze(-1).expand_as(history))
    seq = torch.cat([target.unsqueeze(1), recent], dim=1)
    return seq, torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)


class BST(nn.Module):
    """BST from Chen et al. 2019, "Behavior Sequence Transformer for E-commerce Recommendation in
    Alibaba".

    The target item and the history, most recent first, plus a learned position embedding, go
    through transformer layers whose attention skips padding; the flattened outputs (padding
    zeroed), the pooled context features and the dense features go through a LeakyReLU MLP.

    Position: the paper embeds the time gap between each behaviour and the recommendation; here
    the position is the sequence index counted back from the target (0: the target, 1: the most
    recent behaviour, ...), as the data carries no timestamps per behaviour.

    Input: one history feature (``sequence: true``, with ``max_len``) and one target feature over the
    same table, both looked up unpooled through an EmbeddingCollection; every other sparse feature is
    pooled through an EmbeddingBagCollection.

    Example::

        # features.sparse: user_id (table user), movie_id (table movie),
        #                  history (table movie, sequence: true, max_len: 3)
        model = BST(schema=schema, config=BSTConfig(), device=torch.device("cpu"))
        # B = 2; row 0: user 4, movie 7, history [1, 2]; row 1: user 1, movie 3, history []
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["user_id", "movie_id", "history"],
            values=torch.tensor([4, 1, 7, 3, 1, 2]),
            lengths=torch.tensor([1, 1, 1, 1, 2, 0]),
        )
        logits = model(torch.empty(2, 0), kjt)  # [2]
    """

    def __init__(self, *, schema: FeatureSchema, config: BSTConfig, device: torch.device) -> None:
        super().__init__()
        layout = sequence_layout(schema, history=config.history_feature, target=config.target_feature, model="bst")
        if layout.dim % config.num_heads:
            raise ConfigError(f"'model.num_heads' ({config.num_heads}) must divide the history table's embedding_dim "
                              f"({layout.dim}); pick a divisor of {layout.dim}")
        self.inputs = SequenceInputs(schema=schema, layout=layout, device=device)
        self.positions = PositionEmbedding(layout.max_len + 1, layout.dim, device=device)
        self.layers = nn.ModuleList(
            TransformerLayer(layout.dim, config.num_heads, dropout=config.dropout, device=device)
            for _ in range(config.num_layers)
        )
        mlp_in = (layout.max_len + 1) * layout.dim + layout.context_dim + layout.num_dense
        widths = [mlp_in, *config.mlp_layer_sizes]
        blocks: list[nn.Module] = []
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Linear(n_in, n_out, device=device), nn.LeakyReLU()]
        self.mlp = nn.Sequential(*blocks, nn.Linear(widths[-1], 1, device=device))

    def encode(self, history: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The transformer outputs flattened, ``[B, (1 + L) * D]``, zero at padded positions."""
        x, seq_mask = target_then_recent_first(history, mask, target)
        x = self.positions(x)
        for layer in self.layers:
            x = layer(x, seq_mask)
        return (x * seq_mask.unsqueeze(-1).to(x.dtype)).flatten(1)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        history, mask, target, context = self.inputs(sparse_features)
        encoded = self.encode(history, mask, target)
        return self.mlp(torch.cat([encoded, context, dense_features], dim=1)).squeeze(-1)


@register("bst", BSTConfig)
def build_bst(config: BSTConfig, *, schema: FeatureSchema, device: torch.device) -> BST:
    """Builds a BST for ``schema`` on ``device``."""
    return BST(schema=schema, config=config, device=device)
