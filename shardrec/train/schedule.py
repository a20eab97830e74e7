"""Learning-rate schedule: linear warm-up, then constant, linear or cosine decay, for both optimizers.

The schedule is a function of the step alone, so a resumed run continues it exactly from the
checkpoint's step. It scales every parameter group's configured learning rate, the fused
embedding optimizer's included: torchrec's fused optimizer hands its group's ``lr`` to the FBGEMM
kernel in ``step()``, which does no update itself (the update ran inside backward), so
:meth:`LRSchedule.apply` calls it right away and the next backward already uses the new rate.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from torchrec.optim.keyed import KeyedOptimizer

from shardrec.train.config import LRScheduleConfig



def lr_factor(cfg: LRScheduleConfig, step: int, *, total_steps: int) -> float:
    """Multiplier of the learning rate for training step ``step`` (1-based)."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    span = cfg.decay_steps or max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    shape = 1.0 - progress if cfg.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_ratio + (1.0 - cfg.min_ratio) * shape


class LRSchedule:
    """Sets every parameter group's rate to its configured value times :func:`lr_factor`."""

    def __init__(self, cfg: LRScheduleConfig, *, optimizer: KeyedOptimizer, model: nn.Module, total_steps: int) -> None:
        self.cfg, self.optimizer, self.total_steps = cfg, optimizer, total_steps
        self.fused: Any = getattr(model, "fused_optimizer", None)
        self.base = [float(g["lr"]) for g in optimizer.param_groups]
        self.factor = 1.0

    def apply(self, step: int) -> None:
        """Rates for training step ``step`` (1-based), before it runs."""
        self.factor = lr_factor(self.cfg, step, total_steps=self.total_steps)
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * self.factor  # type: ignore[index]
        if self.fused is not None:
            self.fused.step()  # only hands the new rate to the FBGEMM kernels

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records (the schedule itself follows from the step)."""
        return {"factor": self.factor, "base_lrs": self.base}
