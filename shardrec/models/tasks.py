"""Losses and served outputs per task type (``features.label``: binary, regression, multiclass).

A model predicts ``schema.output_width`` numbers per row: one per binary or regression task and
``num_classes`` per multiclass task, in label order (a single-task model with one output returns
``[B]``, otherwise ``[B, W]``). Labels are ``[B]`` for one label and ``[B, T]`` for several; a
multiclass label holds the class id.

Example::

    tasks = [LabelConfig(name="rating", type="regression"), LabelConfig(name="click")]
    loss = task_loss(logits, labels, tasks, single=False)   # logits [B, 2], labels [B, 2]
    served = serve_outputs(logits, tasks)             # value, probability
"""

from __future__ import annotations

import torch
from torch import nn

from shardrec.data.schema import FeatureSchema, LabelConfig
from shardrec.errors import ConfigError


def split_outputs(logits: torch.Tensor, tasks: list[LabelConfig]) -> list[torch.Tensor]:
    """Each task's columns of ``logits``: ``[B]`` for a one-output task, ``[B, K]`` for multiclass."""
    flat = logits.reshape(-1, sum(t.width for t in tasks))
    out, start = [], 0
    for t in tasks:
        part = flat[:, start : start + t.width]
        out.append(part.squeeze(1) if t.width == 1 else part)
        start += t.width
    return out


def label_columns(labels: torch.Tensor, tasks: list[LabelConfig], *, single: bool) -> list[torch.Tensor]:
    """Each task's labels ``[B]`` from ``[B]`` (``single``: one label, not in a list) or ``[B, T]``
    labels. The layout is passed, not read off the tensor, so that fx can trace the loss."""
    return [labels] if single else [labels[:, i] for i in range(len(tasks))]


def one_loss(output: torch.Tensor, label: torch.Tensor, task: LabelConfig) -> torch.Tensor:
    """The mean loss of one task's outputs against its labels."""
    name = task.loss_name
    if name == "bce":
        return nn.functional.binary_cross_entropy_with_logits(output, label)
    if name == "mse":
        return nn.functional.mse_loss(output, label)
    if name == "huber":
        return nn.functional.huber_loss(output, label, delta=task.huber_delta)
    return nn.functional.cross_entropy(output, label.long())


def task_loss(
    logits: torch.Tensor, labels: torch.Tensor, tasks: list[LabelConfig], weights: list[float] | None = None, *, single: bool
) -> torch.Tensor:
    """``sum_t weight_t * loss_t``: each task's own loss, weighted by its ``weight`` (times
    ``weights[t]``, a model's ``task_weights``, where given); ``single``: labels ``[B]``."""
    if single and len(tasks) == 1 and tasks[0].weight == 1.0 and weights is None:
        return one_loss(logits if tasks[0].width == 1 else logits.reshape(-1, tasks[0].width), labels, tasks[0])
    parts = zip(split_outputs(logits, tasks), label_columns(labels, tasks, single=single), tasks)
    total = sum((t.weight * (1.0 if weights is None else weights[i])) * one_loss(o, y, t) for i, (o, y, t) in enumerate(parts))
    return total  # type: ignore[return-value]


def serve_outputs(logits: torch.Tensor, tasks: list[LabelConfig]) -> torch.Tensor:
    """What a served model returns: per task a probability (binary), the value (regression) or
    the class probabilities (multiclass); ``[B]`` when the tasks have one output in all, else
    ``[B, W]``. The layout comes from ``tasks`` alone, so fx can trace it (the export does)."""
    if all(t.type == "binary" for t in tasks):
        return torch.sigmoid(logits)
    width = sum(t.width for t in tasks)
    parts = []
    for o, t in zip(split_outputs(logits, tasks), tasks):
        p = torch.sigmoid(o) if t.type == "binary" else o.softmax(dim=1) if t.type == "multiclass" else o
        parts.append(p.reshape(-1, t.width))
    out = torch.cat(parts, dim=1)
    return out.squeeze(1) if width == 1 else out


def require_binary(schema: FeatureSchema, *, model: str, why: str) -> None:
    """Raises a ConfigError naming ``features.label`` unless every task of ``schema`` is binary."""
    other = [t for t in schema.tasks if t.type != "binary"]
    if other:
        raise ConfigError(f"model '{model}' {why}, so its labels must be binary, but features.label '{other[0].name}' is "
                          f"{other[0].type}; use a model that takes any task type (e.g. mmoe, sharedbottom, ple for several "
                          "tasks, dlrm or dcnv2 for one) or declare the label binary")
