"""Multi-head self-attention and the transformer block built on it (BST, SASRec, HLLM).

Attention is told which positions hold real items (``valid [B, S]``) and whether it is causal;
it builds the boolean mask itself (:func:`attention_mask`), so no caller repeats that logic.
"""

from __future__ import annotations

import torch
from torch import nn

from shardrec.models.layers.activation import Activation
from shardrec.models.layers.mlp import MLP


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """``[B, S, S]``: query ``i`` may attend key ``j`` when ``j <= i`` and ``j`` is valid.

    A padded query also keeps its own position, so that no softmax row is empty; valid queries
    never see right padding either way, as it follows them.
    """
    pos = torch.arange(valid.size(1), device=valid.device)
    tril = pos.unsqueeze(1) >= pos.unsqueeze(0)
    return (tril.unsqueeze(0) & valid.unsqueeze(1)) | torch.eye(valid.size(1), dtype=torch.bool, device=valid.device)


def attention_mask(valid: torch.Tensor | None, length: int, *, causal: bool, device: torch.device) -> torch.Tensor | None:
    """Boolean mask broadcastable to ``[B, S, S]`` (True: the query may attend the key), or None.

    ``valid [B, S]`` masks padded keys; ``causal`` hides later positions. Without either, None.
    """
    if causal and valid is not None:
        return causal_mask(valid)
    if causal:
        pos = torch.arange(length, device=device)
        return (pos.unsqueeze(1) >= pos.unsqueeze(0)).unsqueeze(0)
    return None if valid is None else valid.unsqueeze(1)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention.

    Own Linear projections rather than nn.MultiheadAttention, whose packed in-projection has no
    ``reset_parameters`` to re-initialize it after a meta-device build.

    Args:
        dim: width D of the input and output; ``num_heads`` must divide it.
        num_heads: attention heads.
        causal: position ``i`` attends positions ``<= i`` only.
        dropout: dropout on the attention weights (training only).
        device: where the weights are created.
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = False, dropout: float = 0.0,
                 device: torch.device) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, device=device)
        self.out = nn.Linear(dim, dim, device=device)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, S, D]``, ``valid [B, S]`` (True: a real position; None: all are) -> ``[B, S, D]``."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        mask = attention_mask(valid, x.size(1), causal=self.causal, device=x.device)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask.unsqueeze(1),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(out.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    """Self-attention and a point-wise feed-forward net, each in a residual with dropout.

    Pre-norm (``norm_first``, SASRec, HLLM): ``x + Dropout(Attn(LN(x)))``, then
    ``x + Dropout(FFN(LN(x)))``. Post-norm (BST, the original transformer):
    ``LN(x + Dropout(Attn(x)))``, then ``LN(x + Dropout(FFN(x)))``. The FFN is
    ``Linear(D, ffn_dim) - activation - [Dropout] - Linear(ffn_dim, D)``.

    Args:
        dim: width D.
        num_heads: attention heads; must divide ``dim``.
        ffn_dim: hidden width of the feed-forward net.
        activation: the feed-forward net's activation.
        dropout: dropout on both residual branches.
        attention_dropout: dropout on the attention weights.
        ffn_dropout: None: no Dropout inside the feed-forward net; a rate: one after its activation.
        causal: position ``i`` attends positions ``<= i`` only.
        norm_first: pre-norm; False: post-norm.
        device: where the weights are created.
    """

    def __init__(self, dim: int, num_heads: int, *, ffn_dim: int, activation: Activation, dropout: float,
                 attention_dropout: float = 0.0, ffn_dropout: float | None = None, causal: bool = False,
                 norm_first: bool = True, device: torch.device) -> None:
        super().__init__()
        self.norm_first = norm_first

        def attention() -> MultiHeadSelfAttention:
            return MultiHeadSelfAttention(dim, num_heads, causal=causal, dropout=attention_dropout, device=device)

        def ffn() -> MLP:
            return MLP(dim, [ffn_dim, dim], activation=activation, final_activation=False, dropout=ffn_dropout,
                       device=device)

        # Registered in the order the forward uses them, so parameters list in that order.
        if norm_first:
            self.norm1, self.attention = nn.LayerNorm(dim, device=device), attention()
            self.norm2, self.ffn = nn.LayerNorm(dim, device=device), ffn()
        else:
            self.attention, self.norm1 = attention(), nn.LayerNorm(dim, device=device)
            self.ffn, self.norm2 = ffn(), nn.LayerNorm(dim, device=device)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, S, D]``, ``valid [B, S]`` (True: a real position; None: all are) -> ``[B, S, D]``."""
        if self.norm_first:
            x = x + self.dropout(self.attention(self.norm1(x), valid))
            return x + self.dropout(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.attention(x, valid)))
        return self.norm2(x + self.dropout(self.ffn(x)))
