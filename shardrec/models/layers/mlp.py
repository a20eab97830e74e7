"""The one MLP every model uses (torchrec's ``modules/mlp.py`` and timm's ``Mlp`` have the shape)."""

from __future__ import annotations

import torch
from torch import nn

from shardrec.models.layers.activation import Activation, Dice, build_activation


class MLP(nn.Sequential):
    """Stack of Linear layers with an activation between them.

    An ``nn.Sequential`` so that parameters are named by position (``mlp.0.weight``,
    ``mlp.2.weight``, ...) and the layers can be listed and indexed.

    Args:
        in_features: width of the input.
        layer_sizes: output width of each Linear layer, in order.
        activation: what follows each hidden Linear layer (:data:`Activation`).
        final_activation: put the activation after the last layer too; False leaves it linear.
        dropout: None adds no Dropout; a rate (0 included, so that layer indices do not depend
            on it) adds a Dropout after each hidden layer's activation, none after the last.
        device: where the weights are created.

    Example::

        mlp = MLP(16, [8, 1], activation="dice", final_activation=False, device=torch.device("cpu"))
        # [Linear(16, 8), Dice(8), Linear(8, 1)]; Dice's statistics skip the padded positions:
        out = mlp(torch.randn(2, 5, 16), mask=torch.ones(2, 5, dtype=torch.bool))  # [2, 5, 1]
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: list[int],
        *,
        activation: Activation = "relu",
        final_activation: bool = True,
        dropout: float | None = None,
        device: torch.device,
    ) -> None:
        layers: list[nn.Module] = []
        widths = [in_features, *layer_sizes]
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(n_in, n_out, device=device))
            hidden = i < len(layer_sizes) - 1
            if hidden or final_activation:
                layers.append(build_activation(activation, n_out, device=device))
            if hidden and dropout is not None:
                layers.append(nn.Dropout(dropout))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., in_features]`` -> ``[..., layer_sizes[-1]]``; ``mask [...]`` (the positions
        of ``x`` that are real) restricts Dice's statistics and is ignored by other activations."""
        for layer in self:
            x = layer(x, mask) if isinstance(layer, Dice) else layer(x)
        return x
