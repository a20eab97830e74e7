"""Pieces the multi-task models share: the input layer over one EBC, softmax-gated experts, task
towers, per-task loss weights and the weighted cross-entropy.

A multi-task model predicts each label column's outputs (``schema.tasks``), in label order: one
logit or value per binary or regression task, ``num_classes`` logits per multiclass task. In
training mode it returns a tuple ``(logits, ...)`` so that :func:`shardrec.models.registry.training_loss`
hands it to the model's own ``loss``, which weighs each task's own loss (:mod:`shardrec.models.tasks`)
by ``task_weights``; in eval mode it returns the logits ``[B, W]`` alone (W = ``schema.output_width``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.tasks import task_loss
from shardrec.models.layers import (
    MLPConfig,
    build_ebc_if_tables,
    check_features,
    check_layer_sizes,
    embedding_output_dim,
    mlp_block,
    pooled_embeddings,
)


@dataclass(kw_only=True)
class MultiTaskConfig:
    """Keys every multi-task model's ``model`` section has; each model's config adds its own."""

    tower_layer_sizes: list[int] = field(default_factory=lambda: [32])
    """Hidden widths of each task's tower; its output layer follows (width 1, or num_classes)."""
    task_weights: list[float] | None = None
    """Loss weight of each task, one per label in features.label order; unset: 1.0 each."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """Activation, dropout, norm of every MLP block of the model (the towers; experts or a shared bottom where the model has them)."""
    tower_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The task towers' MLPs; unset keys: ``mlp``'s."""

    def __post_init__(self) -> None:
        check_layer_sizes(self.tower_layer_sizes, key="model.tower_layer_sizes")
        check_weights_positive(self.task_weights)


def check_weights_positive(weights: list[float] | None) -> None:
    """Raises a ConfigError naming ``model.task_weights`` if a weight is negative (or the list is empty)."""
    if weights is not None and (not weights or any(w < 0 for w in weights)):
        raise ConfigError(
            f"'model.task_weights' must be a non-empty list of weights >= 0 (or unset for equal weights), got {weights}"
        )


def task_weights(weights: list[float] | None, *, schema: FeatureSchema) -> list[float]:
    """One loss weight per label column: ``weights`` checked against ``schema.labels``, or all 1.0."""
    labels = schema.labels
    if weights is None:
        return [1.0] * len(labels)
    if len(weights) != len(labels):
        raise ConfigError(
            f"'model.task_weights' has {len(weights)} weights but features.label lists {len(labels)} labels "
            f"({', '.join(labels)}); give one weight per label, in that order, or leave it unset"
        )
    return [float(w) for w in weights]


def require_labels(schema: FeatureSchema, *, model: str, exactly: int | None = None, at_least: int = 1) -> None:
    """Raises a ConfigError naming ``features.label`` unless the schema has the labels ``model`` needs."""
    labels = schema.labels
    if exactly is not None and len(labels) != exactly:
        raise ConfigError(
            f"model '{model}' needs exactly {exactly} labels in features.label, got {len(labels)} ({', '.join(labels)})"
        )
    if len(labels) < at_least:
        raise ConfigError(
            f"model '{model}' needs at least {at_least} labels in features.label (one per step of the funnel), "
            f"got {len(labels)} ({', '.join(labels)})"
        )


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """``sum_t weights[t] * mean_b BCE(logits[b, t], labels[b, t])`` for ``[B, T]`` logits and labels."""
    per_task = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=0)
    return sum(w * per_task[t] for t, w in enumerate(weights))  # type: ignore[return-value]


