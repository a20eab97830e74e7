"""The activations the models' MLPs use, built by name: plain ones and the learned, per-channel
PReLU and Dice (DIN's data-adaptive activation)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Activation = Literal["relu", "leaky_relu", "gelu", "prelu", "dice"]
"""relu, leaky_relu (slope 0.01), gelu; prelu and dice learn one parameter per channel."""


class Dice(nn.Module):
    """Dice activation (Zhou et al. 2018): ``p * x + (1 - p) * alpha * x`` with
    ``p = sigmoid((x - E[x]) / sqrt(Var[x] + eps))`` per channel.

    Unlike the paper, which switches to moving averages at inference, the mean and variance always
    come from the batch at hand (over its valid positions): the model holds no buffers, since
    DistributedModelParallel re-creates meta buffers as zeros.

    Args:
        num_features: channels (last dimension of the input).
        eps: added to the variance, 1e-8 in the paper.
        device: where ``alpha`` is created.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-8, device: torch.device) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.alpha = nn.Parameter(torch.empty(num_features, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.alpha)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., C]``; ``mask [...]`` marks the positions the statistics are taken over."""
        flat = x.reshape(-1, self.num_features)
        w = torch.ones_like(flat[:, :1]) if mask is None else mask.reshape(-1, 1).to(x.dtype)
        n = w.sum().clamp(min=1.0)
        mean = (flat * w).sum(dim=0) / n
        var = ((flat - mean).pow(2) * w).sum(dim=0) / n
        p = torch.sigmoid((x - mean) / torch.sqrt(var + self.eps))
        return p * x + (1 - p) * self.alpha * x


def build_activation(name: Activation, width: int, *, device: torch.device) -> nn.Module:
    """The activation ``name`` for ``width`` channels (the learned ones need the width)."""
    if name == "dice":
        return Dice(width, device=device)
    if name == "prelu":
        return nn.PReLU(width, device=device)
    plain: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU}
    if name not in plain:
        raise ValueError(f"unknown activation '{name}'; known: relu, leaky_relu, gelu, prelu, dice")
    return plain[name]()
