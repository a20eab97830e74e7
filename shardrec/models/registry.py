"""The one model registry: a name maps to a config dataclass and a builder.

A model module registers itself with :func:`register`; :func:`build_model` looks the name up,
builds the model's own config from the ``model`` section of the job (every key but ``name``)
and calls the builder. Every model's ``forward(dense_features, sparse_features)`` returns
``schema.output_width`` outputs per row (:mod:`shardrec.models.tasks`): logits of shape ``[B]``
for one binary or regression label, ``[B, num_classes]`` for a multiclass one, ``[B, W]`` for
multi-task models (each task's columns in label order); retrieval models
(``retrieval=True``, :mod:`shardrec.models.retrieval`) return user vectors in eval mode instead.
A model sees no raw features (``raw: true``, e.g. timestamps) unless it registers with
``raw_features=True``.

A model whose training objective is more than each task's loss on its outputs (a second net
trained alongside, an auxiliary loss) returns, in training mode only, a tuple whose first element
is the logits it serves and whose other elements are whatever its loss needs, and defines
``loss(outputs, labels) -> Tensor`` over that tuple. :func:`training_loss` (which the trainer
calls) sends a tuple to ``model.loss`` and plain logits to binary cross-entropy; in eval mode the
model returns its logits alone. Example: rocket_launching returns ``(light, booster)`` while
training and its ``loss`` adds both nets' cross-entropy and the hint loss; an auxiliary loss that
needs no labels is just another element, ``(logits, aux_loss)``, that ``loss`` adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from shardrec.config import build
from shardrec.data.schema import FeatureSchema, LabelConfig
from shardrec.errors import ConfigError
from shardrec.models.tasks import task_loss

Builder = Callable[..., nn.Module]
F = TypeVar("F", bound=Builder)


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its config class and its builder."""

    name: str
    config_cls: type
    builder: Builder
    multi_task: bool = False
    """Predicts one logit per label column (``[B, T]``); single-task models predict ``[B]``."""
    retrieval: bool = False
    """A :class:`shardrec.models.retrieval.RetrievalModel`: user and item vectors, ranked over a catalogue."""
    raw_features: bool = False
    """Receives the schema's raw features; other models get ``schema.without_raw()``."""


_REGISTRY: dict[str, ModelEntry] = {}


def register(
    name: str, config_cls: type, *, multi_task: bool = False, retrieval: bool = False, raw_features: bool = False
) -> Callable[[F], F]:
    """Registers ``builder(config, *, schema, device) -> nn.Module`` under ``name``."""

    def wrap(builder: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        _REGISTRY[name] = ModelEntry(name=name, config_cls=config_cls, builder=builder, multi_task=multi_task,
                                     retrieval=retrieval, raw_features=raw_features)
        return builder

    return wrap


def names() -> list[str]:
    """Names of every registered model, sorted."""
    _import_zoo()
    return sorted(_REGISTRY)


def get(name: str) -> ModelEntry:
    """Returns the entry for ``name`` or raises a ConfigError listing the known models."""
    _import_zoo()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model '{name}' (config key 'model.name'); known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def model_config(name: str, params: dict[str, Any]) -> Any:
    """Builds model ``name``'s own config dataclass from ``params`` (keys under ``model``)."""
    return build(get(name).config_cls, params, key="model")


def build_model(name: str, params: dict[str, Any], *, schema: FeatureSchema, device: torch.device) -> nn.Module:
    """Builds registered model ``name`` with ``params`` for ``schema`` on ``device``."""
    entry = get(name)
    return entry.builder(model_config(name, params), schema=schema if entry.raw_features else schema.without_raw(), device=device)


def training_loss(
    model: nn.Module, outputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor,
    tasks: list[LabelConfig] | None = None, *, single: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(loss, logits)`` for a training step from what ``model``'s forward returned.

    A tuple ``(logits, *extras)`` is scored by the model's own ``loss(outputs, labels)``; plain
    logits by each task's own loss (:func:`shardrec.models.tasks.task_loss`; ``tasks`` None: one
    binary task, binary cross-entropy; ``single``: labels ``[B]``, else ``[B, T]``).
    """
    if isinstance(outputs, tuple):
        return model.loss(outputs, labels), outputs[0]
    if tasks is None:
        return nn.functional.binary_cross_entropy_with_logits(outputs, labels), outputs
    return task_loss(outputs, labels, tasks, single=single), outputs


def _import_zoo() -> None:
    # Importing the zoo package runs each model module's @register.
    import shardrec.models.zoo  # noqa: F401
