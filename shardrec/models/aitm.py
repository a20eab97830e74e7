"""AITM (Xi et al. 2021): task towers in funnel order, each passing what it learned to the next
through an Adaptive Information Transfer module, and a calibrator that keeps each step's
probability below the previous one's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import MLP, mlp_block
from shardrec.models.multitask import MultiTaskConfig, MultiTaskModel, require_labels, weighted_bce
from shardrec.models.registry import register
from shardrec.models.tasks import require_binary


@dataclass(kw_only=True)
class AITMConfig(MultiTaskConfig):
    """The ``model`` section for ``name: aitm``; the last tower width is the width d of the vectors
    the tasks pass on. ``mlp`` and ``tower_mlp`` set the task towers (ReLU after every layer by
    default); the one-layer transfers between tasks and the logit layers keep their own form."""

    calibrator_weight: float = 0.6
    """Weight alpha of the behavioral expectation calibrator (the paper's 0.6)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calibrator_weight < 0:
            raise ConfigError(f"'model.calibrator_weight' must be >= 0, got {self.calibrator_weight}")


class InformationTransfer(nn.Module):
    """The AIT module (AITM Eq. 2-4): self-attention over the two vectors u in {p_{t-1}, q_t}.

    ``w_u = softmax_u(<h1(u), h2(u)> / sqrt(d))`` and ``z_t = sum_u w_u h3(u)``, with h1, h2, h3
    linear projections d -> d.

    Args:
        dim: width d of p_{t-1} and q_t.
        device: where the weights are created.
    """

    def __init__(self, dim: int, *, device: torch.device) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False, device=device)
        self.key = nn.Linear(dim, dim, bias=False, device=device)
        self.value = nn.Linear(dim, dim, bias=False, device=device)
        self.scale = 1.0 / math.sqrt(dim)

    def weights(self, inputs: torch.Tensor) -> torch.Tensor:
        """Attention weights ``[B, 2]`` of the stacked ``[p_{t-1}, q_t]`` ``[B, 2, d]``; rows sum to 1."""
        return ((self.query(inputs) * self.key(inputs)).sum(dim=-1) * self.scale).softmax(dim=1)

    def forward(self, transferred: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """z_t ``[B, d]`` from p_{t-1} (``transferred``) and q_t (``own``), both ``[B, d]``."""
        inputs = torch.stack([transferred, own], dim=1)
        return torch.einsum("bu,bud->bd", self.weights(inputs), self.value(inputs))


def calibrator_loss(logits: torch.Tensor) -> torch.Tensor:
    """Behavioral expectation calibrator: ``sum_{t>=1} mean_b relu(p_t - p_{t-1})`` with p = sigmoid(logits ``[B, T]``)."""
    p = logits.sigmoid()
    return torch.relu(p[:, 1:] - p[:, :-1]).mean(dim=0).sum()


class AITM(MultiTaskModel):
    """AITM from Xi et al. 2021, "Modeling the Sequential Dependence among Audience Multi-step
    Conversions with Multi-task Learning in Targeted Display Advertising".

    Labels are funnel steps in order (e.g. click, conversion). Over x = [pooled embeddings, dense]
    (the shared embeddings), tower t gives q_t; z_1 = q_1 and, for t >= 2, p_{t-1} = transfer_{t-1}(z_{t-1})
    (Linear + ReLU) and z_t = AIT(p_{t-1}, q_t) (:class:`InformationTransfer`); logit_t = Linear(z_t).
    Training minimizes the weighted BCE of every step plus ``calibrator_weight`` times
    :func:`calibrator_loss`, which penalizes a step predicted likelier than the one before it.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        schema.label = ["click", "conversion"]
        model = AITM(schema=schema, config=AITMConfig(), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model.eval()(torch.randn(2, 3), kjt)  # [2, 2]: click, conversion
    """

    def __init__(self, *, schema: FeatureSchema, config: AITMConfig, device: torch.device) -> None:
        require_labels(schema, model="aitm", at_least=2)
        require_binary(schema, model="aitm", why="predicts each step of a conversion funnel as a probability that later steps are calibrated below")
        super().__init__(schema=schema, weights=config.task_weights, model="aitm", device=device)
        self.calibrator_weight = config.calibrator_weight
        dim = config.tower_layer_sizes[-1]
        steps = range(self.num_tasks)
        tower = config.tower_mlp.over(config.mlp)
        self.towers = nn.ModuleList(
            mlp_block(self.input_dim, config.tower_layer_sizes, config=tower, key="model.tower_mlp", final_activation=True,
                      device=device)
            for _ in steps
        )
        self.transfers = nn.ModuleList(MLP(dim, [dim], device=device) for _ in steps[1:])
        self.attention = nn.ModuleList(InformationTransfer(dim, device=device) for _ in steps[1:])
        self.logits = nn.ModuleList(nn.Linear(dim, 1, device=device) for _ in steps)

    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Logits ``[B, T]`` (a 1-tuple of them in training mode)."""
        x = self.embed(dense_features, sparse_features)
        z = self.towers[0](x)
        outputs = [z]
        for tower, transfer, attention in zip(self.towers[1:], self.transfers, self.attention):
            z = attention(transfer(z), tower(x))
            outputs.append(z)
        return self.outputs(torch.cat([head(z) for head, z in zip(self.logits, outputs)], dim=1))

    def loss(self, outputs: tuple[Any, ...], labels: torch.Tensor) -> torch.Tensor:
        """Weighted BCE of every step + ``calibrator_weight`` * :func:`calibrator_loss`."""
        logits = outputs[0]
        return weighted_bce(logits, labels, self.task_weights) + self.calibrator_weight * calibrator_loss(logits)


@register("aitm", AITMConfig, multi_task=True)
def build_aitm(config: AITMConfig, *, schema: FeatureSchema, device: torch.device) -> AITM:
    """Builds an AITM for ``schema`` on ``device``."""
    return AITM(schema=schema, config=config, device=device)
