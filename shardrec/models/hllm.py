"""HLLM (Chen et al. 2024): an item model that reads each item's text and a user model over the
sequence of the history's item embeddings, both transformers, trained end to end by next-item
contrastive prediction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema, SparseFeature
from shardrec.errors import ConfigError
from shardrec.models.layers import PositionEmbedding, TransformerBlock
from shardrec.models.layers.embedding import data_type
from shardrec.models.registry import register
from shardrec.models.retrieval import (
    RetrievalLoss,
    RetrievalLossConfig,
    RetrievalModel,
    RetrievalOutput,
    empty_negatives,
    item_table,
    resolve_item_feature,
)
from shardrec.models.sequence import padded_sequence


@dataclass(kw_only=True)
class HLLMConfig:
    """The ``model`` section for ``name: hllm``.

    Without ``item_llm``, two small transformers are trained from scratch over token ids read as
    features. With ``item_llm`` and ``user_llm`` (Hugging Face ``transformers`` models: a checkpoint
    folder or an inline config), the paper's setting: the item LLM reads each catalogue item's text
    (``item_text``) and the user LLM the history's item embeddings
    (:class:`shardrec.models.hllm_pretrained.PretrainedHLLM`); the keys ``hidden_dim``,
    ``num_heads``, ``item_layers``, ``user_layers`` and the token features are then unused.
    """

    item_feature: str | None = None
    """The item id feature (ids only mask repeats in the loss); unset: the non-sequence feature over the history's table."""
    history_feature: str | None = None
    """The history's item ids; unset: the sequence feature over the item feature's table."""
    item_text_feature: str = "item_tokens"
    """The row's item's text: a fixed number T of token ids per item (0 pads), ``sequence: true`` with ``max_len: T``."""
    history_text_feature: str = "hist_tokens"
    """The history items' texts, T tokens per item one after another, over the same table (``max_len``: L * T)."""
    text_encoder: str | None = None
    """Replaced by ``item_llm``; refused with a pointer to it."""
    item_llm: str | dict[str, Any] | None = None
    """The item LLM: a local checkpoint folder (``save_pretrained``'s output: config.json, weights
    and usually the tokenizer) or an inline ``transformers`` config with ``model_type`` (random
    weights, e.g. for tests). Unset: the from-scratch item transformer over token features."""
    user_llm: str | dict[str, Any] | None = None
    """The user LLM, a causal decoder (llama, qwen2, gpt2 ...), as ``item_llm``: it reads item
    vectors as ``inputs_embeds``, so its token embeddings are unused."""
    tokenizer: str | None = None
    """Folder of the item LLM's tokenizer; unset: the ``item_llm`` checkpoint folder."""
    item_text: ItemTextConfig | None = None
    """Where each item's text comes from (with ``item_llm``)."""
    item_pooling: Literal["last", "mean"] = "last"
    """Item language embedding: the item LLM's hidden state at the last token (the paper appends
    an item token and reads its state; a causal LLM's last token has read the whole text), or the
    mean over the tokens."""
    train_item_llm: bool = False
    """Train the item LLM with the rest (it then runs on each batch's distinct items); false: its
    embeddings are computed once for the catalogue and cached (``cache_dir``)."""
    freeze_item_layers: int = 0
    """With ``train_item_llm``: freeze the item LLM's token embeddings and this many lowest layers."""
    id_embeddings: bool = True
    """Add a (sharded) item id embedding, projected, to each item's language embedding."""
    cache_dir: str | None = None
    """Folder of the item embedding caches; unset: ``$SHARDREC_CACHE/hllm`` or ``~/.cache/shardrec/hllm``."""
    embed_batch_size: int = 64
    """Items per batch when embedding the catalogue."""
    hidden_dim: int = 64
    """Width of both transformers."""
    num_heads: int = 2
    """Attention heads of both transformers; must divide ``hidden_dim``."""
    item_layers: int = 2
    """Layers of the item model (bidirectional, over an item's tokens and its ITEM token)."""
    user_layers: int = 2
    """Layers of the user model (causal, over the history's item embeddings)."""
    vector_dim: int = 64
    """Width of the item embeddings and user vectors."""
    dropout: float = 0.1
    """Dropout on the attention and feed-forward outputs."""
    normalize: bool = True
    """L2-normalize item embeddings and user vectors (the paper's contrastive loss is over cosines)."""
    loss: RetrievalLossConfig = field(default_factory=lambda: RetrievalLossConfig(log_q=False))
    """Training loss: in-batch softmax (InfoNCE) without the log-Q correction (a ``loss`` section in
    YAML starts from RetrievalLossConfig's own defaults, log_q on: set ``log_q: false`` there)."""

    def __post_init__(self) -> None:
        if self.text_encoder is not None:
            raise ConfigError(f"'model.text_encoder' ('{self.text_encoder}') is replaced by 'model.item_llm' (a local "
                              "checkpoint folder or an inline transformers config), with 'model.user_llm' and 'model.item_text'")
        if self.item_llm is None and (self.user_llm is not None or self.item_text is not None or self.train_item_llm):
            raise ConfigError("'model.user_llm', 'model.item_text' and 'model.train_item_llm' need 'model.item_llm'; set it "
                              "to the item language model (a checkpoint folder or an inline config)")
        if self.freeze_item_layers < 0 or self.embed_batch_size <= 0:
            raise ConfigError("'model.freeze_item_layers' must be >= 0 and 'model.embed_batch_size' > 0")
        if self.freeze_item_layers and not self.train_item_llm:
            raise ConfigError("'model.freeze_item_layers' needs 'model.train_item_llm: true' (a frozen item LLM is not trained at all)")
        for key in ("hidden_dim", "num_heads", "item_layers", "user_layers", "vector_dim"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"'model.{key}' must be > 0, got {getattr(self, key)}")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"'model.num_heads' ({self.num_heads}) must divide 'model.hidden_dim' ({self.hidden_dim})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"'model.dropout' must be in [0, 1), got {self.dropout}")
        if self.loss.kind == "sampled" and self.item_llm is None:
            raise ConfigError("'model.loss.kind: sampled' does not fit HLLM: sampled negatives carry only item ids and "
                              "its item model reads text; use 'in_batch' (the paper's) or 'bpr', or set 'model.item_llm' "
                              "(whose cached item embeddings are looked up by id)")


