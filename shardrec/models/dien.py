"""DIEN (Zhou et al. 2019): an interest extractor GRU trained with an auxiliary loss, and interest
evolution by a GRU whose update gate is scaled by the target attention (AUGRU)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import MLP, MLPConfig, check_layer_sizes, mlp_block
from shardrec.models.registry import register
from shardrec.models.tasks import task_loss
from shardrec.models.sequence import SequenceActivation, SequenceInputs, check_activation, sequence_layout


@dataclass(kw_only=True)
class DIENConfig:
    """The ``model`` section for ``name: dien``."""

    history_feature: str | None = None
    """Sequence feature holding the behaviour history; unset: the first ``sequence: true`` feature."""
    target_feature: str | None = None
    """Candidate item feature over the history's table; unset: the first non-sequence one there."""
    aux_weight: float = 1.0
    """Weight of the auxiliary loss (the paper's alpha) added to the click cross-entropy."""
    aux_layer_sizes: list[int] = field(default_factory=lambda: [100, 50])
    """Hidden widths of the auxiliary net scoring (interest state, next item); a logit layer follows."""
    mlp_layer_sizes: list[int] = field(default_factory=lambda: [200, 80])
    """Hidden widths of the final MLP; a width-1 layer (the logit) follows."""
    activation: SequenceActivation = "dice"
    """Activation of the final MLP: "dice" or "prelu"; ``mlp.activation`` overrides it."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """The final MLP: activation, dropout, norm (:class:`shardrec.models.layers.MLPConfig`); the auxiliary net keeps ReLU."""

    def __post_init__(self) -> None:
        check_layer_sizes(self.aux_layer_sizes, key="model.aux_layer_sizes")
        check_layer_sizes(self.mlp_layer_sizes, key="model.mlp_layer_sizes")
        check_activation(self.activation, key="model.activation")
        if self.aux_weight < 0:
            raise ConfigError(f"'model.aux_weight' must be >= 0, got {self.aux_weight}")


class AUGRUCell(nn.Module):
    """A GRU cell whose update gate may be scaled by an attention score (AUGRU):
    ``u' = a * u``, ``h' = (1 - u') * h + u' * h~``. Without a score it is a plain GRU cell; with
    ``a = 0`` it keeps ``h``.

    Args:
        in_features: width of the input.
        hidden: width of the state.
        device: where the weights are created.
    """

    def __init__(self, in_features: int, hidden: int, *, device: torch.device) -> None:
        super().__init__()
        self.x_gates = nn.Linear(in_features, 3 * hidden, device=device)
        self.h_gates = nn.Linear(hidden, 3 * hidden, device=device)

    def forward(self, x: torch.Tensor, h: torch.Tensor, attention: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, in]``, ``h [B, H]``, ``attention [B]`` -> the next state ``[B, H]``."""
        xr, xu, xn = self.x_gates(x).chunk(3, dim=-1)
        hr, hu, hn = self.h_gates(h).chunk(3, dim=-1)
        reset = torch.sigmoid(xr + hr)
        update = torch.sigmoid(xu + hu)
        candidate = torch.tanh(xn + reset * hn)
        if attention is not None:
            update = attention.unsqueeze(-1) * update
        return (1 - update) * h + update * candidate


def run_cell(cell: AUGRUCell, x: torch.Tensor, *, steps: int, attention: torch.Tensor | None = None) -> torch.Tensor:
    """Runs ``cell`` over ``x [B, steps, in]`` from a zero state; returns every state ``[B, steps, H]``."""
    # ``steps`` is a Python int (the history's max_len) so the pipeline's tracer can unroll the loop.
    h = x.new_zeros(x.size(0), cell.h_gates.in_features)
    states = []
    for t in range(steps):
        h = cell(x[:, t], h, None if attention is None else attention[:, t])
        states.append(h)
    return torch.stack(states, dim=1)


@torch.fx.wrap
def other_rows(batch: torch.Tensor) -> torch.Tensor:
    """For each row of ``batch`` the index of a random different row (itself when B is 1)."""
    b = batch.size(0)
    rows = torch.arange(b, device=batch.device)
    if b == 1:
        return rows
    return (rows + torch.randint(1, b, (b,), device=batch.device)) % b


class DIEN(nn.Module):
    """DIEN from Zhou et al. 2019, "Deep Interest Evolution Network for Click-Through Rate Prediction".

    Interest extractor: a GRU over the history; its auxiliary loss has the state at step t tell the
    behaviour at t + 1 from a negative, an item at the same step of another row's history in the
    batch. Interest evolution: attention ``softmax_t(h_t W e_target)`` over the real steps scales
    the update gate of a second GRU (AUGRU), which therefore keeps its state over padding; its final
    state, the target, the pooled context and the dense features go through an MLP to the logit.

    In training mode forward returns ``(logits, aux_loss)``, which :meth:`loss` turns into
    cross-entropy plus ``aux_weight * aux_loss``; in eval mode it returns the logits.

    Input: one history feature (``sequence: true``, with ``max_len``) and one target feature over the
    same table, both looked up unpooled through an EmbeddingCollection; every other sparse feature is
    pooled through an EmbeddingBagCollection.

    Example::

        # features.sparse: user_id (table user), movie_id (table movie),
        #                  history (table movie, sequence: true, max_len: 3)
        model = DIEN(schema=schema, config=DIENConfig(), device=torch.device("cpu")).eval()
        # B = 2; row 0: user 4, movie 7, history [1, 2]; row 1: user 1, movie 3, history []
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["user_id", "movie_id", "history"],
            values=torch.tensor([4, 1, 7, 3, 1, 2]),
            lengths=torch.tensor([1, 1, 1, 1, 2, 0]),
        )
        logits = model(torch.empty(2, 0), kjt)  # [2]
    """

    def __init__(self, *, schema: FeatureSchema, config: DIENConfig, device: torch.device) -> None:
        super().__init__()
        layout = sequence_layout(schema, history=config.history_feature, target=config.target_feature, model="dien")
        dim = layout.dim
        self.aux_weight = config.aux_weight
        self.steps = layout.max_len
        self.inputs = SequenceInputs(schema=schema, layout=layout, device=device)
        self.extractor = AUGRUCell(dim, dim, device=device)
        self.aux_net = MLP(2 * dim, [*config.aux_layer_sizes, 1], final_activation=False, device=device)
        self.attention = nn.Linear(dim, dim, bias=False, device=device)
        self.evolution = AUGRUCell(dim, dim, device=device)
        mlp_in = layout.context_dim + 2 * dim + layout.num_dense
        self.tasks = schema.tasks
        self.mlp = mlp_block(mlp_in, [*config.mlp_layer_sizes, schema.output_width], config=config.mlp, key="model.mlp",
                             activation=config.activation, logit=True, device=device)

    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features; in
        training mode ``(logits, aux_loss)``."""
        history, mask, target, context = self.inputs(sparse_features)
        interests = run_cell(self.extractor, history, steps=self.steps)
        weights = self.target_attention(interests, target, mask)
        final = run_cell(self.evolution, interests, steps=self.steps, attention=weights)[:, -1]
        logits = self.mlp(torch.cat([context, target, final, dense_features], dim=1)).squeeze(-1)
        if not self.training:
            return logits
        return logits, self.auxiliary_loss(interests, history, mask)

    def target_attention(self, interests: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``softmax_t(h_t W e_target)`` over the real steps, ``[B, L]``, zero at padding."""
        scores = (interests * self.attention(target).unsqueeze(1)).sum(dim=-1)
        # A large negative rather than -inf: a row with an empty history must not give NaN.
        weights = torch.softmax(scores.masked_fill(~mask, -1e9), dim=1)
        return weights * mask.to(weights.dtype)

    def auxiliary_loss(self, interests: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over real steps t of the cross-entropy of telling ``history[t + 1]`` (clicked) from
        the item at step t + 1 of another row (not clicked), given the extractor state at step t."""
        state, positive, valid = interests[:, :-1], history[:, 1:], mask[:, 1:]
        rows = other_rows(history)
        negative, valid_negative = history[rows, 1:], valid & mask[rows, 1:]
        pos = self.aux_net(torch.cat([state, positive], dim=-1)).squeeze(-1)
        neg = self.aux_net(torch.cat([state, negative], dim=-1)).squeeze(-1)
        bce = nn.functional.binary_cross_entropy_with_logits
        pos_loss = bce(pos, torch.ones_like(pos), reduction="none") * valid.to(pos.dtype)
        neg_loss = bce(neg, torch.zeros_like(neg), reduction="none") * valid_negative.to(neg.dtype)
        return (pos_loss.sum() + neg_loss.sum()) / valid.sum().clamp(min=1)

    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The task's loss (click cross-entropy for a 0/1 label) plus ``aux_weight`` times the auxiliary loss."""
        logits, aux = outputs
        return task_loss(logits, labels, self.tasks, single=True) + self.aux_weight * aux


@register("dien", DIENConfig)
def build_dien(config: DIENConfig, *, schema: FeatureSchema, device: torch.device) -> DIEN:
    """Builds a DIEN for ``schema`` on ``device``."""
    return DIEN(schema=schema, config=config, device=device)
