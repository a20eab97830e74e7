"""BST (Chen et al. 2019): a transformer over the behaviour sequence with the target item appended."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import MLPConfig, PositionEmbedding, TransformerBlock, check_layer_sizes, mlp_block
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
    norm_first: bool = False
    """Pre-norm layers (``x + Attn(LN(x))``); False: the paper's post-norm (``LN(x + Attn(x))``)."""
    target_in_mlp: bool = False
    """Also feed the target item's own embedding to the MLP, beside the transformer outputs."""
    mlp_layer_sizes: list[int] = field(default_factory=lambda: [1024, 512, 256])
    """Hidden widths of the final LeakyReLU MLP; a width-1 layer (the logit) follows."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The final MLP: activation (default leaky_relu), dropout, norm (:class:`shardrec.models.layers.MLPConfig`); ``dropout`` above is the transformer's."""

    def __post_init__(self) -> None:
        check_layer_sizes(self.mlp_layer_sizes, key="model.mlp_layer_sizes")
        if self.num_layers <= 0 or self.num_heads <= 0:
            raise ConfigError(f"'model.num_layers' and 'model.num_heads' must be > 0, got {self.num_layers}, {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"'model.dropout' must be in [0, 1), got {self.dropout}")


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
        # BST's layer: S' = LayerNorm(S + Dropout(MH(S))), F = LayerNorm(S' + Dropout(FFN(S'))), with a
        # LeakyReLU FFN 4x wide; attention skips padded keys (every row keeps its target).
        self.layers = nn.ModuleList(
            TransformerBlock(layout.dim, config.num_heads, ffn_dim=4 * layout.dim, activation="leaky_relu",
                             dropout=config.dropout, norm_first=config.norm_first, device=device)
            for _ in range(config.num_layers)
        )
        self.target_in_mlp = config.target_in_mlp
        mlp_in = (layout.max_len + 1 + int(config.target_in_mlp)) * layout.dim + layout.context_dim + layout.num_dense
        self.mlp = mlp_block(mlp_in, [*config.mlp_layer_sizes, schema.output_width], config=config.mlp, key="model.mlp",
                             activation="leaky_relu", logit=True, device=device)

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
        parts = [encoded, target, context, dense_features] if self.target_in_mlp else [encoded, context, dense_features]
        return self.mlp(torch.cat(parts, dim=1)).squeeze(-1)


@register("bst", BSTConfig)
def build_bst(config: BSTConfig, *, schema: FeatureSchema, device: torch.device) -> BST:
    """Builds a BST for ``schema`` on ``device``."""
    return BST(schema=schema, config=config, device=device)