@dataclass(kw_only=True)
class ItemTextConfig:
    """``model.item_text``: the catalogue the item LLM reads."""

    path: str
    """The item catalogue (Parquet, one row per item, e.g. the ``items.parquet`` of ``shardrec data
    prepare movielens``, whose text columns are ``title`` and ``genre_names``)."""
    columns: list[str] = field(default_factory=lambda: ["title"])
    """Its text columns, written ``column: value`` one after another (list columns comma-joined)."""
    prompt: str = ""
    """Text put before each item's columns."""
    max_tokens: int = 32
    """Tokens per item: longer texts are cut, shorter ones padded."""

    def __post_init__(self) -> None:
        if self.max_tokens <= 0 or not self.columns:
            raise ConfigError("'model.item_text.max_tokens' must be > 0 and 'model.item_text.columns' name at least one column")


@dataclass(frozen=True, kw_only=True)
class TextLayout:
    """Where HLLM's inputs come from in a schema."""

    item: str
    """Key of the row's item id."""
    history: str
    """Key of the history's item ids."""
    item_text: str
    """Key of the row's item's T tokens."""
    history_text: str
    """Key of the history items' L * T tokens."""
    token_table: str
    """The table both text features read."""
    tokens: int
    """T, tokens per item."""
    length: int
    """L, history length."""


