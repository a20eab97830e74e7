"""Optimizers: a sparse one fused into the embedding kernels and a dense torch.optim one, combined."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from shardrec.errors import ConfigError


@dataclass(kw_only=True)
class SparseOptimizerConfig:
    """Optimizer of the embedding tables, run inside the fused embedding backward."""

    name: Literal["rowwise_adagrad", "adagrad", "adam", "sgd"] = "rowwise_adagrad"
    """Row-wise Adagrad keeps one accumulator per row: the usual choice for large tables."""
    lr: float = 0.05
    """Learning rate."""
    eps: float = 1e-8
    """Denominator epsilon of Adagrad and Adam."""
    weight_decay: float = 0.0
    """L2 penalty."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"train.sparse_optimizer.lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class DenseOptimizerConfig:
    """Optimizer of the dense (MLP) parameters and of data-parallel tables."""

    name: Literal["adam", "adamw", "adagrad", "sgd"] = "adam"
    """torch.optim optimizer."""
    lr: float = 1e-3
    """Learning rate."""
    weight_decay: float = 0.0
    """L2 penalty (decoupled for adamw)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"train.dense_optimizer.lr must be > 0, got {self.lr}")


def _sparse_class_and_kwargs(cfg: SparseOptimizerConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
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
    cls, kwargs = _sparse_class_and_kwargs(cfg)
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    params = [
        p for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)) for p in m.parameters()
    ]
    apply_optimizer_in_backward(cls, params, kwargs)


def _dense_factory(cfg: DenseOptimizerConfig) -> Any:
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
    cls = classes[cfg.name]
    return lambda params: cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class _GradScaledOptimizer(KeyedOptimizerWrapper):
    """Multiplies gradients by ``scale`` before each step."""

    def __init__(self, params: dict[str, nn.Parameter], factory: Any, *, scale: float) -> None:
        super().__init__(params, factory)
        self._scale = scale

    def step(self, closure: Any = None) -> None:
        for p in self.params.values():
            if p.grad is not None:
                p.grad.mul_(self._scale)
        super().step(closure)


def build_optimizer(
    model: nn.Module, *, dense: DenseOptimizerConfig, sparse: SparseOptimizerConfig, world_size: int
) -> KeyedOptimizer:
    """The sharded model's fused optimizer combined with optimizers over the other parameters.

    Data-parallel tables get no fused optimizer from torchrec: left alone they would fall to the
    dense optimizer with gradients averaged by DDP. To keep a table's training the same whatever
    its sharding type, they get the sparse optimizer, with gradients scaled by the world size:
    sharded tables sum the gradients of every rank's mean loss, DDP averages them.
    """
    rest = dict(in_backward_optimizer_filter(model.named_parameters()))
    tables = {k: p for k, p in rest.items() if ".embedding_bags." in k or ".embeddings." in k}
    dense_params = {k: p for k, p in rest.items() if k not in tables}
    parts: list[KeyedOptimizer] = [model.fused_optimizer]  # type: ignore[list-item]
    if tables:
        cls, kwargs = _sparse_class_and_kwargs(sparse)
        parts.append(_GradScaledOptimizer(tables, lambda ps: cls(ps, **kwargs), scale=float(world_size)))
    if dense_params:
        parts.append(KeyedOptimizerWrapper(dense_params, _dense_factory(dense)))
    return CombinedOptimizer(parts)


def init_optimizer_state(optimizer: KeyedOptimizer) -> None:
    """Creates the lazily made state of the non-fused optimizers, so a checkpoint can load into it.

    torch optimizers make their state at the first step; a resumed run must have it in place
    before DCP loads in place, or that state would silently start from zero. Runs a step with
    zero gradients; the model weights are loaded after this, so its effect is overwritten.
    """
    parts = optimizer.optimizers if isinstance(optimizer, CombinedOptimizer) else [("", optimizer)]
    for _, part in parts:
        if isinstance(part, KeyedOptimizerWrapper):
            part.init_state()
            part.zero_grad(set_to_none=True)
