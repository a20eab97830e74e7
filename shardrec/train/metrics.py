"""Evaluation metrics reduced across ranks, and the JSON-lines metrics log."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


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


def eval_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUC and log loss over the predictions of every rank; ``[N, T]`` inputs (T tasks) give each
    task's as ``auc_task<i>``/``log_loss_task<i>`` and their means as ``auc``/``log_loss``.

    The tensors stay on their device for the gather (nccl gathers cuda tensors only); the
    metrics are computed on the host.
    """
    if logits.dim() == 1:
        all_logits, all_labels = gather(logits.float()).cpu(), gather(labels.float()).cpu()
        return {"auc": auc(all_logits, all_labels), "log_loss": log_loss(all_logits, all_labels), "rows": all_labels.numel()}
    tasks = [eval_metrics(logits[:, i].contiguous(), labels[:, i].contiguous()) for i in range(logits.shape[1])]
    out: dict[str, float] = {"rows": tasks[0]["rows"]}
    for name in ("auc", "log_loss"):
        out.update({f"{name}_task{i}": t[name] for i, t in enumerate(tasks)})
        out[name] = sum(t[name] for t in tasks) / len(tasks)
    return out


class MetricsLog:
    """Appends one JSON object per line to ``path``; only rank 0 writes."""

    def __init__(self, path: Path, *, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def write(self, kind: str, **fields: Any) -> None:
        """Appends ``{"kind": kind, "time": ..., **fields}``."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, "time": round(time.time(), 3), **fields}) + "\n")