def text_layout(schema: FeatureSchema, config: HLLMConfig) -> TextLayout:
    """Resolves and checks HLLM's features in ``schema``."""
    item = resolve_item_feature(schema, config.item_feature, model="hllm")
    history = _history_feature(schema, config.history_feature, table=item_table(schema, item, model="hllm"))
    item_text = _text_feature(schema, config.item_text_feature, key="model.item_text_feature")
    history_text = _text_feature(schema, config.history_text_feature, key="model.history_text_feature")
    if item_text.table != history_text.table:
        raise ConfigError(f"'{item_text.name}' (table '{item_text.table}') and '{history_text.name}' (table "
                          f"'{history_text.table}') must read one token table")
    tokens, length = item_text.max_len, history.max_len
    if history_text.max_len != tokens * length:  # type: ignore[operator]
        raise ConfigError(f"'{history_text.name}' must hold {tokens} tokens for each of the {length} items of "
                          f"'{history.name}': set its max_len to {tokens * length}, not {history_text.max_len}")  # type: ignore[operator]
    others = [f.name for f in schema.sparse if f.table == item_text.table and f.name not in (item_text.name, history_text.name)]
    if others:
        raise ConfigError(f"model 'hllm' reads only '{item_text.name}' and '{history_text.name}' from table "
                          f"'{item_text.table}'; features {', '.join(others)} would be ignored: remove them from 'features.sparse'")
    return TextLayout(item=item, history=history.name, item_text=item_text.name, history_text=history_text.name,
                      token_table=item_text.table, tokens=tokens, length=length)  # type: ignore[arg-type]


def _history_feature(schema: FeatureSchema, name: str | None, *, table: str) -> SparseFeature:
    seqs = [f for f in schema.sparse if f.sequence and f.table == table and f.max_len is not None]
    found = [f for f in seqs if name is None or f.name == name]
    if not found:
        raise ConfigError(f"'model.history_feature' must name a sequence feature with max_len over the item table "
                          f"'{table}'; candidates: {', '.join(f.name for f in seqs) or 'none'}")
    return found[0]


def _text_feature(schema: FeatureSchema, name: str, *, key: str) -> SparseFeature:
    found = [f for f in schema.sparse if f.name == name and f.sequence and f.table is not None and f.max_len]
    if not found:
        candidates = [f.name for f in schema.sparse if f.sequence and f.table is not None]
        raise ConfigError(f"'{key}' names '{name}', which is not a sequence feature with a table and max_len; "
                          f"sequence features: {', '.join(candidates) or 'none'}")
    return found[0]


