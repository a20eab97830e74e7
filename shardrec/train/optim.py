"""Optimizers: a sparse one fused into the embedding kernels and a dense torch.optim one, combined."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from shardrec.sharding.shardable import fused_optimizer_class
from shardrec.train.config import DenseOptimizerConfig, SparseOptimizerConfig


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
        cls, kwargs = fused_optimizer_class(sparse)
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
