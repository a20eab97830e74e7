"""HLLM on pretrained language models (Chen et al. 2024, as the paper runs it): an item LLM reads
each catalogue item's text, a user LLM reads the sequence of the history's item embeddings.

The item LLM (``model.item_llm``) tokenizes each item's text columns with its own tokenizer and
its last hidden state at the item's last token (or the mean over its tokens) is the item's
language embedding. With ``train_item_llm: false`` (the default) these embeddings are computed
once for the whole catalogue, in batches, before training, and cached in a Parquet file keyed by
item id and by a digest of the model, tokenizer, texts and settings (:func:`cache_file`): a second
run with the same inputs reads the file and never runs the item LLM. With ``train_item_llm:
true`` the item LLM runs on each batch's distinct items and trains (``freeze_item_layers``
freezes its token embeddings and lowest layers).

Item vector = a projection of the language embedding, plus, with ``id_embeddings`` (default), a
projection of the item's row of a sharded id table (the paper's ablation adds ids the same way).
The user LLM (``model.user_llm``, a causal decoder) reads the history's item vectors through an
input projection (``inputs_embeds``) and its projected output at each position predicts the next
item, trained with the in-batch softmax as the from-scratch HLLM.

This module registers nothing: ``hllm`` builds :class:`PretrainedHLLM` when ``item_llm`` is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.fx
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.catalogue import read_catalogue
from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError, DataError
from shardrec.models.layers.embedding import data_type
from shardrec.models.layers.pretrained import PretrainedTransformer, load_tokenizer, spec_digest
from shardrec.models.retrieval import (
    RetrievalLoss,
    RetrievalModel,
    RetrievalOutput,
    empty_negatives,
    item_table,
    negative_ids,
    negatives_feature,
    resolve_item_feature,
    single,
)
from shardrec.models.sequence import padded_sequence

if TYPE_CHECKING:
    from shardrec.models.hllm import HLLMConfig

CACHE_VERSION = 1
"""Bumped when what a cache file holds changes."""


def default_cache_dir() -> Path:
    """``$SHARDREC_CACHE/hllm``, else ``~/.cache/shardrec/hllm``."""
    root = os.environ.get("SHARDREC_CACHE")
    return Path(root) / "hllm" if root else Path.home() / ".cache" / "shardrec" / "hllm"


@torch.fx.wrap
def history_ids(sparse_features: KeyedJaggedTensor, key: str, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, length], valid [B, length])`` of right-padded feature ``key``."""
    jt = sparse_features[key]
    ids = jt.to_padded_dense(desired_length=length, padding_value=0.0)
    valid = torch.arange(length, device=ids.device).unsqueeze(0) < jt.lengths().clamp(max=length).unsqueeze(1)
    return ids, valid


@torch.fx.wrap
def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``[N, H]`` from ``hidden [N, S, H]``: at each row's last real token, or the mean over them."""
    mask = mask.to(torch.bool)
    if mode == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    last = (mask.sum(dim=1) - 1).clamp(min=0)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


@torch.fx.wrap
def distinct_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(distinct ids [U], each id's index into them [N])``."""
    distinct, inverse = torch.unique(ids, return_inverse=True)
    return distinct, inverse


@torch.fx.wrap
def last_valid_row(outputs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, D]``: each row's output at its last valid position (zeros where none is)."""
    count = valid.sum(dim=1)
    index = (count - 1).clamp(min=0)
    picked = outputs[torch.arange(outputs.size(0), device=outputs.device), index]
    return picked * (count > 0).unsqueeze(1).to(outputs.dtype)


def item_texts(path: Path, *, columns: list[str], prompt: str) -> list[str]:
    """Each catalogue row's text: ``prompt`` then ``column: value`` for each text column."""
    names = set(pq.read_schema(path).names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"item catalogue '{path}' has no text column '{missing[0]}' (model.item_text.columns); its columns: "
                        f"{', '.join(sorted(names))}")
    table = pq.read_table(path, columns=columns)
    parts = []
    for c in columns:
        col = table.column(c)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            parts.append([", ".join(str(v) for v in (x or [])) for x in col.to_pylist()])
        else:
            parts.append(["" if x is None else str(x) for x in col.to_pylist()])
    return [prompt + ". ".join(f"{c}: {v}" for c, v in zip(columns, row)) for row in zip(*parts)]


def cache_file(config: HLLMConfig, *, texts: list[str], ids: torch.Tensor, seed: int) -> Path:
    """The cache file of the item embeddings for these inputs: its name holds a digest of the item
    LLM's weights (:func:`spec_digest`), the tokenizer's files, the texts and ids, and the settings."""
    assert config.item_llm is not None and config.item_text is not None
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "llm": spec_digest(config.item_llm, seed=seed),
                         "tokenizer": spec_digest(tokenizer_path(config), seed=0), "max_tokens": config.item_text.max_tokens,
                         "pooling": config.item_pooling}, sort_keys=True).encode())
    h.update(ids.numpy().tobytes())
    for t in texts:
        h.update(t.encode() + b"\0")
    root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    return root / f"item_embeddings_{h.hexdigest()[:24]}.parquet"