class Transformer(nn.Module):
    """Input projection plus learned positions, LayerNorm'd (BERT's embedding norm), pre-norm layers
    (``x + Attn(LN(x))``, then ``x + FFN(LN(x))`` with a GELU FFN 4x wide), a final LayerNorm and an
    output projection."""

    def __init__(self, in_dim: int, out_dim: int, positions: int, config: HLLMConfig, *, layers: int, causal: bool,
                 device: torch.device) -> None:
        super().__init__()
        width = config.hidden_dim
        # No bias and a norm: an input part shared by every item (a bias) would swamp the small
        # freshly initialized token embeddings, and every item would start with the same vector.
        self.project_in = nn.Linear(in_dim, width, bias=False, device=device)
        self.positions = PositionEmbedding(positions, width, device=device)
        self.input_norm = nn.LayerNorm(width, device=device)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, config.num_heads, ffn_dim=4 * width, activation="gelu", dropout=config.dropout,
                             attention_dropout=config.dropout, causal=causal, device=device)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width, bias=False, device=device)
        self.project_out = nn.Linear(width, out_dim, bias=False, device=device)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``x [N, S, in_dim]``, ``valid [N, S]`` (the keys attention may see; None: all) -> ``[N, S, out_dim]``."""
        x = self.input_norm(self.positions(self.project_in(x)))
        for block in self.blocks:
            x = block(x, valid)
        return self.project_out(self.norm(x))


class ItemToken(nn.Module):
    """The learned ITEM token appended to every item's tokens; its output is the item embedding."""

    def __init__(self, dim: int, *, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.weight.numel()))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [N, T, D]`` -> ``[N, T + 1, D]``."""
        return torch.cat([tokens, self.weight.expand(tokens.size(0), 1, -1)], dim=1)


class ItemModel(nn.Module):
    """Bidirectional transformer over an item's token embeddings and the ITEM token; padding
    tokens (id 0) are masked as keys, and the ITEM token's output (projected) is the item embedding."""

    def __init__(self, token_dim: int, tokens: int, config: HLLMConfig, *, device: torch.device) -> None:
        super().__init__()
        self.item_token = ItemToken(token_dim, device=device)
        self.encoder = Transformer(token_dim, config.vector_dim, tokens + 1, config, layers=config.item_layers, causal=False,
                                   device=device)
        self.normalize = config.normalize

    def forward(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``tokens [N, T, D]`` (embeddings), ``ids [N, T]`` -> ``[N, vector_dim]``."""
        keys = torch.cat([ids != 0, torch.ones_like(ids[:, :1], dtype=torch.bool)], dim=1)
        out = self.encoder(self.item_token(tokens), keys)[:, -1]
        return nn.functional.normalize(out, dim=-1) if self.normalize else out


class UserModel(nn.Module):
    """Causal transformer over the history's item embeddings: position p predicts item p + 1."""

    def __init__(self, length: int, config: HLLMConfig, *, device: torch.device) -> None:
        super().__init__()
        self.decoder = Transformer(config.vector_dim, config.vector_dim, length, config, layers=config.user_layers, causal=True,
                                   device=device)
        self.normalize = config.normalize

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """``items [B, L, D]`` (right-padded) -> ``[B, L, D]``; a real position sees only itself and earlier ones."""
        # The skip keeps what a decoder's residual stream keeps (its input) across the width change:
        # at the start each position already predicts an item like its own, which trains much sooner.
        out = items + self.decoder(items)
        return nn.functional.normalize(out, dim=-1) if self.normalize else out


@torch.fx.wrap
def padded_ids(jt: JaggedTensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ids right-padded with 0 to ``length`` ``[B, length]`` and its length (at most ``length``)."""
    # A leaf for the pipeline's tracer: the padding needs concrete lengths.
    return jt.to_padded_dense(desired_length=length, padding_value=0), jt.lengths().clamp(max=length)


@torch.fx.wrap
def distinct_items(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Items by their token ids ``[N, T]``: the first row of each distinct one ``[U]`` and each row's
    distinct item ``[N]``."""
    # Items are told apart by their tokens, not their ids: the item model sees only the tokens.
    distinct, inverse = torch.unique(ids, dim=0, return_inverse=True)
    rows = torch.arange(ids.size(0), device=ids.device)
    first = torch.full((distinct.size(0),), ids.size(0), dtype=rows.dtype, device=ids.device)
    return first.scatter_reduce(0, inverse, rows, reduce="amin"), inverse


class HLLM(RetrievalModel):
    """HLLM from Chen et al. 2024, "HLLM: Enhancing Sequential Recommendations via Hierarchical
    Large Language Models for Item and User Modeling", with small transformers trained from scratch.

    Item model: an item's T text tokens and an appended learned ITEM token go through a
    bidirectional transformer (padding tokens masked); the ITEM token's projected output is the item
    embedding. Item ids are never embedded: two items with the same tokens share an embedding.
    Each distinct item (by tokens) of a batch is encoded once.

    User model: a causal transformer over the history's item embeddings plus learned positions
    predicts the next item's embedding at every position; the user vector is the output at the
    last history position (zeros for an empty history). Training scores every valid position
    against the next item (the next history item, or the row's target after the last one) with the
    in-batch softmax (InfoNCE) over all the batch's positions; item ids only mask repeats.

    Only the token table is looked up (one EmbeddingCollection); user profile features, dense
    features, id tables and sampled negatives in the schema are not read.

    Example::

        # features.sparse: item_id (table item), history (table item, sequence: true, max_len: 2),
        #   item_tokens (table token, sequence: true, max_len: 2),
        #   hist_tokens (table token, sequence: true, max_len: 4)
        model = HLLM(schema=schema, config=HLLMConfig(), device=torch.device("cpu"))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["item_id", "history", "item_tokens", "hist_tokens"],
            values=torch.tensor([5, 9, 3, 7, 1, 4, 5, 2, 0, 6, 0, 2, 8, 3, 1]),
            lengths=torch.tensor([1, 1, 1, 2, 2, 2, 2, 4]),
        )
        out = model(torch.empty(2, 0), kjt)  # training: RetrievalOutput over 3 positions, out.user [3, 64]
    """

    def __init__(self, *, schema: FeatureSchema, config: HLLMConfig, device: torch.device) -> None:
        super().__init__()
        self.layout = text_layout(schema, config)
        lay = self.layout
        self.item_feature = lay.item
        table = schema.table(lay.token_table)
        self.token_dim = table.embedding_dim
        self.ec = EmbeddingCollection(tables=[EmbeddingConfig(
            name=table.name, num_embeddings=table.num_embeddings, embedding_dim=table.embedding_dim,
            feature_names=[lay.item_text, lay.history_text], data_type=data_type(table),
        )], device=device)
        self.item_model = ItemModel(table.embedding_dim, lay.tokens, config, device=device)
        self.user_model = UserModel(lay.length, config, device=device)
        rows = schema.table(item_table(schema, lay.item, model="hllm")).num_embeddings
        self.retrieval_loss = RetrievalLoss(config.loss, item_rows=rows, negatives=None)

    def _texts(self, sparse_features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(history [B, L, T, D], history ids [B, L, T], target [B, T, D], target ids [B, T])``."""
        lay, t = self.layout, self.layout.tokens
        emb = self.ec(sparse_features)
        hist = padded_sequence(emb[lay.history_text], lay.length * t)[0].unflatten(1, (lay.length, t))
        hist_ids = padded_ids(sparse_features[lay.history_text], lay.length * t)[0].unflatten(1, (lay.length, t))
        target = padded_sequence(emb[lay.item_text], t)[0]
        return hist, hist_ids, target, padded_ids(sparse_features[lay.item_text], t)[0]

    def _items(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``tokens [B, S, T, D]``, ``ids [B, S, T]`` -> item embeddings ``[B, S, vector_dim]``, each
        distinct item encoded once."""
        flat_ids = ids.flatten(0, 1)
        first, inverse = distinct_items(flat_ids)
        vectors = self.item_model(tokens.flatten(0, 1)[first], flat_ids[first])
        return vectors[inverse].unflatten(0, (-1, ids.size(1)))

    def _history(self, sparse_features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(history ids [B, L], valid [B, L])``, ids read from the KJT without a lookup."""
        ids, lengths = padded_ids(sparse_features[self.layout.history], self.layout.length)
        return ids, torch.arange(self.layout.length, device=ids.device).unsqueeze(0) < lengths.unsqueeze(1)

    def user_vectors(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        hist, hist_ids, _, _ = self._texts(sparse_features)
        _, valid = self._history(sparse_features)
        return last_valid(self.user_model(self._items(hist, hist_ids)), valid)

    def item_vectors(self, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        _, _, target, target_ids = self._texts(sparse_features)
        return self.item_model(target, target_ids)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> RetrievalOutput | torch.Tensor:
        """Training: a RetrievalOutput over every valid history position; eval: user vectors ``[B, D]``."""
        hist, hist_ids, target, target_ids = self._texts(sparse_features)
        items = self._items(torch.cat([hist, target.unsqueeze(1)], dim=1), torch.cat([hist_ids, target_ids.unsqueeze(1)], dim=1))
        ids, valid = self._history(sparse_features)
        user = self.user_model(items[:, :-1])
        if not self.training:
            return last_valid(user, valid)
        target_id = padded_ids(sparse_features[self.item_feature], 1)[0]
        # Position p predicts history item p + 1, the last valid position the row's target.
        last = valid & ~torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
        next_items = torch.where(last.unsqueeze(-1), items[:, -1:], items[:, 1:])
        next_ids = torch.where(last, target_id, torch.cat([ids[:, 1:], target_id], dim=1))
        user, item = user[valid], next_items[valid]
        return RetrievalOutput((user * item).sum(dim=-1), user, item, next_ids[valid], *empty_negatives(item, next_ids))


def last_valid(outputs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, D]``: each row's output at its last valid position (zeros where none is)."""
    count = valid.sum(dim=1)
    index = (count - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, outputs.size(-1))
    return outputs.gather(1, index).squeeze(1) * (count > 0).unsqueeze(1).to(outputs.dtype)


@register("hllm", HLLMConfig, retrieval=True)
def build_hllm(config: HLLMConfig, *, schema: FeatureSchema, device: torch.device) -> nn.Module:
    """Builds an HLLM for ``schema`` on ``device``: over pretrained language models when
    ``item_llm`` is set, else the from-scratch one."""
    if config.item_llm is not None:
        from shardrec.models.hllm_pretrained import PretrainedHLLM

        return PretrainedHLLM(schema=schema, config=config, device=device)
    return HLLM(schema=schema, config=config, device=device)
