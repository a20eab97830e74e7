"""PLE (Tang et al. 2020): Progressive Layered Extraction, stacked Customized Gate Control layers of
task-specific and shared experts."""

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
class PLEConfig(MultiTaskConfig):
    """The ``model`` section for ``name: ple``."""

    num_levels: int = 2
    """Extraction levels (CGC layers) stacked; 1 is the paper's single-level CGC."""
    num_task_experts: int = 1
    """Task-specific experts per task and level (m_k in the paper)."""
    num_shared_experts: int = 1
    """Shared experts per level (m_s in the paper)."""
    expert_layer_sizes: list[int] = field(default_factory=lambda: [64])
    """Widths of each expert's ReLU MLP; the last is the expert output, and the next level's input."""
    expert_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The experts' MLPs (ReLU after every layer by default); unset keys: ``mlp``'s."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("num_levels", "num_task_experts", "num_shared_experts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"'model.{key}' must be >= 1, got {getattr(self, key)}")
        check_layer_sizes(self.expert_layer_sizes, key="model.expert_layer_sizes")


class ExtractionLayer(nn.Module):
    """One extraction level (a Customized Gate Control layer), PLE Eq. 2-6.

    Task t's gate weighs its own experts and the shared ones, on task t's input:
    ``g_t = softmax(W_t x_t) [E_t(x_t), E_s(x_s)]``. Below the last level, a shared gate weighs every
    expert of the level on the shared input, ``g_s = softmax(W_s x_s) [E_1(x_1), ..., E_T(x_T), E_s(x_s)]``,
    giving the next level's shared input.

    Args:
        in_features: width of each input.
        num_tasks: number of tasks T.
        task_experts: experts per task.
        shared_experts: shared experts.
        layer_sizes: each expert's ReLU MLP widths.
        mlp: the experts' MLP settings (``model.expert_mlp`` over ``model.mlp``).
        final: the last level, which has no shared gate.
        device: where the weights are created.
    """

    def __init__(
        self,
        in_features: int,
        *,
        num_tasks: int,
        task_experts: int,
        shared_experts: int,
        layer_sizes: list[int],
        mlp: MLPConfig,
        final: bool,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList(
            Experts(in_features, num_experts=task_experts, layer_sizes=layer_sizes, mlp=mlp, device=device)
            for _ in range(num_tasks)
        )
        self.shared_experts = Experts(in_features, num_experts=shared_experts, layer_sizes=layer_sizes, mlp=mlp, device=device)
        self.task_gates = nn.ModuleList(
            Gate(in_features, num_experts=task_experts + shared_experts, device=device) for _ in range(num_tasks)
        )
        self.shared_gate = (
            None if final else Gate(in_features, num_experts=num_tasks * task_experts + shared_experts, device=device)
        )

    def forward(
        self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Each task's output ``[B, H]``, and the shared output (None at the last level)."""
        shared = self.shared_experts(shared_input)
        own = [experts(x) for experts, x in zip(self.task_experts, task_inputs)]
        outs = [gate.mix(x, torch.cat([e, shared], dim=1)) for gate, x, e in zip(self.task_gates, task_inputs, own)]
        if self.shared_gate is None:
            return outs, None
        return outs, self.shared_gate.mix(shared_input, torch.cat([*own, shared], dim=1))


class PLE(MultiTaskModel):
    """Progressive Layered Extraction from Tang et al. 2020, "Progressive Layered Extraction (PLE): A
    Novel Multi-Task Learning (MTL) Model for Personalized Recommendations".

    x = [pooled embeddings, dense] is every task's and the shared input of the first level; each
    level (:class:`ExtractionLayer`) turns the per-task and shared inputs into the next level's;
    logit_t = tower_t(task t's output of the last level). Tables may have different embedding_dims.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        schema.label = ["click", "conversion"]
        model = PLE(schema=schema, config=PLEConfig(num_levels=2), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model.eval()(torch.randn(2, 3), kjt)  # [2, 2]: click, conversion
    """

    def __init__(self, *, schema: FeatureSchema, config: PLEConfig, device: torch.device) -> None:
        super().__init__(schema=schema, weights=config.task_weights, model="ple", device=device)
        width = config.expert_layer_sizes[-1]
        self.levels = nn.ModuleList(
            ExtractionLayer(
                self.input_dim if level == 0 else width,
                num_tasks=self.num_tasks,
                task_experts=config.num_task_experts,
                shared_experts=config.num_shared_experts,
                layer_sizes=config.expert_layer_sizes,
                mlp=config.expert_mlp.over(config.mlp),
                final=level == config.num_levels - 1,
                device=device,
            )
            for level in range(config.num_levels)
        )
        self.towers = Towers(width, num_tasks=self.num_tasks, layer_sizes=config.tower_layer_sizes, widths=self.task_widths,
                             mlp=config.tower_mlp.over(config.mlp), device=device)

    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Logits ``[B, T]`` (a 1-tuple of them in training mode)."""
        shared = self.embed(dense_features, sparse_features)
        tasks = [shared] * self.num_tasks
        for level in self.levels:
            tasks, shared = level(tasks, shared)
        return self.outputs(self.towers(tasks))


@register("ple", PLEConfig, multi_task=True)
def build_ple(config: PLEConfig, *, schema: FeatureSchema, device: torch.device) -> PLE:
    """Builds a PLE for ``schema`` on ``device``."""
    return PLE(schema=schema, config=config, device=device)
