"""Hugging Face ``transformers`` models as blocks: a checkpoint folder or an inline config.

A model is named either by a local checkpoint folder (what ``save_pretrained`` writes: a
``config.json`` and its weights, usually with the tokenizer's files beside them) or by an inline
config mapping with a ``model_type`` (``{model_type: llama, hidden_size: 64, ...}``), built with
random weights through ``AutoConfig.for_model`` / ``AutoModel.from_config``. Nothing is ever
downloaded: a name that is not a local folder is refused.

:class:`PretrainedTransformer` may be built on the meta device (the sharding planner does); its
weights are created for real by :meth:`PretrainedTransformer.load_weights` once the model is placed
(DistributedModelParallel re-creates meta tensors empty, and rotary position tables are buffers
that no ``reset_parameters`` restores). ``transformers`` is imported only when such a model is used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shardrec.errors import ConfigError

LLMSpec = str | dict[str, Any]
"""A checkpoint folder or an inline config mapping with ``model_type``."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - setup.sh installs it
        raise ConfigError("a language model needs the 'transformers' package: run scripts/setup.sh, or pip install "
                          "transformers==5.25.0") from e
    transformers.logging.set_verbosity_error()
    return transformers


def checkpoint_folder(spec: LLMSpec, *, key: str) -> Path | None:
    """The checkpoint folder ``spec`` names (None for an inline config); raises a ConfigError
    naming ``key`` when it is not a local folder holding a ``config.json``."""
    if isinstance(spec, dict):
        return None
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(f"'{key}' is '{spec}', which is not a local folder: point it at a checkpoint folder written by "
                          "save_pretrained (config.json and weights), or give an inline config with model_type; "
                          "nothing is downloaded")
    if not (path / "config.json").is_file():
        raise ConfigError(f"'{key}': checkpoint folder '{path}' has no config.json; it must be a folder written by "
                          "save_pretrained (e.g. a downloaded Hugging Face model snapshot)")
    return path


def llm_config(spec: LLMSpec, *, key: str) -> Any:
    """The ``transformers`` config of ``spec``."""
    tf = _transformers()
    folder = checkpoint_folder(spec, key=key)
    if folder is not None:
        try:
            return tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers reports a bad config.json with assorted errors
            raise ConfigError(f"'{key}': cannot read '{folder / 'config.json'}': {type(e).__name__}: {e}") from e
    assert isinstance(spec, dict)
    params = dict(spec)
    model_type = params.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ConfigError(f"'{key}' is an inline config, which needs 'model_type' (e.g. llama, gpt2, qwen2, bert); got "
                          f"keys {', '.join(sorted(spec)) or 'none'}")
    try:
        return tf.AutoConfig.for_model(model_type, **params)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"'{key}': transformers cannot build a '{model_type}' config from {params}: {e}") from e


def spec_digest(spec: LLMSpec, *, seed: int) -> str:
    """A hex digest of what the model's weights are: every file of a checkpoint folder, byte for
    byte; an inline config's keys and the ``seed`` its random weights are drawn from."""
    h = hashlib.sha256()
    folder = checkpoint_folder(spec, key="model") if not isinstance(spec, dict) else None
    if folder is None:
        h.update(json.dumps(spec, sort_keys=True, default=str).encode())
        h.update(f"seed={seed}".encode())
        return h.hexdigest()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def load_tokenizer(spec: str, *, key: str) -> Any:
    """The tokenizer saved in folder ``spec``, right-padding, with a pad token."""
    tf = _transformers()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(f"'{key}' is '{spec}', which is not a local folder: point it at the folder a tokenizer was "
                          "saved to (tokenizer.json / tokenizer_config.json, often the checkpoint folder itself)")
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # missing or unreadable tokenizer files
        raise ConfigError(f"'{key}': cannot load a tokenizer from '{path}' ({type(e).__name__}: {e}); the folder needs "
                          "the tokenizer's files (tokenizer.json or its vocab files and tokenizer_config.json)") from e
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if tok.pad_token is None:
        raise ConfigError(f"'{key}': the tokenizer in '{path}' has no pad, end or unknown token to pad with; add a pad token")
    return tok


