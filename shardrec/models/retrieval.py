"""What every retrieval (matching) model shares: its outputs, its losses and its contract with the
trainer's full-ranking evaluation.

A retrieval model maps a row's user side (profile, history) to a user vector and an item to an
item vector; their dot product scores the pair. Each training row is one positive (user, item)
interaction; labels are not read.

Contract (:class:`RetrievalModel`):

* training-mode ``forward(dense, kjt)`` returns :class:`RetrievalOutput`: M (user vector, positive
  item vector, positive id) pairs (M = B, or every valid position of a sequence model) and the
  vectors of the batch's sampled negatives; ``loss(outputs, labels)`` scores them with the model's
  :class:`RetrievalLoss`;
* ``user_vectors(dense, kjt)`` gives each row's query vector ``[B, D]`` (a sequence model: the
  output at the last history position, which predicts the row's target), also what eval-mode
  ``forward`` returns; a multi-interest model returns ``[B, K, D]`` and an item scores by its
  best interest;
* ``item_vectors(kjt)`` gives the vector of each row's item (``item_feature``) from the item-side
  features of the row: the trainer runs it over an item catalogue.

Each method calls each embedding collection once, directly on the KJT, as
TrainPipelineSparseDist requires.

Losses (``model.loss`` section, :class:`RetrievalLossConfig`):

* ``in_batch``: softmax over the batch's positive items with temperature; ``log_q`` subtracts the
  log of each item's estimated frequency (the sampling-bias correction of Yi et al. 2019, whose
  streaming estimator :class:`FrequencyEstimator` implements); repeats of a row's own item among
  the other columns are masked.
* ``sampled``: softmax over the positive and the batch's shared sampled negatives (a schema
  feature with ``negatives:``); with popularity negatives (P ∝ count ** alpha) both are corrected
  by ``alpha * log(estimated frequency)``, the log of the proposal up to a constant; a negative
  equal to the row's positive is masked (an accidental hit).
* ``bpr``: Bayesian personalized ranking, ``-log sigmoid(s_pos - s_neg)`` averaged over the
  sampled negatives (or, without them, over the batch's other items).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.fx
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema, SparseFeature
from shardrec.errors import ConfigError
from shardrec.models.layers import build_ebc
from shardrec.models.sequence import build_sequence_ec, padded_sequence

LossKind = Literal["in_batch", "sampled", "bpr"]


class RetrievalOutput(NamedTuple):
    """A retrieval model's training outputs."""

    scores: torch.Tensor
    """``[M]`` dot products of the positive pairs (what the trainer reports as logits)."""
    user: torch.Tensor
    """``[M, D]`` user (query) vectors."""
    item: torch.Tensor
    """``[M, D]`` positive item vectors."""
    item_ids: torch.Tensor
    """``[M]`` positive item ids."""
    negatives: torch.Tensor
    """``[N, D]`` sampled negative item vectors shared by the batch (N = 0 without a sampler)."""
    negative_ids: torch.Tensor
    """``[N]`` their ids."""


@dataclass(kw_only=True)
class RetrievalLossConfig:
    """The ``model.loss`` section of a retrieval model."""

    kind: LossKind = "in_batch"
    """in_batch (softmax over the batch's items), sampled (softmax over sampled negatives) or bpr."""
    temperature: float = 0.05
    """Scores are divided by it before a softmax (in_batch, sampled)."""
    log_q: bool = True
    """in_batch: subtract the log of each item's estimated frequency (sampling-bias correction)."""
    estimator_lr: float = 0.01
    """Learning rate of the streaming frequency estimator (Yi et al. 2019's alpha)."""

    def __post_init__(self) -> None:
        if self.kind not in ("in_batch", "sampled", "bpr"):
            raise ConfigError(f"'model.loss.kind' must be in_batch, sampled or bpr, got '{self.kind}'")
        if self.temperature <= 0:
            raise ConfigError(f"'model.loss.temperature' must be > 0, got {self.temperature}")
        if not 0 < self.estimator_lr <= 1:
            raise ConfigError(f"'model.loss.estimator_lr' must be in (0, 1], got {self.estimator_lr}")


