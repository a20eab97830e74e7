"""HSTU (Zhai et al. 2024): pointwise aggregated attention with relative position and time biases,
trained as a generative next-item retrieval model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import PositionEmbedding
from shardrec.models.layers.jagged import (
    JaggedBlocks,
    from_blocks,
    jagged_blocks,
    jagged_next,
    jagged_positions,
    jagged_prefix,
    to_blocks,
)
from shardrec.models.registry import register
from shardrec.models.retrieval import RetrievalLossConfig
from shardrec.models.seqrec import (
    SeqRecConfig,
    SequentialRetrievalModel,
    next_in_sequence,
    padded_ids,
    seqrec_layout,
)

# torch.fx.wrap patches only the module that names it: make seqrec's leaves leaves here too.
torch.fx.wrap("next_in_sequence")
torch.fx.wrap("padded_ids")
for _leaf in ("from_blocks", "jagged_blocks", "jagged_next", "jagged_positions", "jagged_prefix", "to_blocks"):
    torch.fx.wrap(_leaf)

LOG_BASE = 0.301
"""Time gaps are bucketed by ``log(gap) / 0.301`` (about log2), as in the reference."""


@dataclass(kw_only=True)
class HSTUConfig(SeqRecConfig):
    """The ``model`` section for ``name: hstu``."""

    history_timestamps_feature: str | None = None
    """Raw sequence feature holding each history item's timestamp, aligned with the history; unset:
    the schema's one raw sequence feature."""
    timestamp_feature: str | None = None
    """Raw feature holding the target's timestamp (the query time of the last position); unset: the
    schema's one raw non-sequence feature."""
    num_blocks: int = 2
    """HSTU layers."""
    num_heads: int = 1
    """Attention heads."""
    linear_dim: int = 50
    """Width per head of U and V."""
    attention_dim: int = 50
    """Width per head of Q and K."""
    num_time_buckets: int = 128
    """Log-scale time-gap buckets of the relative attention bias."""
    normalize: bool = True
    """L2-normalize user and item vectors (the reference's sampled-softmax setting)."""
    attention: str = "jagged"
    """``jagged``: attention over each history's own tokens, blockwise, so a batch costs
    ``O(sum of L_i^2)`` (:mod:`shardrec.models.layers.jagged`); ``padded``: histories right-padded to
    ``max_len`` with a dense ``[B, H, L, L]`` attention. Both give the same outputs."""
    block_size: int = 32
    """Tokens per block of the jagged attention: smaller wastes less on each history's last block,
    larger makes fewer, bigger matmuls."""
    loss: RetrievalLossConfig = field(default_factory=lambda: RetrievalLossConfig(kind="sampled", temperature=0.05))
    """Training loss: by default the reference's sampled softmax over normalized vectors at
    temperature 0.05; keys a YAML ``loss`` section leaves out keep these defaults."""

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = {"num_blocks": self.num_blocks, "num_heads": self.num_heads, "linear_dim": self.linear_dim,
                 "attention_dim": self.attention_dim, "num_time_buckets": self.num_time_buckets,
                 "block_size": self.block_size}
        for key, value in sizes.items():
            if value <= 0:
                raise ConfigError(f"'model.{key}' must be > 0, got {value}")
        if self.attention not in ("jagged", "padded"):
            raise ConfigError(f"'model.attention' must be 'jagged' or 'padded', got '{self.attention}'")


