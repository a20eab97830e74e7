"""The activations the models' MLPs use, built by name: plain ones and the learned, per-channel
PReLU and Dice (DIN's data-adaptive activation)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

Activation = Literal["relu", "leaky_relu", "prelu", "gelu", "silu", "dice", "sigmoid", "tanh"]
"""relu, leaky_relu (slope 0.01), gelu, silu, sigmoid, tanh; prelu and dice learn one parameter per
channel (the last dimension)."""
ACTIVATIONS: tuple[str, ...] = get_args(Activation)


class PReLU(nn.PReLU):
    """``nn.PReLU`` with its ``num_parameters`` slopes over the LAST dimension, so that it works on
    ``[B, C]`` and on ``[B, L, C]`` alike (``nn.PReLU`` takes dimension 1 as the channels).

    Same parameter (``weight``, 0.25 at init) as ``nn.PReLU``, so state dicts are interchangeable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., C]`` -> ``x`` where positive, ``weight * x`` elsewhere."""
        return torch.where(x >= 0, x, self.weight * x)


class Dice(nn.Module):
    """Dice activation (Zhou et al. 2018): ``p * x + (1 - p) * alpha * x`` with
    ``p = sigmoid((x - E[x]) / sqrt(Var[x] + eps))`` per channel.

    As in the paper, training takes ``E[x]`` and ``Var[x]`` from the batch (over its valid
    positions only) and updates moving averages of them, ``running_mean`` and ``running_var``
    (buffers, like BatchNorm's); eval uses the moving averages, so a row's output does not depend
    on the other rows of its batch. :meth:`reset_running_stats` sets them to their initial values
    (0 and 1), which a model built on the meta device needs once it is materialized.

    Args:
        num_features: channels (last dimension of the input).
        eps: added to the variance, 1e-8 in the paper.
        momentum: weight of each training batch in the moving averages (BatchNorm's default).
        device: where ``alpha`` and the statistics are created.

    Example::

        dice = Dice(4, device=torch.device("cpu"))
        y = dice(torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool))  # training: batch statistics
        dice.eval()(torch.randn(1, 4))  # eval: the moving averages
    """

    def __init__(self, num_features: int, *, eps: float = 1e-8, momentum: float = 0.1, device: torch.device) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.empty(num_features, device=device))
        self.register_buffer("running_mean", torch.empty(num_features, device=device))
        self.register_buffer("running_var", torch.empty(num_features, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Moving mean 0 and variance 1: eval before any training step is a sigmoid gate on ``x``."""
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def reset_parameters(self) -> None:
        """``alpha = 0`` and fresh statistics (BatchNorm's ``reset_parameters`` resets its own too)."""
        nn.init.zeros_(self.alpha)
        self.reset_running_stats()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., C]``; ``mask [...]`` marks the positions the batch statistics are taken over."""
        if self.training:
            mean, var = self._batch_stats(x, mask)
            p = torch.sigmoid((x - mean) / torch.sqrt(var + self.eps))
        else:
            # batch_norm takes the statistics as arguments of an op on x, so fx (export) keeps them
            # buffers; ``var + eps`` alone would be folded into a constant.
            flat = x.reshape(-1, self.num_features)
            p = torch.sigmoid(nn.functional.batch_norm(flat, self.running_mean, self.running_var, training=False,
                                                       eps=self.eps).reshape(x.shape))
        return p * x + (1 - p) * self.alpha * x

    def _batch_stats(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, self.num_features)
        w = torch.ones_like(flat[:, :1]) if mask is None else mask.reshape(-1, 1).to(x.dtype)
        count = w.sum()
        n = count.clamp(min=1.0)
        mean = (flat * w).sum(dim=0) / n
        var = ((flat - mean).pow(2) * w).sum(dim=0) / n
        with torch.no_grad():
            # A batch without one valid position leaves the averages where they are.
            m = self.momentum * (count > 0).to(x.dtype)
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach())
        return mean, var


def build_activation(name: Activation, width: int, *, device: torch.device) -> nn.Module:
    """The activation ``name`` for ``width`` channels (the learned ones need the width)."""
    if name == "dice":
        return Dice(width, device=device)
    if name == "prelu":
        return PReLU(width, device=device)
    plain: dict[str, type[nn.Module]] = {
        "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    }
    if name not in plain:
        raise ValueError(f"unknown activation '{name}'; known: {', '.join(ACTIVATIONS)}")
    return plain[name]()