class FrequencyEstimator(nn.Module):
    """Streaming estimate of how often each item id occurs per training step (Yi et al. 2019,
    "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations", Algorithm 2):
    per id, the last step it was seen (A) and a moving average of the steps between sightings (B);
    its frequency is 1 / B.

    The state is per rank and not checkpointed (it re-converges within a few hundred steps); it is
    created on the first call, on the ids' device, since the model is built on the meta device and
    holds no buffers. Ids are folded into ``slots`` by modulo.

    Args:
        slots: size of A and B (the item table's rows, capped at 2**24).
        lr: moving-average rate.
    """

    def __init__(self, slots: int, *, lr: float) -> None:
        super().__init__()
        self.slots = min(slots, 1 << 24)
        self.lr = lr
        self.state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def log_frequency(self, ids: torch.Tensor, *, update: bool) -> torch.Tensor:
        """``log(1 / B[id])`` per id; ``update`` first records this step's sightings of ``ids``."""
        if self.state is None or self.state[0].device != ids.device:
            # Unseen ids start at one sighting per `slots` steps: a uniform prior over the table.
            last = torch.zeros(self.slots, dtype=torch.float64, device=ids.device)
            gap = torch.full((self.slots,), float(self.slots), dtype=torch.float64, device=ids.device)
            self.state = (last, gap, torch.zeros((), dtype=torch.float64, device=ids.device))
        last, gap, step = self.state
        h = ids.remainder(self.slots)
        if update:
            step += 1
            seen = last[h] > 0
            new_gap = torch.where(seen, (1 - self.lr) * gap[h] + self.lr * (step - last[h]), gap[h])
            gap[h] = new_gap
            last[h] = step
        return (-torch.log(gap[h])).float()


def in_batch_softmax(
    user: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, *, temperature: float, log_q: torch.Tensor | None
) -> torch.Tensor:
    """Mean cross-entropy of each row against the batch's items, its own item being the class.

    ``log_q [M]`` (log frequency of each column's item) is subtracted from that column's scores;
    columns holding the row's own item again are masked.
    """
    logits = user @ item.t() / temperature
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    eye = torch.eye(item_ids.numel(), dtype=torch.bool, device=item_ids.device)
    repeat = (item_ids.unsqueeze(0) == item_ids.unsqueeze(1)) & ~eye
    logits = logits.masked_fill(repeat, float("-inf"))
    return nn.functional.cross_entropy(logits, torch.arange(item_ids.numel(), device=item_ids.device))


