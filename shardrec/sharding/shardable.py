"""The module every job shards: a zoo model built on the meta device, wrapped for the training
pipelines, with the sparse optimizer fused into its embedding tables.

The trainer shards it and the planner (``shardrec plan``) plans it, so both go through
:func:`meta_model`: the planner's memory estimate includes the fused optimizer's state only when
the optimizer is fused before planning, exactly as the trainer does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from shardrec.data.batch import Batch
from shardrec.data.schema import LabelConfig
from shardrec.errors import ConfigError
from shardrec.job import JobConfig
from shardrec.models import registry
from shardrec.models.layers.embedding import table_configs
from shardrec.train.config import SparseOptimizerConfig


class TrainModule(nn.Module):
    """Wraps a zoo model: ``forward(batch) -> (loss, (loss, logits, labels))`` as torchrec pipelines expect.

    With ``precision="bf16"`` the model's forward runs under ``torch.autocast`` in bfloat16 (on the
    batch's device type); its outputs are cast back to fp32 before the loss, so losses (a softmax
    over a large catalogue included) and metrics are computed in fp32.
    """

    def __init__(self, model: nn.Module, *, tasks: list[LabelConfig] | None = None, single_label: bool = True,
                 precision: str = "fp32", device_type: str = "cpu") -> None:
        super().__init__()
        self.model = model
        self.tasks = tasks
        self.single_label = single_label
        self.autocast = precision == "bf16"
        self.device_type = device_type
        """Where the dense parts compute (autocast's device type): a plain string, which the
        pipeline's tracer can read where it cannot read a batch tensor's device."""

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            outputs = self.model(batch.dense_features, batch.sparse_features)
        outputs = to_fp32(outputs)
        loss, logits = registry.training_loss(self.model, outputs, batch.labels, self.tasks, single=self.single_label)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def to_fp32(outputs: Any) -> Any:
    """``outputs`` (a tensor, or a tuple or named tuple of them) with every floating tensor in fp32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, tuple):
        items = [to_fp32(o) for o in outputs]
        return type(outputs)(*items) if hasattr(outputs, "_fields") else tuple(items)
    return outputs


def check_precision(precision: str, device: torch.device) -> None:
    """Raises a ConfigError when ``device`` cannot compute in ``precision`` at speed."""
    if precision != "bf16":
        return
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.precision: bf16, but GPU '{torch.cuda.get_device_name(device)}' has no bf16 support; "
                              "use fp32")
    elif not cpu_has_bf16():
        raise ConfigError("train.precision: bf16, but this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 "
                          "would run slower than fp32; use fp32")


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bf16 natively: the avx512_bf16 or amx_bf16 flag on Linux; elsewhere
    oneDNN's own answer (which also says yes where it only emulates bf16 with AVX512)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class MetaModel:
    """A job's model on the meta device, ready to plan and shard."""

    module: TrainModule
    """The wrapped zoo model, its sparse optimizer fused."""
    tables: dict[str, tuple[int, int]]
    """Every embedding table: name -> (rows, dim)."""


def meta_model(job: JobConfig, *, device_type: str | None = None) -> MetaModel:
    """Builds ``job``'s model on meta, wraps it in a TrainModule and fuses the sparse optimizer.

    ``device_type`` (the device the tables will compute on) also checks that its fused kernels
    implement the job's sparse optimizer; None skips the check (planning for another machine).
    """
    if device_type is not None:
        check_sparse_optimizer(job.train.sparse_optimizer, device_type=device_type)
    model = registry.build_model(job.model_name, job.model_params, schema=job.features, device=torch.device("meta"))
    module = TrainModule(model, tasks=job.features.tasks, single_label=job.features.single_label, precision=job.train.precision,
                         device_type=device_type or "cpu")
    fuse_sparse_optimizer(module, job.train.sparse_optimizer)
    return MetaModel(module=module, tables=model_tables(module))


def model_tables(module: nn.Module) -> dict[str, tuple[int, int]]:
    """Every embedding table of ``module``: name -> (rows, dim)."""
    return {cfg.name: (cfg.num_embeddings, cfg.embedding_dim) for cfg in table_configs(module)}


def fused_optimizer_class(cfg: SparseOptimizerConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The torch optimizer class and keyword arguments that stand for ``cfg`` in the fused kernels."""
    if cfg.name == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.name == "adagrad":
        return torch.optim.Adagrad, {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.name == "adam":
        return torch.optim.Adam, {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    return torch.optim.SGD, {"lr": cfg.lr, "weight_decay": cfg.weight_decay}


CPU_FUSED = ("rowwise_adagrad", "adagrad", "sgd")
"""Sparse optimizers FBGEMM's CPU embedding kernels implement (adam is fused on CUDA only)."""


def check_sparse_optimizer(cfg: SparseOptimizerConfig, *, device_type: str) -> None:
    """Raises a ConfigError when the fused kernels of ``device_type`` lack ``cfg.name``."""
    if device_type == "cpu" and cfg.name not in CPU_FUSED:
        raise ConfigError(
            f"train.sparse_optimizer.name '{cfg.name}' has no fused CPU kernel in FBGEMM; on cpu choose one of "
            f"{', '.join(CPU_FUSED)}, or compute on cuda (sharding.compute_device)"
        )


def fuse_sparse_optimizer(model: nn.Module, cfg: SparseOptimizerConfig) -> None:
    """Marks every embedding table's weight so sharding fuses ``cfg``'s optimizer into its kernel.

    Must run on the unsharded model, before DistributedModelParallel.
    """
    cls, kwargs = fused_optimizer_class(cfg)
    params = [
        p for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)) for p in m.parameters()
    ]
    apply_optimizer_in_backward(cls, params, kwargs)
