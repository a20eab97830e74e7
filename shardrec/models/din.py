"""DIN (Zhou et al. 2018): target attention over the user's behaviour history."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.models.layers import MLPConfig, check_layer_sizes, mlp_block
from shardrec.models.registry import register
from shardrec.models.sequence import SequenceActivation, SequenceInputs, check_activation, sequence_layout


@dataclass(kw_only=True)
class DINConfig:
    """The ``model`` section for ``name: din``."""

    history_feature: str | None = None
    """Sequence feature holding the behaviour history; unset: the first ``sequence: true`` feature."""
    target_feature: str | None = None
    """Candidate item feature over the history's table; unset: the first non-sequence one there."""
    attention_layer_sizes: list[int] = field(default_factory=lambda: [80, 40])
    """Hidden widths of the local activation unit; a width-1 layer (the weight) follows."""
    mlp_layer_sizes: list[int] = field(default_factory=lambda: [200, 80])
    """Hidden widths of the final MLP; a width-1 layer (the logit) follows."""
    activation: SequenceActivation = "dice"
    """Activation of both MLPs: "dice" (the paper's) or "prelu"; ``mlp.activation`` and ``attention_mlp.activation`` override it."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The final MLP: activation, dropout, norm (:class:`shardrec.models.layers.MLPConfig`); also the defaults of ``attention_mlp``."""
    attention_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The local activation unit's MLP, over every history position (batch norm and Dice take their statistics over the real positions only); unset keys: ``mlp``'s."""

    def __post_init__(self) -> None:
        check_layer_sizes(self.attention_layer_sizes, key="model.attention_layer_sizes")
        check_layer_sizes(self.mlp_layer_sizes, key="model.mlp_layer_sizes")
        check_activation(self.activation, key="model.activation")


class LocalActivationUnit(nn.Module):
    """DIN's attention: an MLP over ``[h, t, h - t, h * t]`` gives each history item ``h`` a weight
    for the target ``t``. Weights are not softmax-normalized (the paper keeps their sum as a
    measure of interest intensity) and are zero at padded positions.

    Args:
        dim: embedding width D.
        layer_sizes: hidden widths of the MLP.
        activation: the default activation, "dice" or "prelu".
        mlp: the MLP's settings (``model.attention_mlp`` over ``model.mlp``).
        device: where the weights are created.
    """

    def __init__(
        self, dim: int, layer_sizes: list[int], *, activation: SequenceActivation, mlp: MLPConfig, device: torch.device
    ) -> None:
        super().__init__()
        self.mlp = mlp_block(4 * dim, [*layer_sizes, 1], config=mlp, key="model.attention_mlp", activation=activation, logit=True,
                             device=device)

    def forward(self, history: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``history [B, L, D]``, ``target [B, D]``, ``mask [B, L]`` -> weights ``[B, L]``."""
        t = target.unsqueeze(1).expand_as(history)
        x = torch.cat([history, t, history - t, history * t], dim=-1)
        return self.mlp(x, mask).squeeze(-1) * mask.to(x.dtype)


class DIN(nn.Module):
    """DIN from Zhou et al. 2018, "Deep Interest Network for Click-Through Rate Prediction".

    The user's interest in the target is the sum of the history embeddings weighted by the local
    activation unit; an MLP over [pooled context features, target, interest, dense] gives the logit.

    Input: one history feature (``sequence: true``, with ``max_len``) and one target feature over the
    same table, both looked up unpooled through an EmbeddingCollection; every other sparse feature is
    pooled through an EmbeddingBagCollection.

    Example::

        # features.sparse: user_id (table user), movie_id (table movie),
        #                  history (table movie, sequence: true, max_len: 3)
        model = DIN(schema=schema, config=DINConfig(), device=torch.device("cpu"))
        # B = 2; row 0: user 4, movie 7, history [1, 2]; row 1: user 1, movie 3, history []
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["user_id", "movie_id", "history"],
            values=torch.tensor([4, 1, 7, 3, 1, 2]),
            lengths=torch.tensor([1, 1, 1, 1, 2, 0]),
        )
        logits = model(torch.empty(2, 0), kjt)  # [2]
    """

    def __init__(self, *, schema: FeatureSchema, config: DINConfig, device: torch.device) -> None:
        super().__init__()
        layout = sequence_layout(schema, history=config.history_feature, target=config.target_feature, model="din")
        self.inputs = SequenceInputs(schema=schema, layout=layout, device=device)
        self.attention = LocalActivationUnit(
            layout.dim, config.attention_layer_sizes, activation=config.activation,
            mlp=config.attention_mlp.over(config.mlp), device=device,
        )
        mlp_in = layout.context_dim + 2 * layout.dim + layout.num_dense
        self.mlp = mlp_block(mlp_in, [*config.mlp_layer_sizes, schema.output_width], config=config.mlp, key="model.mlp",
                             activation=config.activation, logit=True, device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        history, mask, target, context = self.inputs(sparse_features)
        weights = self.attention(history, target, mask)
        interest = (weights.unsqueeze(-1) * history).sum(dim=1)
        return self.mlp(torch.cat([context, target, interest, dense_features], dim=1)).squeeze(-1)


@register("din", DINConfig)
def build_din(config: DINConfig, *, schema: FeatureSchema, device: torch.device) -> DIN:
    """Builds a DIN for ``schema`` on ``device``."""
    return DIN(schema=schema, config=config, device=device)