def sampled_softmax(
    user: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, negatives: torch.Tensor,
    negative_ids: torch.Tensor, *, temperature: float, log_q: torch.Tensor | None, negative_log_q: torch.Tensor | None,
) -> torch.Tensor:
    """Mean cross-entropy of each row over [its positive, the shared negatives], class 0.

    ``log_q``/``negative_log_q`` (log proposal probabilities up to a constant) are subtracted;
    a negative equal to the row's positive is masked.
    """
    pos = (user * item).sum(dim=-1, keepdim=True) / temperature
    neg = user @ negatives.t() / temperature
    if log_q is not None and negative_log_q is not None:
        pos = pos - log_q.unsqueeze(1)
        neg = neg - negative_log_q.unsqueeze(0)
    neg = neg.masked_fill(negative_ids.unsqueeze(0) == item_ids.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    return nn.functional.cross_entropy(logits, torch.zeros_like(item_ids))


def bpr(
    user: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, negatives: torch.Tensor, negative_ids: torch.Tensor
) -> torch.Tensor:
    """Mean ``softplus(s_neg - s_pos)`` over each row's negatives that are not its own item."""
    pos = (user * item).sum(dim=-1, keepdim=True)
    neg = user @ negatives.t()
    valid = (negative_ids.unsqueeze(0) != item_ids.unsqueeze(1)).to(pos.dtype)
    return (nn.functional.softplus(neg - pos) * valid).sum() / valid.sum().clamp(min=1.0)


class RetrievalLoss(nn.Module):
    """The loss chosen by :class:`RetrievalLossConfig` over a :class:`RetrievalOutput`.

    Args:
        config: the ``model.loss`` section.
        item_rows: rows of the item table (the frequency estimator's size).
        negatives: the schema feature drawing the negatives, if any; ``sampled`` needs one.
    """

    def __init__(self, config: RetrievalLossConfig, *, item_rows: int, negatives: SparseFeature | None) -> None:
        super().__init__()
        if config.kind == "sampled" and negatives is None:
            raise ConfigError(
                "'model.loss.kind: sampled' needs sampled negatives: add a sparse feature over the item table with "
                "'negatives: {num: 128, of: <item feature>}' under features.sparse, or use kind 'in_batch'"
            )
        self.config = config
        self.alpha = negatives.negatives.alpha if negatives is not None and negatives.negatives.distribution == "popularity" else 0.0  # type: ignore[union-attr]
        needs_estimate = (config.kind == "in_batch" and config.log_q) or (config.kind == "sampled" and self.alpha > 0)
        self.estimator = FrequencyEstimator(item_rows, lr=config.estimator_lr) if needs_estimate else None

    def forward(self, out: RetrievalOutput) -> torch.Tensor:
        return _retrieval_loss(self, *out)

    def compute(self, out: RetrievalOutput) -> torch.Tensor:
        """The loss of ``out`` (untraced: :meth:`forward` makes it one leaf for the pipeline's tracer)."""
        cfg = self.config
        log_q = None if self.estimator is None else self.estimator.log_frequency(out.item_ids.detach(), update=self.training)
        if cfg.kind == "in_batch":
            return in_batch_softmax(out.user, out.item, out.item_ids, temperature=cfg.temperature, log_q=log_q)
        if cfg.kind == "bpr":
            if out.negative_ids.numel() == 0:
                return bpr(out.user, out.item, out.item_ids, out.item, out.item_ids)
            return bpr(out.user, out.item, out.item_ids, out.negatives, out.negative_ids)
        neg_log_q = None
        if self.estimator is not None and log_q is not None:
            neg_log_q = self.alpha * self.estimator.log_frequency(out.negative_ids.detach(), update=False)
            log_q = self.alpha * log_q
        return sampled_softmax(out.user, out.item, out.item_ids, out.negatives, out.negative_ids,
                               temperature=cfg.temperature, log_q=log_q, negative_log_q=neg_log_q)


@torch.fx.wrap
def _retrieval_loss(
    loss: RetrievalLoss, scores: torch.Tensor, user: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor,
    negatives: torch.Tensor, negative_ids: torch.Tensor,
) -> torch.Tensor:
    # One leaf for the pipeline's tracer: the loss branches on sizes and keeps estimator state.
    return loss.compute(RetrievalOutput(scores, user, item, item_ids, negatives, negative_ids))


class RetrievalModel(nn.Module):
    """Base of the retrieval models: see the module docstring for the contract.

    Subclasses set ``item_feature`` and ``retrieval_loss`` and implement :meth:`user_vectors`,
    :meth:`item_vectors` and the training ``forward``.
    """

    item_feature: str
    """KJT key of the row's (positive) item id; the catalogue's id column."""
    retrieval_loss: RetrievalLoss

    def user_vectors(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """``[B, D]`` query vector of each row (``[B, K, D]``: K interests)."""
        raise NotImplementedError

    def item_vectors(self, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """``[B, D]`` vector of each row's item."""
        raise NotImplementedError

    def loss(self, outputs: RetrievalOutput, labels: torch.Tensor) -> torch.Tensor:
        """The configured retrieval loss; ``labels`` are not read (every row is a positive)."""
        return self.retrieval_loss(outputs)


def negatives_feature(schema: FeatureSchema, *, item_feature: str, model: str) -> SparseFeature | None:
    """The schema's negatives feature over ``item_feature``'s table, if any (at most one)."""
    item = item_table(schema, item_feature, model=model)
    found = [f for f in schema.sparse if f.negatives is not None and f.table == item]
    return found[0] if found else None


def item_table(schema: FeatureSchema, item_feature: str, *, model: str) -> str:
    """The table of ``item_feature``, or a ConfigError listing the sparse features."""
    found = [f for f in schema.sparse if f.name == item_feature]
    if not found or found[0].raw or found[0].negatives is not None:
        raise ConfigError(f"model '{model}': 'model.item_feature' names '{item_feature}', which is not an id feature; "
                          f"sparse features: {', '.join(schema.sparse_names)}")
    return found[0].table  # type: ignore[return-value]


def empty_negatives(like: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[0, D]`` vectors and ``[0]`` ids: the negatives of a batch without a sampler."""
    return like.new_zeros(0, like.size(-1)), ids.new_zeros(0)


class FeatureLookup(nn.Module):
    """The embedding lookups of a retrieval model: an EmbeddingCollection over the schema's
    unpooled tables (those a sequence or negatives feature reads) and an EmbeddingBagCollection over
    the other tables, each called once, directly on the KJT.

    Args:
        schema: features and tables (raw and weighted features are not looked up).
        device: where the tables are created.
    """

    def __init__(self, schema: FeatureSchema, *, device: torch.device) -> None:
        super().__init__()
        unpooled = set(schema.sequence_tables())
        pooled = [f for f in schema.sparse if f.table not in unpooled and not f.raw and not f.weights]
        self.ec = build_sequence_ec(schema, device=device) if unpooled else None
        used = {f.table for f in pooled}
        self.ebc = (
            build_ebc(FeatureSchema(sparse=pooled, tables=[t for t in schema.tables if t.name in used]), device=device)
            if pooled else None
        )
        self.pooled_names = [f.name for f in pooled]
        self.sequence_lengths = {f.name: f.max_len or 1 for f in schema.sparse if f.sequence and f.table in unpooled}

    def forward(self, sparse_features: KeyedJaggedTensor) -> tuple[dict[str, torch.Tensor], dict[str, JaggedTensor]]:
        """``(pooled [B, D] by feature, unpooled JaggedTensor of embeddings by feature)``."""
        pooled = self.ebc(sparse_features).to_dict() if self.ebc is not None else {}
        unpooled = self.ec(sparse_features) if self.ec is not None else {}
        return pooled, unpooled


    def feature_vector(self, name: str, pooled: dict[str, torch.Tensor], unpooled: dict[str, JaggedTensor]) -> torch.Tensor:
        """``[B, D]`` of feature ``name`` from :meth:`forward`'s outputs: its pooled embedding, the
        mean of a sequence's embeddings, or a single id's embedding."""
        # Decided by name: under the pipeline's tracer the dicts are proxies.
        if name in self.pooled_names:
            return pooled[name]
        if name in self.sequence_lengths:
            return masked_mean(*padded_sequence(unpooled[name], self.sequence_lengths[name]))
        return single(unpooled[name])


def single(jt: JaggedTensor) -> torch.Tensor:
    """``[B, D]``: each row's one embedding of an unpooled single-id feature (zeros where empty)."""
    return padded_sequence(jt, 1)[0].squeeze(1)


def masked_mean(history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` mean of ``history [B, L, D]`` over the valid positions of ``mask [B, L]`` (0 if none)."""
    m = mask.unsqueeze(-1).to(history.dtype)
    return (history * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def resolve_item_feature(schema: FeatureSchema, name: str | None, *, model: str) -> str:
    """``name``, or by default the non-sequence id feature over the first sequence feature's table."""
    if name is not None:
        item_table(schema, name, model=model)
        return name
    for seq in (f for f in schema.sparse if f.sequence and not f.raw):
        for f in schema.sparse:
            if f.table == seq.table and not f.sequence and f.negatives is None:
                return f.name
    raise ConfigError(f"model '{model}' cannot tell which feature is the item: set 'model.item_feature' to one of "
                      f"{', '.join(f.name for f in schema.sparse if not f.raw and f.negatives is None)}")


def negative_ids(sparse_features: KeyedJaggedTensor, feature: str | None, like: torch.Tensor) -> torch.Tensor:
    """The batch's sampled negative ids (``[0]`` without a negatives feature)."""
    return sparse_features[feature].values() if feature is not None else like.new_zeros(0)
