"""Rocket Launching (Zhou et al. 2018): a light net trained jointly with a booster net that shares
its lower layers and guides it through a hint loss; only the light net serves."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import (
    MLPConfig,
    build_ebc_if_tables,
    check_features,
    check_layer_sizes,
    embedding_output_dim,
    mlp_block,
    pooled_embeddings,
)
from shardrec.models.registry import register
from shardrec.models.tasks import task_loss


@dataclass(kw_only=True)
class RocketLaunchingConfig:
    """The ``model`` section for ``name: rocket_launching``."""

    shared_layer_sizes: list[int] = field(default_factory=list)
    """Widths of an MLP over [pooled embeddings, dense] that both nets share; empty: they share
    the embeddings only."""
    booster_layer_sizes: list[int] = field(default_factory=lambda: [512, 256, 128])
    """Hidden widths of the booster net, used in training only; a width-1 logit layer follows."""
    light_layer_sizes: list[int] = field(default_factory=lambda: [128])
    """Hidden widths of the light net, the one that serves; a width-1 logit layer follows."""
    hint_weight: float = 1.0
    """Weight lambda of the hint loss, the mean squared difference of the two nets' logits."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """Activation, dropout, norm of every MLP block of the model (:class:`shardrec.models.layers.MLPConfig`); the blocks' own sections below override it key by key."""
    shared_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The shared MLP (with ``shared_layer_sizes``; ReLU after every layer by default); unset keys: ``mlp``'s."""
    light_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The light net, ending in its logit; unset keys: ``mlp``'s."""
    booster_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The booster net, ending in its logit; unset keys: ``mlp``'s."""

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.shared_layer_sizes):
            raise ConfigError(f"'model.shared_layer_sizes' must hold positive widths, got {self.shared_layer_sizes}")
        check_layer_sizes(self.booster_layer_sizes, key="model.booster_layer_sizes")
        check_layer_sizes(self.light_layer_sizes, key="model.light_layer_sizes")
        if self.hint_weight < 0:
            raise ConfigError(f"'model.hint_weight' must be >= 0, got {self.hint_weight}")


class RocketLaunching(nn.Module):
    """Rocket Launching from Zhou et al. 2018, "Rocket Launching: A Universal and Efficient
    Framework for Training Well-performing Light Net".

    The embeddings (and ``shared_layer_sizes`` layers over [pooled embeddings, dense]) feed a
    booster MLP and a light MLP, each ending in one logit. Training minimizes
    CE(light) + CE(booster) + lambda * MSE(light logit, booster logit), with the booster's logit
    detached in the hint term: the paper's gradient block, so the hint pulls the light net (and the
    shared layers through it) toward the booster and never the booster toward the light net. In
    training mode forward returns ``(light, booster)`` for :meth:`loss`; in eval mode it returns the
    light net's logits alone, which is all that serves. Tables may have different embedding_dims;
    a schema may have ids alone or dense features alone.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        model = RocketLaunching(schema=schema, config=RocketLaunchingConfig(), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        light, booster = model(torch.randn(2, 3), kjt)  # [2] each, in training mode
        logits = model.eval()(torch.randn(2, 3), kjt)  # [2], the light net's
    """

    def __init__(self, *, schema: FeatureSchema, config: RocketLaunchingConfig, device: torch.device) -> None:
        super().__init__()
        check_features(schema, model="rocket_launching")
        self.feature_names = schema.sparse_names
        self.hint_weight = config.hint_weight
        self.ebc = build_ebc_if_tables(schema, device=device)
        width = embedding_output_dim(schema) + len(schema.dense)
        self.shared: nn.Module = nn.Identity()
        if config.shared_layer_sizes:
            self.shared = mlp_block(width, config.shared_layer_sizes, config=config.shared_mlp.over(config.mlp), key="model.shared_mlp",
                                    final_activation=True, device=device)
            width = config.shared_layer_sizes[-1]
        self.tasks = schema.tasks
        self.light = mlp_block(width, [*config.light_layer_sizes, schema.output_width], config=config.light_mlp.over(config.mlp),
                               key="model.light_mlp", logit=True, device=device)
        self.booster = mlp_block(width, [*config.booster_layer_sizes, schema.output_width], config=config.booster_mlp.over(config.mlp),
                                 key="model.booster_mlp", logit=True, device=device)

    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training: ``(light, booster)`` logits ``[B]`` each; eval: the light logits ``[B]``."""
        emb = pooled_embeddings(self.ebc, sparse_features, self.feature_names)
        shared = self.shared(torch.cat([*emb, dense_features], dim=1))
        light = self.light(shared).squeeze(-1)
        if not self.training:
            return light
        return light, self.booster(shared).squeeze(-1)

    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """loss(light) + loss(booster) + hint_weight * MSE(light, booster detached), each net's loss
        the task's own (cross-entropy for a 0/1 label)."""
        light, booster = outputs
        hint = nn.functional.mse_loss(light, booster.detach())
        ce = task_loss(light, labels, self.tasks, single=True) + task_loss(booster, labels, self.tasks, single=True)
        return ce + self.hint_weight * hint


@register("rocket_launching", RocketLaunchingConfig)
def build_rocket_launching(
    config: RocketLaunchingConfig, *, schema: FeatureSchema, device: torch.device
) -> RocketLaunching:
    """Builds a Rocket Launching model for ``schema`` on ``device``."""
    return RocketLaunching(schema=schema, config=config, device=device)
