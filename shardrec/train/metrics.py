"""Evaluation metrics reduced across ranks, and the JSON-lines metrics log."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shardrec.data.schema import LabelConfig
from shardrec.models.tasks import label_columns, split_outputs


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for 0/1 ``labels``, ties counted half (Mann-Whitney U)."""
    labels = labels.double()
    n_pos = float(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = torch.argsort(scores.double())
    sorted_scores = scores.double()[order]
    ranks = torch.empty_like(sorted_scores)
    # Average ranks over runs of tied scores.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    return float((ranks[labels.bool()].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy of ``logits`` against 0/1 ``labels``."""
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), labels.double()))


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenation of 1-d ``t`` from every rank (ranks may hold different lengths)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    n = torch.tensor([t.numel()], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def regression_metrics(values: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """RMSE, MAE and R² (1 - SSE / SST; NaN when the labels are constant) of predicted ``values``."""
    err = values.double() - labels.double()
    sst = float(((labels.double() - labels.double().mean()) ** 2).sum())
    r2 = 1.0 - float((err**2).sum()) / sst if sst > 0 else math.nan
    return {"rmse": float(err.pow(2).mean().sqrt()), "mae": float(err.abs().mean()), "r2": r2}


def multiclass_metrics(logits: torch.Tensor, labels: torch.Tensor, *, top_k: int = 3) -> dict[str, float]:
    """Accuracy, log loss (softmax cross-entropy) and, with more than ``top_k`` classes, top-k accuracy."""
    y = labels.long()
    out = {"accuracy": float((logits.argmax(dim=1) == y).double().mean()),
           "log_loss": float(torch.nn.functional.cross_entropy(logits.double(), y))}
    if logits.shape[1] > top_k:
        hit = (logits.topk(top_k, dim=1).indices == y[:, None]).any(dim=1)
        out[f"top{top_k}_accuracy"] = float(hit.double().mean())
    return out


def task_metrics(outputs: torch.Tensor, labels: torch.Tensor, task: LabelConfig) -> dict[str, float]:
    """The metrics of one task's type over all of its outputs and labels (on the host)."""
    if task.type == "regression":
        return regression_metrics(outputs, labels)
    if task.type == "multiclass":
        return multiclass_metrics(outputs, labels)
    return {"auc": auc(outputs, labels), "log_loss": log_loss(outputs, labels)}


def eval_metrics(logits: torch.Tensor, labels: torch.Tensor, tasks: list[LabelConfig] | None = None) -> dict[str, float]:
    """Each task's metrics over the predictions of every rank (:func:`task_metrics`; ``tasks``
    None: a binary task per label column). With several tasks, task i's are ``<name>_task<i>``
    and each metric's mean over the tasks that have it is ``<name>``.

    The tensors stay on their device for the gather (nccl gathers cuda tensors only); the
    metrics are computed on the host.
    """
    width = 1 if labels.dim() == 1 else labels.shape[1]
    tasks = tasks or [LabelConfig(name=f"label{i}") for i in range(width)]
    per_task = []
    for out, y, task in zip(split_outputs(logits, tasks), label_columns(labels, tasks, single=labels.dim() == 1), tasks):
        all_out = gather(out.float().reshape(-1).contiguous()).cpu().reshape(-1, *out.shape[1:])
        per_task.append(task_metrics(all_out, gather(y.float().contiguous()).cpu(), task))
    rows = int(gather(torch.tensor([labels.shape[0]], device=labels.device)).sum())
    if len(tasks) == 1:
        return {**per_task[0], "rows": rows}
    out_metrics: dict[str, float] = {"rows": rows}
    names = list(dict.fromkeys(k for m in per_task for k in m))
    for name in names:
        out_metrics.update({f"{name}_task{i}": m[name] for i, m in enumerate(per_task) if name in m})
        values = [m[name] for m in per_task if name in m]
        out_metrics[name] = sum(values) / len(values)
    return out_metrics


HEADLINE = ("auc", "rmse", "mae", "r2", "accuracy", "log_loss")
"""Metrics the progress line shows, when a run has them."""


TENSORBOARD_KINDS = ("train", "eval")
"""Records also written as TensorBoard scalars, each numeric field as ``<kind>/<field>`` at its step."""


class MetricsLog:
    """Appends one JSON object per line to ``path``; only rank 0 writes. With ``tensorboard`` (a
    folder), train and eval records also go there as TensorBoard scalars."""

    def __init__(self, path: Path, *, enabled: bool, tensorboard: Path | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self.tensorboard = tensorboard
        self._writer: Any = None

    def write(self, kind: str, **fields: Any) -> None:
        """Appends ``{"kind": kind, "time": ..., **fields}``."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, "time": round(time.time(), 3), **fields}) + "\n")
        if self.tensorboard is not None and kind in TENSORBOARD_KINDS and "step" in fields:
            writer = self._tensorboard_writer()
            for name, value in fields.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(f"{kind}/{name}", value, global_step=int(fields["step"]))
            if kind == "eval":
                writer.flush()  # an evaluation is worth seeing at once; train scalars flush on their own

    def _tensorboard_writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where used

            self._writer = SummaryWriter(log_dir=str(self.tensorboard), flush_secs=10)
        return self._writer

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer, if one was opened."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
