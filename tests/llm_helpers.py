"""Tiny ``transformers`` checkpoints and text catalogues for HLLM's language-model tests: random
weights from small configs and a word-level tokenizer built from the catalogue's words, saved with
``save_pretrained`` (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from helpers import SEQ_ITEMS

SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]
USER_LLM: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "max_position_embeddings": 64, "vocab_size": 8,
}
"""An inline user LLM config (its token embeddings are unused: it reads item vectors)."""


def title(item: int) -> str:
    """Item ``item``'s title: its group (id % 4, what :func:`helpers.write_retrieval_data` draws
    histories from) and kind in words."""
    return f"group{item % 4} kind{(item // 4) % 5} item {item}"


def write_text_catalogue(path: Path, *, items: int = SEQ_ITEMS) -> Path:
    """``item_id`` and ``title`` of every item."""
    pq.write_table(pa.table({"item_id": pa.array(np.arange(items)), "title": [title(i) for i in range(items)]}), path)
    return path


def write_tiny_checkpoint(folder: Path, *, texts: list[str], model_type: str = "llama", seed: int = 0,
                          extra_vocab: int = 0) -> Path:
    """A ``save_pretrained`` folder: a tiny random ``model_type`` model and a word-level tokenizer
    over the words of ``texts`` (``extra_vocab`` more tokens than the model's vocabulary has when
    positive: a mismatched pair)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(SPECIAL + words + [f"extra{i}" for i in range(extra_vocab)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    sizes = {"llama": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "num_key_value_heads": 2, "max_position_embeddings": 64},
             "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}}[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=len(vocab) - extra_vocab, pad_token_id=0, eos_token_id=2,
                                  bos_token_id=2, **sizes)
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def hllm_params(tmp: Path, *, catalogue: Path, **extra: Any) -> dict[str, Any]:
    """``model`` keys of an HLLM over a tiny item LLM checkpoint in ``tmp`` and :data:`USER_LLM`."""
    ckpt = tmp / "item_llm"
    if not ckpt.is_dir():
        write_tiny_checkpoint(ckpt, texts=[f"title: {title(i)}" for i in range(SEQ_ITEMS)])
    return {"name": "hllm", "item_llm": str(ckpt), "user_llm": USER_LLM, "vector_dim": 16, "cache_dir": str(tmp / "cache"),
            "item_text": {"path": str(catalogue), "columns": ["title"], "max_tokens": 8},
            "loss": {"kind": "in_batch", "temperature": 0.1, "log_q": False}, **extra}