class PretrainedTransformer(nn.Module):
    """A ``transformers`` AutoModel: ``forward(embeds [N, S, H], mask [N, S]) -> [N, S, H]``
    (its last hidden state; ``mask`` marks real positions), or over token ids with
    :meth:`forward_ids`.

    Args:
        spec: a checkpoint folder or an inline config (:data:`LLMSpec`).
        key: the config key naming it, for messages.
        length: the sequence length inputs have (what :meth:`example_inputs` traces with).
        device: where the (possibly meta) weights are created.
    """

    def __init__(self, spec: LLMSpec, *, key: str, length: int, device: torch.device) -> None:
        super().__init__()
        self.spec, self.key, self.length = spec, key, length
        config = llm_config(spec, key=key)
        self.hidden = int(config.hidden_size)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or 0)
        with torch.device(device):
            self.model = _transformers().AutoModel.from_config(config)
        self.uses_ids = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.uses_ids:
            return self.model(input_ids=x, attention_mask=mask.long()).last_hidden_state
        return self.model(inputs_embeds=x, attention_mask=mask.long()).last_hidden_state

    def example_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs of the shape this block sees (for ``torch.jit.trace`` at export)."""
        device = next(self.parameters()).device
        mask = torch.ones(2, self.length, dtype=torch.bool, device=device)
        mask[1, self.length // 2 + 1:] = False
        if self.uses_ids:
            return torch.ones(2, self.length, dtype=torch.long, device=device), mask
        return torch.randn(2, self.length, self.hidden, device=device), mask

    @torch.no_grad()
    def load_weights(self, *, seed: int) -> None:
        """Fills every weight and buffer: from the checkpoint folder, or drawn from ``seed`` by the
        model's own initialization for an inline config (the same on every rank)."""
        tf = _transformers()
        folder = checkpoint_folder(self.spec, key=self.key)
        if folder is None:
            torch.manual_seed(seed)
            fresh = tf.AutoModel.from_config(llm_config(self.spec, key=self.key))
        else:
            try:
                fresh = tf.AutoModel.from_pretrained(str(folder), local_files_only=True)
            except Exception as e:  # missing or mismatched weight files
                raise ConfigError(f"'{self.key}': cannot load the weights in '{folder}' ({type(e).__name__}: {e})") from e
        device = next(self.model.parameters()).device
        own = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        theirs = dict(fresh.named_parameters()) | dict(fresh.named_buffers())
        missing = sorted(set(own) - set(theirs))
        if missing:
            raise ConfigError(f"'{self.key}': the weights in '{folder}' lack {', '.join(missing[:3])}: they belong to "
                              "another model than its config.json describes")
        for name, tensor in own.items():
            tensor.copy_(theirs[name].to(device=device, dtype=tensor.dtype))

    def check_causal(self) -> None:
        """Raises a ConfigError unless an output never depends on a later input (a decoder)."""
        x, mask = self.example_inputs()
        mask = torch.ones_like(mask)
        was = self.training
        self.eval()
        with torch.no_grad():
            later = x.clone()
            # A random new last input (a constant shift would vanish in an embedding LayerNorm).
            gen = torch.Generator(device=x.device).manual_seed(0)
            if self.uses_ids:
                later[:, -1] = (later[:, -1] % max(self.vocab_size - 1, 1)) + 1
            else:
                later[:, -1] = torch.randn(later[:, -1].shape, generator=gen, device=x.device)
            moved = (self(x, mask)[:, :-1] - self(later, mask)[:, :-1]).abs().max().item()
        self.train(was)
        if moved > 1e-6:
            raise ConfigError(f"'{self.key}' must be a causal (decoder) model, such as llama, qwen2 or gpt2: its outputs "
                              "change with later positions, so a position would see the items it predicts")

    def freeze_lower(self, layers: int) -> None:
        """Stops gradients to the token embeddings and the first ``layers`` transformer layers."""
        if layers <= 0:
            return
        stacks = [m for m in self.model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        if not stacks:
            raise ConfigError(f"'{self.key}': cannot find the layer list of this model to freeze")
        stack = max(stacks, key=len)
        if layers > len(stack):
            raise ConfigError(f"'model.freeze_item_layers' is {layers}, but '{self.key}' has {len(stack)} layers")
        for p in self.model.get_input_embeddings().parameters():
            p.requires_grad_(False)
        for layer in list(stack)[:layers]:
            for p in layer.parameters():
                p.requires_grad_(False)