class MultiTaskModel(nn.Module):
    """Base of the multi-task models: one EBC over every sparse feature, the input
    ``x = [pooled embeddings, dense]`` (either part may be missing from the schema; without
    tables there is no EBC) and the weighted per-task loss.

    Args:
        schema: features, tables and labels (one task per label).
        weights: ``model.task_weights`` (None: equal weights).
        model: the registered name, for error messages.
        device: where the weights are created.
    """

    def __init__(self, *, schema: FeatureSchema, weights: list[float] | None, model: str, device: torch.device) -> None:
        super().__init__()
        check_features(schema, model=model)
        self.feature_names = schema.sparse_names
        self.num_tasks = len(schema.labels)
        self.tasks = schema.tasks
        self.task_widths = [t.width for t in self.tasks]
        self.task_weights = task_weights(weights, schema=schema)
        self.ebc = build_ebc_if_tables(schema, device=device)
        self.input_dim = embedding_output_dim(schema) + len(schema.dense)

    def embed(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """``[B, input_dim]``: every feature's pooled embedding, then the dense features."""
        return torch.cat([*pooled_embeddings(self.ebc, sparse_features, self.feature_names), dense_features], dim=1)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor]:
        """``(logits,)`` in training mode, so that :meth:`loss` scores them; the logits in eval mode."""
        return (logits,) if self.training else logits

    def loss(self, outputs: tuple[Any, ...], labels: torch.Tensor) -> torch.Tensor:
        """Each task's own loss over its columns of ``outputs[0]`` ``[B, W]``, weighted by ``task_weights``."""
        return task_loss(outputs[0], labels, self.tasks, self.task_weights, single=False)


class Experts(nn.Module):
    """``num_experts`` MLPs over one input (ReLU after every layer by default), their outputs stacked.

    Args:
        in_features: width of the input.
        num_experts: number of experts K.
        layer_sizes: widths of each expert's layers; the last is the expert's output width H.
        mlp: the experts' MLP settings (``model.expert_mlp`` over ``model.mlp``).
        device: where the weights are created.
    """

    def __init__(self, in_features: int, *, num_experts: int, layer_sizes: list[int], mlp: MLPConfig, device: torch.device) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            mlp_block(in_features, layer_sizes, config=mlp, key="model.expert_mlp", final_activation=True, device=device)
            for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, K, H]`` for ``x`` ``[B, in_features]``."""
        return torch.stack([expert(x) for expert in self.experts], dim=1)


class Gate(nn.Module):
    """Softmax gate: ``w(x) = softmax(W x)`` over ``num_experts`` experts (no bias, as in MMoE and PLE).

    Args:
        in_features: width of the gate's input.
        num_experts: number of experts it weighs.
        device: where the weights are created.
    """

    def __init__(self, in_features: int, *, num_experts: int, device: torch.device) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_experts, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expert weights ``[B, K]``, each row summing to 1."""
        return self.linear(x).softmax(dim=1)

    def mix(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """``sum_k w_k(x) * experts[:, k]``: ``[B, H]`` for the gate input ``x`` and experts ``[B, K, H]``."""
        return torch.einsum("bk,bkh->bh", self(x), experts)


class Towers(nn.Module):
    """One MLP per task ending in that task's outputs.

    Args:
        in_features: width of each tower's input.
        num_tasks: number of towers T.
        layer_sizes: hidden widths of each tower; an output layer follows.
        widths: each tower's output width (1 per binary or regression task, num_classes per
            multiclass task); None: 1 each.
        mlp: the towers' MLP settings (``model.tower_mlp`` over ``model.mlp``).
        device: where the weights are created.
    """

    def __init__(
        self, in_features: int, *, num_tasks: int, layer_sizes: list[int], mlp: MLPConfig, widths: list[int] | None = None,
        device: torch.device,
    ) -> None:
        super().__init__()
        widths = widths or [1] * num_tasks
        self.towers = nn.ModuleList(
            mlp_block(in_features, [*layer_sizes, widths[t]], config=mlp, key="model.tower_mlp", logit=True, device=device)
            for t in range(num_tasks)
        )

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, W]``: tower t over ``inputs[t]``, side by side."""
        return torch.cat([tower(x) for tower, x in zip(self.towers, inputs)], dim=1)
