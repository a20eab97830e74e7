"""ESMM (Ma et al. 2018): the Entire Space Multi-task Model, pCTCVR = pCTR * pCVR learned over every
impression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.models.layers import mlp_block
from shardrec.models.multitask import MultiTaskConfig, MultiTaskModel, require_labels, weighted_bce
from shardrec.models.registry import register
from shardrec.models.tasks import require_binary


@dataclass(kw_only=True)
class ESMMConfig(MultiTaskConfig):
    """The ``model`` section for ``name: esmm``: the CTR and CVR towers' widths and the weights of
    the CTR and CTCVR losses."""


def product_logit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``logit(sigmoid(a) * sigmoid(b))``, exact and stable for any logits ``a``, ``b``.

    With p = sigmoid(a) sigmoid(b), p / (1 - p) = 1 / (e^-a + e^-b + e^-(a+b)), so the logit is
    ``-logsumexp(-a, -b, -a-b)``: no log of a difference that rounds to 0.
    """
    return -torch.logsumexp(torch.stack([-a, -b, -a - b], dim=-1), dim=-1)


class ESMM(MultiTaskModel):
    """ESMM from Ma et al. 2018, "Entire Space Multi-Task Model: An Effective Approach for Estimating
    Post-Click Conversion Rate".

    A CTR tower and a CVR tower over the same input x = [pooled embeddings, dense] (the shared
    embeddings); pCTCVR = pCTR * pCVR. Training minimizes, over every impression,
    BCE(pCTR, click) + BCE(pCTCVR, click AND conversion), weighted by ``task_weights``; the CVR tower
    is learned only through pCTCVR, which removes the paper's sample selection bias. Labels must be
    ``[click, conversion]``; the logits are ``[ctr logit, ctcvr logit]``, so the second column is scored
    against conversion over the entire space (in a funnel, conversion implies click).

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        schema.label = ["click", "conversion"]
        model = ESMM(schema=schema, config=ESMMConfig(), device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model.eval()(torch.randn(2, 3), kjt)  # [2, 2]: ctr, ctcvr
    """

    def __init__(self, *, schema: FeatureSchema, config: ESMMConfig, device: torch.device) -> None:
        require_labels(schema, model="esmm", exactly=2)
        require_binary(schema, model="esmm", why="predicts CTR x CVR, a product of two probabilities")
        super().__init__(schema=schema, weights=config.task_weights, model="esmm", device=device)
        tower = config.tower_mlp.over(config.mlp)
        self.ctr = mlp_block(self.input_dim, [*config.tower_layer_sizes, 1], config=tower, key="model.tower_mlp", logit=True,
                             device=device)
        self.cvr = mlp_block(self.input_dim, [*config.tower_layer_sizes, 1], config=tower, key="model.tower_mlp", logit=True,
                             device=device)

    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> torch.Tensor | tuple[torch.Tensor]:
        """Logits ``[B, 2]``: pCTR's and pCTCVR's (a 1-tuple of them in training mode)."""
        x = self.embed(dense_features, sparse_features)
        ctr = self.ctr(x).squeeze(-1)
        ctcvr = product_logit(ctr, self.cvr(x).squeeze(-1))
        return self.outputs(torch.stack([ctr, ctcvr], dim=1))

    def loss(self, outputs: tuple[Any, ...], labels: torch.Tensor) -> torch.Tensor:
        """BCE(pCTR, click) + BCE(pCTCVR, click * conversion), weighted by ``task_weights``."""
        click = labels[:, 0]
        return weighted_bce(outputs[0], torch.stack([click, click * labels[:, 1]], dim=1), self.task_weights)


@register("esmm", ESMMConfig, multi_task=True)
def build_esmm(config: ESMMConfig, *, schema: FeatureSchema, device: torch.device) -> ESMM:
    """Builds an ESMM for ``schema`` on ``device``."""
    return ESMM(schema=schema, config=config, device=device)
