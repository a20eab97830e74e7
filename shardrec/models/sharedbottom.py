"""Shared-Bottom (Caruana 1997): one MLP over the input that every task shares, then a tower per task."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.models.layers import MLPConfig, check_layer_sizes, mlp_block
from shardrec.models.multitask import MultiTaskConfig, MultiTaskModel, Towers
from shardrec.models.registry import register


@dataclass(kw_only=True)
class SharedBottomConfig(MultiTaskConfig):
    """The ``model`` section for ``name: sharedbottom``."""

    bottom_layer_sizes: list[int] = field(default_factory=lambda: [64])
    """Widths of the shared ReLU MLP over [pooled embeddings, dense]."""
    bottom_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The shared bottom MLP (ReLU after every layer by default); unset keys: ``mlp``'s."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer_sizes(self.bottom_layer_sizes, key="model.bottom_layer_sizes")


class SharedBottom(MultiTaskModel):
    """Shared-Bottom multi-task model (Caruana 1997, "Multitask Learning"; the baseline of MMoE and PLE).

    x = [pooled embeddings, dense]; h = bottom MLP(x); logit_t = tower_t(h), one tower per label.
    Tables may have different embedding_dims.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        schema.label = ["click", "conversion"]
        model = SharedBottom(schema=schema, config=SharedBottomConfig(), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model.eval()(torch.randn(2, 3), kjt)  # [2, 2]: click, conversion
    """

    def __init__(self, *, schema: FeatureSchema, config: SharedBottomConfig, device: torch.device) -> None:
        super().__init__(schema=schema, weights=config.task_weights, model="sharedbottom", device=device)
        self.bottom = mlp_block(self.input_dim, config.bottom_layer_sizes, config=config.bottom_mlp.over(config.mlp),
                                key="model.bottom_mlp", final_activation=True, device=device)
        self.towers = Towers(
            config.bottom_layer_sizes[-1], num_tasks=self.num_tasks, layer_sizes=config.tower_layer_sizes, widths=self.task_widths,
            mlp=config.tower_mlp.over(config.mlp), device=device,
        )

    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Logits ``[B, T]`` (a 1-tuple of them in training mode)."""
        h = self.bottom(self.embed(dense_features, sparse_features))
        return self.outputs(self.towers([h] * self.num_tasks))


@register("sharedbottom", SharedBottomConfig, multi_task=True)
def build_sharedbottom(config: SharedBottomConfig, *, schema: FeatureSchema, device: torch.device) -> SharedBottom:
    """Builds a Shared-Bottom model for ``schema`` on ``device``."""
    return SharedBottom(schema=schema, config=config, device=device)
