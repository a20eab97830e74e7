"""The one MLP every model uses (torchrec's ``modules/mlp.py`` and timm's ``Mlp`` have the shape),
its config (``model.mlp`` and a model's per-block sections) and its batch norm over the last
dimension."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from shardrec.errors import ConfigError
from shardrec.models.layers.activation import ACTIVATIONS, Activation, Dice, build_activation

Norm = Literal["batch", "layer", "none"]
"""batch: :class:`BatchNorm` over the last dimension; layer: ``nn.LayerNorm``; none."""
NORMS: tuple[str, ...] = get_args(Norm)


class BatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over the last dimension of ``[..., C]`` inputs (``[B, C]``, ``[B, L, C]``).

    In training, ``mask [...]`` (the real positions of a padded sequence) restricts the batch
    statistics, and their running averages, to the real positions; padded positions come out as 0.
    In eval the running statistics normalize every position, so rows do not depend on each other.
    Always tracks running statistics with a fixed ``momentum`` (BatchNorm1d's 0.1 by default).

    Example::

        norm = BatchNorm(4, device=torch.device("cpu"))
        y = norm(torch.randn(2, 5, 4), torch.tensor([[True] * 5, [True, False, False, False, False]]))
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., C]`` -> ``[..., C]``."""
        flat = x.reshape(-1, self.num_features)
        if self.training and mask is not None:
            keep = mask.reshape(-1)
            return torch.zeros_like(flat).index_put((keep,), self._normalize(flat[keep])).reshape(x.shape)
        return self._normalize(flat).reshape(x.shape)

    def _normalize(self, flat: torch.Tensor) -> torch.Tensor:
        # F.batch_norm directly: BatchNorm1d.forward branches on the input's rank, which the
        # training pipeline's and the exporter's fx tracers cannot evaluate.
        if self.training:
            self.num_batches_tracked.add_(1)
        # The statistics stay fp32 under bf16 autocast: a bf16 batch mean and variance (8-bit mantissa)
        # would drift the running averages; the output goes back to the input's dtype.
        out = nn.functional.batch_norm(flat.float(), self.running_mean, self.running_var, self.weight, self.bias,
                                       self.training, self.momentum, self.eps)
        return out.to(flat.dtype)


class MLP(nn.Sequential):
    """Stack of Linear layers, each but the last followed by an optional norm, an activation and an
    optional Dropout, in that order (the last one too with ``final_activation``).

    An ``nn.Sequential`` so that parameters are named by position (``mlp.0.weight``,
    ``mlp.2.weight``, ...) and the layers can be listed and indexed. Without a norm or a dropout
    the layers are exactly ``[Linear, activation, ..., Linear]``.

    Args:
        in_features: width of the input.
        layer_sizes: output width of each Linear layer, in order.
        activation: what follows each hidden Linear layer (:data:`Activation`).
        final_activation: put norm, activation and dropout after the last layer too; False leaves it linear.
        dropout: None adds no Dropout; a rate (0 included, so that layer indices do not depend
            on it) adds a Dropout after each activation.
        norm: "batch" (:class:`BatchNorm`) or "layer" (``nn.LayerNorm``) between each Linear
            and its activation; "none" adds nothing.
        device: where the weights are created.

    Example::

        mlp = MLP(16, [8, 1], activation="dice", final_activation=False, device=torch.device("cpu"))
        # [Linear(16, 8), Dice(8), Linear(8, 1)]; Dice's statistics skip the padded positions:
        out = mlp(torch.randn(2, 5, 16), mask=torch.ones(2, 5, dtype=torch.bool))  # [2, 5, 1]
        MLP(16, [8, 1], norm="batch", dropout=0.2, final_activation=False, device=torch.device("cpu"))
        # [Linear(16, 8), BatchNorm(8), ReLU, Dropout(0.2), Linear(8, 1)]
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: list[int],
        *,
        activation: Activation = "relu",
        final_activation: bool = True,
        dropout: float | None = None,
        norm: Norm = "none",
        device: torch.device,
    ) -> None:
        layers: list[nn.Module] = []
        widths = [in_features, *layer_sizes]
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(n_in, n_out, device=device))
            if i < len(layer_sizes) - 1 or final_activation:
                layers += _after_linear(n_out, activation=activation, dropout=dropout, norm=norm, device=device)
        super().__init__(*layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., in_features]`` -> ``[..., layer_sizes[-1]]``; ``mask [...]`` (the positions
        of ``x`` that are real) restricts the batch statistics of Dice and BatchNorm in training
        and is ignored by other layers."""
        for layer in self:
            x = layer(x, mask) if isinstance(layer, (Dice, BatchNorm)) else layer(x)
        return x