def tokenizer_path(config: HLLMConfig) -> str:
    """``model.tokenizer``, else the item LLM's checkpoint folder."""
    if config.tokenizer is not None:
        return config.tokenizer
    if isinstance(config.item_llm, str):
        return config.item_llm
    raise ConfigError("'model.item_llm' is an inline config, which carries no tokenizer: set 'model.tokenizer' to a folder "
                      "holding one (e.g. the tokenizer of the checkpoint the config imitates)")


def write_cache(path: Path, ids: torch.Tensor, vectors: torch.Tensor) -> None:
    """Writes the ``[N, H]`` vectors by item id to ``path`` atomically (a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = pa.array(vectors.float().numpy().reshape(-1))
    table = pa.table({"item_id": pa.array(ids.numpy()), "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.size(1))})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_cache(path: Path, ids: torch.Tensor, hidden: int) -> torch.Tensor:
    """``[N, H]`` vectors of ``ids`` from cache file ``path``."""
    table = pq.read_table(path)
    got = torch.from_numpy(table.column("item_id").to_numpy().astype(np.int64))
    flat = table.column("vector").combine_chunks().flatten().to_numpy()
    if not torch.equal(got, ids) or flat.size != ids.numel() * hidden:
        raise DataError(f"item embedding cache '{path}' does not match the catalogue it is named for; delete it to recompute")
    return torch.from_numpy(flat.astype(np.float32)).view(-1, hidden)


class PretrainedHLLM(RetrievalModel):
    """HLLM over ``transformers`` models: see the module docstring. Build with the ``hllm`` model
    name and ``item_llm`` / ``user_llm`` set; :meth:`init_pretrained` runs once the model is placed
    (the trainer calls it), loading the language models' weights and the item embeddings.

    Example::

        # features.sparse: movie_id (table movie), hist_movie_ids (table movie, sequence: true, max_len: 50)
        # model: {name: hllm, item_llm: ckpt/item, user_llm: ckpt/user,
        #         item_text: {path: data/items.parquet, columns: [title, genre_names]}}
        model = build_model("hllm", params, schema=schema, device=torch.device("cpu"))
        model.init_pretrained(seed=0)  # embeds every catalogue item once, or reads the cache
    """

    def __init__(self, *, schema: FeatureSchema, config: HLLMConfig, device: torch.device) -> None:
        super().__init__()
        if config.user_llm is None or config.item_text is None:
            raise ConfigError("model 'hllm' with 'model.item_llm' also needs 'model.user_llm' (a causal model over the "
                              "history's item embeddings) and 'model.item_text' (the catalogue and its text columns)")
        self.config = config
        self.schema = schema
        self.item_feature = resolve_item_feature(schema, config.item_feature, model="hllm")
        table = schema.table(item_table(schema, self.item_feature, model="hllm"))
        history = [f for f in schema.sparse if f.sequence and f.table == table.name and f.max_len is not None
                   and (config.history_feature is None or f.name == config.history_feature)]
        if not history:
            raise ConfigError(f"'model.history_feature' must name a sequence feature with max_len over the item table "
                              f"'{table.name}'")
        self.history_feature, self.length = history[0].name, int(history[0].max_len)  # type: ignore[arg-type]
        self.rows = table.num_embeddings
        neg = negatives_feature(schema, item_feature=self.item_feature, model="hllm") if config.loss.kind == "sampled" else None
        self.negatives = neg.name if neg is not None else None
        self.item_llm: PretrainedTransformer | None = None
        llm = PretrainedTransformer(config.item_llm, key="model.item_llm", length=config.item_text.max_tokens,  # type: ignore[arg-type]
                                    device=device)
        self.item_hidden = llm.hidden
        if config.train_item_llm:
            llm.uses_ids = True
            llm.freeze_lower(config.freeze_item_layers)
            self.item_llm = llm
            # Token ids and masks of every catalogue row's text, filled by init_pretrained.
            self.register_buffer("item_tokens", torch.zeros(self.rows, config.item_text.max_tokens, dtype=torch.long, device=device))
            self.register_buffer("item_mask", torch.zeros(self.rows, config.item_text.max_tokens, dtype=torch.bool, device=device))
        else:
            # The cached language embedding of every item row (zeros for rows not in the catalogue).
            self.register_buffer("item_language", torch.zeros(self.rows, llm.hidden, device=device))
        self.user_llm = PretrainedTransformer(config.user_llm, key="model.user_llm", length=self.length, device=device)
        dim = config.vector_dim
        self.language_proj = nn.Linear(self.item_hidden, dim, device=device)
        self.ec: EmbeddingCollection | None = None
        if config.id_embeddings:
            self.ec = EmbeddingCollection(tables=[EmbeddingConfig(
                name=table.name, num_embeddings=table.num_embeddings, embedding_dim=table.embedding_dim,
                feature_names=[self.item_feature, self.history_feature, *([self.negatives] if self.negatives else [])],
                data_type=data_type(table),
            )], device=device)
            self.id_proj = nn.Linear(table.embedding_dim, dim, bias=False, device=device)
        self.user_in = nn.Linear(dim, self.user_llm.hidden, device=device)
        self.user_out = nn.Linear(self.user_llm.hidden, dim, bias=False, device=device)
        self.normalize = config.normalize
        self.retrieval_loss = RetrievalLoss(config.loss, item_rows=self.rows, negatives=neg)
        self.item_llm_runs = 0
        """Items the item LLM embedded in :meth:`init_pretrained` (0 when the cache was read)."""

    # ---- placement: weights, tokens and the item embedding cache ----

    @torch.no_grad()
    def init_pretrained(self, *, seed: int) -> None:
        """Loads both language models' weights and fills the item buffers: the catalogue's tokens
        (``train_item_llm``), or its language embeddings, read from the cache or computed once
        (on rank 0 when distributed, the others wait and read the file)."""
        config = self.config
        assert config.item_text is not None and config.item_llm is not None
        self.user_llm.load_weights(seed=seed + 1)
        self.user_llm.check_causal()
        path = Path(config.item_text.path)
        ids, _ = read_catalogue(path, self.schema, item_feature=self.item_feature)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.rows):
            raise DataError(f"item catalogue '{path}': item id {int(ids.max())} is outside table rows 0..{self.rows - 1}")
        texts = item_texts(path, columns=config.item_text.columns, prompt=config.item_text.prompt)
        tokenizer = load_tokenizer(tokenizer_path(config), key="model.tokenizer")
        if self.item_llm is not None:
            self.item_llm.load_weights(seed=seed)
            tokens, mask = self._tokenize(tokenizer, texts, vocab=self.item_llm.vocab_size)
            self.item_tokens.zero_()
            self.item_mask.zero_()
            self.item_tokens[ids] = tokens.to(self.item_tokens.device)
            self.item_mask[ids] = mask.to(self.item_mask.device)
            return
        file = cache_file(config, texts=texts, ids=ids, seed=seed)
        main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if main and not file.is_file():
            vectors = self._embed_catalogue(tokenizer, texts, seed=seed)
            write_cache(file, ids, vectors)
            print(f"hllm: embedded {len(texts):,} catalogue items with model.item_llm -> {file}", flush=True)
        elif main:
            print(f"hllm: item embeddings read from {file} (model.item_llm not run)", flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        vectors = read_cache(file, ids, self.item_hidden)
        self.item_language.zero_()
        self.item_language[ids] = vectors.to(self.item_language.device)

    def _tokenize(self, tokenizer: Any, texts: list[str], *, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.config.item_text is not None
        out = tokenizer(texts, max_length=self.config.item_text.max_tokens, truncation=True, padding="max_length",
                        return_tensors="pt")
        tokens, mask = out["input_ids"], out["attention_mask"].bool()
        if vocab and int(tokens.max()) >= vocab:
            raise ConfigError(f"the tokenizer '{tokenizer_path(self.config)}' gives token id {int(tokens.max())}, but "
                              f"model.item_llm's vocabulary has {vocab} tokens: the tokenizer belongs to another model; "
                              "set 'model.tokenizer' to the checkpoint's own tokenizer folder")
        return tokens, mask

    def _embed_catalogue(self, tokenizer: Any, texts: list[str], *, seed: int) -> torch.Tensor:
        """``[N, H]`` language embeddings of every text, in batches, with a temporary item LLM."""
        config = self.config
        assert config.item_text is not None and config.item_llm is not None
        llm = PretrainedTransformer(config.item_llm, key="model.item_llm", length=config.item_text.max_tokens,
                                    device=torch.device("cpu"))
        llm.uses_ids = True
        llm.load_weights(seed=seed)
        llm.eval()
        tokens, mask = self._tokenize(tokenizer, texts, vocab=llm.vocab_size)
        start, parts = time.perf_counter(), []
        for i in range(0, len(texts), config.embed_batch_size):
            t, m = tokens[i : i + config.embed_batch_size], mask[i : i + config.embed_batch_size]
            parts.append(pool_hidden(llm(t, m), m, config.item_pooling))
        self.item_llm_runs = len(texts)
        self.embed_seconds = time.perf_counter() - start
        return torch.cat(parts) if parts else torch.zeros(0, llm.hidden)

    # ---- vectors ----

    def _vector(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1) if self.normalize else x

    def _language(self, ids: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` language embeddings of item ids ``ids [...]``."""
        if self.item_llm is None:
            return self.item_language[ids]
        flat = ids.reshape(-1)
        distinct, inverse = distinct_ids(flat)
        mask = self.item_mask[distinct]
        pooled = pool_hidden(self.item_llm(self.item_tokens[distinct], mask), mask, self.config.item_pooling)
        return pooled[inverse].unflatten(0, ids.shape)

    def _items(self, ids: torch.Tensor, id_emb: torch.Tensor | None) -> torch.Tensor:
        """Item vectors ``[..., D]`` of ``ids`` (and their id embeddings ``[..., E]``)."""
        out = self.language_proj(self._language(ids))
        if id_emb is not None:
            out = out + self.id_proj(id_emb)
        return self._vector(out)

    def _embeddings(
        self, sparse_features: KeyedJaggedTensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(history id embeddings [B, L, E], target's [B, E], sampled negatives' [N, E])``, Nones
        without id embeddings (the last also without sampled negatives)."""
        if self.ec is None:
            return None, None, None
        emb = self.ec(sparse_features)
        neg = emb[self.negatives].values() if self.negatives else None
        return padded_sequence(emb[self.history_feature], self.length)[0], single(emb[self.item_feature]), neg

    def _users(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[B, L, D]`` user vectors from the history's item vectors ``[B, L, D]``."""
        hidden = self.user_llm(self.user_in(items), valid)
        return self._vector(items + self.user_out(hidden))

    def user_vectors(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        ids, valid = history_ids(sparse_features, self.history_feature, self.length)
        hist_emb, _, _ = self._embeddings(sparse_features)
        return last_valid_row(self._users(self._items(ids, hist_emb), valid), valid)

    def item_vectors(self, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        target, _ = history_ids(sparse_features, self.item_feature, 1)
        _, target_emb, _ = self._embeddings(sparse_features)
        return self._items(target.squeeze(1), target_emb)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> RetrievalOutput | torch.Tensor:
        """Training: a RetrievalOutput over every valid history position; eval: user vectors ``[B, D]``."""
        ids, valid = history_ids(sparse_features, self.history_feature, self.length)
        target, _ = history_ids(sparse_features, self.item_feature, 1)
        hist_emb, target_emb, neg_emb = self._embeddings(sparse_features)
        hist = self._items(ids, hist_emb)
        users = self._users(hist, valid)
        if not self.training:
            return last_valid_row(users, valid)
        target_vec = self._items(target.squeeze(1), target_emb)
        # Position p predicts history item p + 1, the last valid position the row's target.
        last = valid & ~torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
        next_items = torch.where(last.unsqueeze(-1), target_vec.unsqueeze(1), torch.cat([hist[:, 1:], hist[:, :1]], dim=1))
        next_ids = torch.where(last, target, torch.cat([ids[:, 1:], ids[:, :1]], dim=1))
        user, item = users[valid], next_items[valid]
        if self.negatives is None:
            return RetrievalOutput((user * item).sum(dim=-1), user, item, next_ids[valid], *empty_negatives(item, next_ids))
        neg_ids = negative_ids(sparse_features, self.negatives, next_ids)
        neg = self._items(neg_ids, neg_emb)
        return RetrievalOutput((user * item).sum(dim=-1), user, item, next_ids[valid], neg, neg_ids)
