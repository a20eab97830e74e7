"""The model wrapper the pipelines drive, and the choice of training pipeline."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipeline, TrainPipelineBase, TrainPipelineSparseDist



PipelineKind = Literal["auto", "sparse_dist", "base"]


def resolve_pipeline(kind: PipelineKind) -> Literal["sparse_dist", "base"]:
    """auto -> sparse_dist: on cuda it overlaps input distribution with compute on side streams,
    and on cpu/gloo it measured 5-7% faster than base too (docs/benchmarks.md)."""
    return "sparse_dist" if kind == "auto" else kind


def make_pipeline(
    kind: PipelineKind, *, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> TrainPipeline:
    """A torchrec training pipeline of ``kind`` over the sharded ``model``."""
    if resolve_pipeline(kind) == "sparse_dist":
        return TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)
    return TrainPipelineBase(model, optimizer, device)


def eval_model(pipeline: TrainPipeline) -> nn.Module:
    """The pipeline's model with its original forwards (sparse_dist rewrites them while attached)."""
    if isinstance(pipeline, TrainPipelineSparseDist):
        return pipeline.detach()
    return pipeline._model  # noqa: SLF001 - TrainPipelineBase keeps it there and offers no getter


def resume_training(pipeline: TrainPipeline) -> None:
    """Re-attaches a sparse_dist pipeline after :func:`eval_model`."""
    if isinstance(pipeline, TrainPipelineSparseDist):
        pipeline.attach()