def time_buckets(query_times: torch.Tensor, key_times: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``[B, L, L]`` bucket of each (query, key) time gap: ``log(max(|t_q - t_k|, 1)) / 0.301``,
    truncated and clamped to ``[0, num_buckets]``; ``query_times``/``key_times`` are ``[B, L]``."""
    gap = (query_times.unsqueeze(2) - key_times.unsqueeze(1)).abs().clamp(min=1).float()
    return (torch.log(gap) / LOG_BASE).long().clamp(min=0, max=num_buckets)


class RelativeBias(nn.Module):
    """HSTU's relative attention bias: a learned weight per relative position ``j - i`` plus one per
    time-gap bucket (:func:`time_buckets`)."""

    def __init__(self, max_len: int, num_buckets: int, *, device: torch.device) -> None:
        super().__init__()
        self.max_len = max_len
        self.position = nn.Parameter(torch.empty(2 * max_len - 1, device=device))
        self.time = nn.Parameter(torch.empty(num_buckets + 1, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.position, std=0.02)
        nn.init.normal_(self.time, std=0.02)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """``[B, L, L]`` bias from ``buckets [B, L, L]`` (:func:`time_buckets`)."""
        pos = torch.arange(self.max_len, device=buckets.device)
        relative = pos.unsqueeze(0) - pos.unsqueeze(1) + self.max_len - 1
        return self.position[relative].unsqueeze(0) + self.time[buckets]

    def jagged(self, relative: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        """``[P, S, S]`` bias of the block pairs of :func:`block_bias_index`."""
        return self.position[relative] + self.time[buckets]


class BlockBias(NamedTuple):
    """What the relative bias of each (query, key) slot of the jagged block pairs is indexed by."""

    relative: torch.Tensor
    """``[P, S, S]`` index into :attr:`RelativeBias.position`: ``j - i + max_len - 1``."""
    buckets: torch.Tensor
    """``[P, S, S]`` time-gap bucket (:func:`time_buckets`)."""


@torch.fx.wrap
def block_bias_index(blocks: JaggedBlocks, query_times: torch.Tensor, key_times: torch.Tensor, *, max_len: int,
                     num_buckets: int) -> BlockBias:
    """The bias indices of every slot pair of ``blocks``' pairs, from the jagged ``[T]`` query and
    key times; empty slots get in-range indices (their attention is masked)."""
    pos = blocks.position
    relative = pos[blocks.key].unsqueeze(1) - pos[blocks.query].unsqueeze(2) + max_len - 1
    qt, kt = to_blocks(query_times, blocks), to_blocks(key_times, blocks)
    buckets = time_buckets(qt[blocks.query], kt[blocks.key], num_buckets)
    return BlockBias(relative.clamp(min=0, max=2 * max_len - 2), buckets)


@torch.fx.wrap
def jagged_pointwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                               blocks: JaggedBlocks, *, scale: float) -> torch.Tensor:
    """HSTU's ``SiLU(q k^T + bias) * scale`` aggregation of ``v``, causal within each row, over
    jagged ``q, k [T, H, d_qk]``, ``v [T, H, d_v]`` and the block pairs' ``bias [P, S, S]`` -> ``[T, H, d_v]``."""
    qb, kb, vb = to_blocks(q, blocks), to_blocks(k, blocks), to_blocks(v, blocks)
    scores = torch.einsum("pihd,pjhd->phij", qb[blocks.query], kb[blocks.key])
    pos = blocks.position
    allowed = blocks.valid[blocks.key].unsqueeze(1) & (pos[blocks.key].unsqueeze(1) <= pos[blocks.query].unsqueeze(2))
    attn = nn.functional.silu(scores + bias.unsqueeze(1)) * scale * allowed.unsqueeze(1).to(scores.dtype)
    out = torch.einsum("phij,pjhd->pihd", attn, vb[blocks.key])
    summed = out.new_zeros((qb.size(0), *out.shape[1:])).index_add(0, blocks.query, out)
    return from_blocks(summed, blocks)


class HSTULayer(nn.Module):
    """One HSTU layer: ``U, V, Q, K = Split(SiLU(f1(LN(X))))``,
    ``A = SiLU(Q K^T + rab) / n`` under the causal mask, ``Y = X + f2(Dropout(LN(A V) * U))``.

    ``n`` is the padded length (the reference divides by its padded length too); the norms carry no
    learned scale, as in the reference.
    """

    def __init__(self, dim: int, *, config: HSTUConfig, max_len: int, device: torch.device) -> None:
        super().__init__()
        self.dim = dim
        self.max_len = max_len
        self.num_heads = config.num_heads
        self.linear_dim = config.linear_dim
        self.attention_dim = config.attention_dim
        width = 2 * config.num_heads * (config.linear_dim + config.attention_dim)
        self.uvqk = nn.Linear(dim, width, bias=False, device=device)
        self.bias = RelativeBias(max_len, config.num_time_buckets, device=device)
        self.out = nn.Linear(config.num_heads * config.linear_dim, dim, device=device)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        """``x [B, L, D]``, ``attn_mask [B, L, L]``, ``buckets [B, L, L]`` -> ``[B, L, D]``."""
        h, dv, dqk = self.num_heads, self.linear_dim, self.attention_dim
        uvqk = nn.functional.silu(self.uvqk(nn.functional.layer_norm(x, [self.dim], eps=1e-6)))
        # Slices rather than split(): the pipeline's tracer cannot unpack a proxy.
        u, v = uvqk[..., : h * dv], uvqk[..., h * dv : 2 * h * dv]
        q, k = uvqk[..., 2 * h * dv : 2 * h * dv + h * dqk], uvqk[..., 2 * h * dv + h * dqk :]
        scores = torch.einsum("bnhd,bmhd->bhnm", q.unflatten(-1, (h, dqk)), k.unflatten(-1, (h, dqk)))
        attn = nn.functional.silu(scores + self.bias(buckets).unsqueeze(1)) / self.max_len
        attn = attn * attn_mask.unsqueeze(1).to(attn.dtype)
        av = torch.einsum("bhnm,bmhd->bnhd", attn, v.unflatten(-1, (h, dv))).flatten(2)
        return x + self.out(self.dropout(nn.functional.layer_norm(av, [h * dv], eps=1e-6) * u))

    def forward_jagged(self, x: torch.Tensor, blocks: JaggedBlocks, index: BlockBias) -> torch.Tensor:
        """:meth:`forward` on jagged ``x [T, D]``: the projections per token, the attention over
        ``blocks``' pairs with the bias at ``index`` (:func:`block_bias_index`) -> ``[T, D]``."""
        h, dv, dqk = self.num_heads, self.linear_dim, self.attention_dim
        uvqk = nn.functional.silu(self.uvqk(nn.functional.layer_norm(x, [self.dim], eps=1e-6)))
        u, v = uvqk[:, : h * dv], uvqk[:, h * dv : 2 * h * dv]
        q, k = uvqk[:, 2 * h * dv : 2 * h * dv + h * dqk], uvqk[:, 2 * h * dv + h * dqk :]
        av = jagged_pointwise_attention(q.unflatten(-1, (h, dqk)), k.unflatten(-1, (h, dqk)), v.unflatten(-1, (h, dv)),
                                        self.bias.jagged(index.relative, index.buckets), blocks, scale=1.0 / self.max_len)
        return x + self.out(self.dropout(nn.functional.layer_norm(av.flatten(1), [h * dv], eps=1e-6) * u))


@torch.fx.wrap
def hstu_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, L, L]``: query ``i`` aggregates valid keys ``j <= i`` (no softmax, so no row needs a key)."""
    pos = torch.arange(mask.size(1), device=mask.device)
    return (pos.unsqueeze(1) >= pos.unsqueeze(0)).unsqueeze(0) & mask.unsqueeze(1)


class HSTU(SequentialRetrievalModel):
    """HSTU from Zhai et al. 2024, "Actions Speak Louder than Words: Trillion-Parameter Sequential
    Transducers for Generative Recommendations", as a next-item retrieval model.

    The history's item embeddings, scaled by ``sqrt(D)``, plus a learned position embedding go
    through dropout and ``num_blocks`` HSTU layers (:class:`HSTULayer`): pointwise SiLU attention
    without softmax, biased by a learned weight per relative position and per log-bucketed time gap
    between the query's time and each key's. Position ``p``'s query time is the timestamp of item
    ``p + 1`` (the target's for the last position), as in the reference, so it knows when the item
    it predicts happens. Outputs are L2-normalized (``normalize``) and scored against the item
    table's embeddings (shared input/output embeddings), also normalized.

    Variable lengths are jagged by default (``attention: jagged``), as in the reference: the
    projections run on the batch's history tokens only, and the attention multiplies only blocks of
    the same history (:func:`jagged_pointwise_attention`), so a batch costs ``O(sum of L_i^2)``
    however long its longest history. ``attention: padded`` right-pads histories to ``max_len``
    instead (padded keys masked out of the aggregation, padded positions zeroed after each layer);
    the outputs are the same.

    Input: the history, the target item and their raw timestamps (``hist_ts``, aligned with the
    history, and ``ts``); register the timestamps with ``raw: true``.

    Example::

        # features.sparse: item_id (table item), history (table item, sequence: true, max_len: 3),
        #                  hist_ts (raw, sequence: true, max_len: 3), ts (raw),
        #                  neg_item_ids (table item, negatives: {num: 2, of: item_id})
        model = HSTU(schema=schema, config=HSTUConfig(), device=torch.device("cpu"))
        # B = 2; row 0: history [1, 2] at times [10, 50], next item 7 at 90;
        #        row 1: history [5] at [20], next item 3 at 400; negatives [4, 9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["item_id", "history", "hist_ts", "ts", "neg_item_ids"],
            values=torch.tensor([7, 3, 1, 2, 5, 10, 50, 20, 90, 400, 4, 9]),
            lengths=torch.tensor([1, 1, 2, 1, 2, 1, 1, 1, 2, 0]),
        )
        out = model(torch.empty(2, 0), kjt)  # training: 3 pairs (1->2, 2->7, 5->3), out.user [3, D]
    """

    def __init__(self, *, schema: FeatureSchema, config: HSTUConfig, device: torch.device) -> None:
        layout = seqrec_layout(schema, config, model="hstu")
        times = timestamp_features(schema, config, history=layout.history)
        super().__init__(schema=schema, layout=layout, loss=config.loss, normalize=config.normalize, device=device)
        self.history_timestamps, self.timestamp = times
        self.num_time_buckets = config.num_time_buckets
        self.jagged = config.attention == "jagged"
        self.block_size = config.block_size
        self.positions = PositionEmbedding(layout.max_len, layout.dim, device=device)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            HSTULayer(layout.dim, config=config, max_len=layout.max_len, device=device) for _ in range(config.num_blocks)
        )

    def query_key_times(self, mask: torch.Tensor, sparse_features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query times, key times)``, each ``[B, L]``: each position's next item's time and its own."""
        keys = padded_ids(sparse_features[self.history_timestamps], self.layout.max_len)
        target = padded_ids(sparse_features[self.timestamp], 1).squeeze(1)
        return next_in_sequence(keys, target, mask), keys

    def encode(self, history: torch.Tensor, mask: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """``[B, L, D]`` causal outputs of ``history [B, L, D]`` under ``mask [B, L]`` and the timestamps."""
        keep = mask.unsqueeze(-1).to(history.dtype)
        x = self.dropout(self.positions(history * math.sqrt(history.size(-1)))) * keep
        buckets = time_buckets(*self.query_key_times(mask, sparse_features), self.num_time_buckets)
        attn_mask = hstu_attention_mask(mask)
        for layer in self.layers:
            x = layer(x, attn_mask, buckets) * keep
        return x

    def encode_jagged(self, values: torch.Tensor, lengths: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """:meth:`encode` on the jagged history ``values [T, D]`` (rows of ``lengths [B]``) -> ``[T, D]``."""
        lay = self.layout
        x = self.dropout(values * math.sqrt(lay.dim) + self.positions.weight[jagged_positions(lengths)])
        ts = sparse_features[self.history_timestamps]
        key_times = aligned_times(ts.values(), ts.lengths(), lengths, max_len=lay.max_len, feature=self.history_timestamps,
                                  history=lay.history)
        target = padded_ids(sparse_features[self.timestamp], 1).squeeze(1)
        blocks = jagged_blocks(lengths, self.block_size)
        index = block_bias_index(blocks, jagged_next(key_times, lengths, target), key_times, max_len=lay.max_len,
                                 num_buckets=self.num_time_buckets)
        for layer in self.layers:
            x = layer.forward_jagged(x, blocks, index)
        return x


@torch.fx.wrap
def aligned_times(values: torch.Tensor, lengths: torch.Tensor, history_lengths: torch.Tensor, *, max_len: int,
                  feature: str, history: str) -> torch.Tensor:
    """``[T]``: the history timestamps cut as the history is; raises unless each row has one per item."""
    values, lengths = jagged_prefix(values, lengths, max_len)
    if lengths.shape != history_lengths.shape or not bool((lengths == history_lengths).all()):
        bad = int((lengths != history_lengths).sum()) if lengths.shape == history_lengths.shape else lengths.numel()
        raise ValueError(f"'{feature}' must hold one timestamp per item of '{history}', but {bad} rows of the batch "
                         f"differ in length: write both columns from the same events, oldest first")
    return values


def timestamp_features(schema: FeatureSchema, config: HSTUConfig, *, history: str) -> tuple[str, str]:
    """``(history timestamps, target timestamp)``: the named raw features, or the schema's only raw
    sequence and non-sequence ones."""
    found = []
    for key, name, sequence in (("history_timestamps_feature", config.history_timestamps_feature, True),
                                ("timestamp_feature", config.timestamp_feature, False)):
        raw = [f.name for f in schema.sparse if f.raw and f.sequence == sequence]
        kind = f"a raw sequence feature aligned with '{history}'" if sequence else "a raw non-sequence feature (the target's time)"
        if name is None and len(raw) != 1:
            raise ConfigError(f"model 'hstu' cannot tell which feature is {kind}: set 'model.{key}' to one of "
                              f"{', '.join(raw) or 'none (declare one with raw: true under features.sparse)'}")
        if name is not None and name not in raw:
            raise ConfigError(f"'model.{key}' names '{name}', which must be {kind}; candidates: {', '.join(raw) or 'none'}")
        found.append(name if name is not None else raw[0])
    return found[0], found[1]


@register("hstu", HSTUConfig, retrieval=True, raw_features=True)
def build_hstu(config: HSTUConfig, *, schema: FeatureSchema, device: torch.device) -> HSTU:
    """Builds an HSTU for ``schema`` on ``device``."""
    return HSTU(schema=schema, config=config, device=device)