def _after_linear(width: int, *, activation: Activation, dropout: float | None, norm: Norm, device: torch.device) -> list[nn.Module]:
    layers: list[nn.Module] = []
    if norm == "batch":
        layers.append(BatchNorm(width, device=device))
    elif norm == "layer":
        layers.append(nn.LayerNorm(width, device=device))
    elif norm != "none":
        raise ValueError(f"unknown norm '{norm}'; known: {', '.join(NORMS)}")
    layers.append(build_activation(activation, width, device=device))
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    return layers


@dataclass(kw_only=True)
class MLPConfig:
    """How a model's MLP blocks are made: the ``model.mlp`` section, and a model's per-block
    sections (``model.tower_mlp``, ...), whose unset keys fall back to ``model.mlp``'s.

    Every key unset keeps the model as it is without the section: the same layers, parameters named
    the same and initialized the same (docs/models.md, "MLP blocks").

    Example (YAML)::

        model:
          name: mmoe
          mlp: {activation: prelu, dropout: 0.2, norm: batch}   # experts and towers
          tower_mlp: {dropout: 0.0}                              # towers: prelu, batch norm, no dropout
    """

    activation: Activation | None = None
    """After each hidden layer: relu, leaky_relu, prelu, gelu, silu, dice, sigmoid or tanh; unset: the model's own (relu unless its docs say otherwise)."""
    dropout: float | None = None
    """Dropout rate after each hidden layer's activation, in [0, 1); unset: no Dropout layer (0 keeps one, so its checkpoints load at any rate)."""
    norm: Norm | None = None
    """Between each hidden Linear and its activation: batch (BatchNorm1d over the last dimension; running statistics in eval), layer (LayerNorm) or none; unset: none."""
    final_activation: bool | None = None
    """Norm, activation and dropout after the last layer too; unset: the block's default. A block whose last layer is a logit rejects true."""

    def __post_init__(self) -> None:
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"'activation' must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.norm is not None and self.norm not in NORMS:
            raise ValueError(f"'norm' must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"'dropout' must be a rate in [0, 1) (or unset for no Dropout layer), got {self.dropout}")

    def over(self, base: MLPConfig) -> MLPConfig:
        """These settings, each unset one taken from ``base`` (a block's section over ``model.mlp``)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return MLPConfig(**{k: getattr(base, k) if v is None else v for k, v in own.items()})


def mlp_block(
    in_features: int,
    layer_sizes: list[int],
    *,
    config: MLPConfig,
    key: str,
    activation: Activation = "relu",
    final_activation: bool = False,
    logit: bool = False,
    device: torch.device,
) -> MLP:
    """The MLP ``config`` describes; its unset keys take the block's defaults ``activation`` and
    ``final_activation``.

    Args:
        config: the block's settings, already merged over ``model.mlp`` (:meth:`MLPConfig.over`).
        key: the YAML section ``config`` comes from, named in errors.
        logit: the last layer gives a logit, which ``final_activation: true`` would squash.

    Raises:
        ConfigError: ``final_activation`` is true on a logit block.
    """
    final = final_activation if config.final_activation is None else config.final_activation
    if logit and final:
        raise ConfigError(f"'{key}.final_activation' cannot be true (set there or in 'model.mlp'): the last layer of this "
                          "block is the logit; set it only under a block whose output feeds another layer, or leave it unset")
    return MLP(in_features, layer_sizes, activation=config.activation or activation, final_activation=final,
               dropout=config.dropout, norm=config.norm or "none", device=device)
