"""MMoE (Ma et al. 2018): experts shared by every task, mixed by one softmax gate per task."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import MLPConfig, check_layer_sizes
from shardrec.models.multitask import Experts, Gate, MultiTaskConfig, MultiTaskModel, Towers
from shardrec.models.registry import register


@dataclass(kw_only=True)
class MMoEConfig(MultiTaskConfig):
    """The ``model`` section for ``name: mmoe``."""

    num_experts: int = 4
    """Number of expert networks n that every task's gate mixes."""
    expert_layer_sizes: list[int] = field(default_factory=lambda: [64])
    """Widths of each expert's ReLU MLP over [pooled embeddings, dense]; the last is the expert output."""
    expert_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The experts' MLPs (ReLU after every layer by default); unset keys: ``mlp``'s."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts < 2:
            # A softmax over one expert is always 1: the gates would learn nothing.
            raise ConfigError(
                f"'model.num_experts' must be >= 2, got {self.num_experts}; one shared expert is model 'sharedbottom'"
            )
        check_layer_sizes(self.expert_layer_sizes, key="model.expert_layer_sizes")


class MMoE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts from Ma et al. 2018, "Modeling Task Relationships in Multi-task
    Learning with Multi-gate Mixture-of-Experts".

    x = [pooled embeddings, dense]; f_i(x) the n experts; task t's gate g_t(x) = softmax(W_t x);
    logit_t = tower_t(sum_i g_t(x)_i f_i(x)). Tables may have different embedding_dims.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        schema.label = ["click", "conversion"]
        model = MMoE(schema=schema, config=MMoEConfig(num_experts=4), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model.eval()(torch.randn(2, 3), kjt)  # [2, 2]: click, conversion
    """

    def __init__(self, *, schema: FeatureSchema, config: MMoEConfig, device: torch.device) -> None:
        super().__init__(schema=schema, weights=config.task_weights, model="mmoe", device=device)
        self.experts = Experts(
            self.input_dim, num_experts=config.num_experts, layer_sizes=config.expert_layer_sizes,
            mlp=config.expert_mlp.over(config.mlp), device=device,
        )
        self.gates = nn.ModuleList(
            Gate(self.input_dim, num_experts=config.num_experts, device=device) for _ in range(self.num_tasks)
        )
        self.towers = Towers(
            config.expert_layer_sizes[-1], num_tasks=self.num_tasks, layer_sizes=config.tower_layer_sizes, widths=self.task_widths,
            mlp=config.tower_mlp.over(config.mlp), device=device,
        )

    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Logits ``[B, T]`` (a 1-tuple of them in training mode)."""
        x = self.embed(dense_features, sparse_features)
        experts = self.experts(x)
        return self.outputs(self.towers([gate.mix(x, experts) for gate in self.gates]))


@register("mmoe", MMoEConfig, multi_task=True)
def build_mmoe(config: MMoEConfig, *, schema: FeatureSchema, device: torch.device) -> MMoE:
    """Builds an MMoE for ``schema`` on ``device``."""
    return MMoE(schema=schema, config=config, device=device)
