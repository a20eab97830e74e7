"""The multi-task models (Shared-Bottom, MMoE, PLE, ESMM, AITM): output shapes, gates that sum to 1,
ESMM's product and loss, AITM's calibrator, PLE's experts, task weights, a falling loss on a planted
two-label signal, and a loss that torch.fx can trace."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema, criteo_schema
from shardrec.errors import ConfigError
from shardrec.models import registry
from shardrec.models.aitm import calibrator_loss
from shardrec.models.esmm import product_logit

CPU = torch.device("cpu")
ROWS, DIM, BATCH = 20, 4, 6
MODELS = ["sharedbottom", "mmoe", "ple", "esmm", "aitm"]
FUNNEL = ["click", "conversion"]


def _schema(labels: list[str] | None = None) -> FeatureSchema:
    schema = criteo_schema(num_dense=3, num_sparse=4, rows=[ROWS] * 4, dim=DIM)
    schema.label = list(labels or FUNNEL)
    return schema


def _build(name: str, labels: list[str] | None = None, **params: Any) -> nn.Module:
    torch.manual_seed(0)
    return registry.build_model(name, params, schema=_schema(labels), device=CPU)


def _inputs(batch: int = BATCH, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, KeyedJaggedTensor]:
    """Dense ``[B, 3]``, ids ``[B, 4]`` and a KJT holding exactly those ids, one per bag."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, 3, generator=gen)
    ids = torch.randint(0, ROWS, (batch, 4), generator=gen)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=_schema().sparse_names, values=ids.t().flatten(), lengths=torch.ones(4 * batch, dtype=torch.long)
    )
    return dense, ids, kjt


def _labels_for(name: str) -> list[str]:
    # ESMM takes exactly [click, conversion]; the others any number of tasks.
    return FUNNEL if name == "esmm" else ["click", "add_to_cart", "conversion"]


@pytest.mark.parametrize("name", MODELS)
def test_registered_multi_task(name: str) -> None:
    assert registry.get(name).multi_task


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes(name: str) -> None:
    labels = _labels_for(name)
    model = _build(name, labels)
    dense, _, kjt = _inputs()
    outputs = model(dense, kjt)
    assert isinstance(outputs, tuple) and outputs[0].shape == (BATCH, len(labels))
    loss, logits = registry.training_loss(model, outputs, torch.ones(BATCH, len(labels)))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert logits is outputs[0]
    assert model.eval()(dense, kjt).shape == (BATCH, len(labels))


@pytest.mark.parametrize("name", MODELS)
def test_loss_traces_with_fx(name: str) -> None:
    model = _build(name)

    class Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return self.model.loss((logits,), labels)

    traced = torch.fx.symbolic_trace(Loss())
    logits, labels = torch.randn(BATCH, 2), torch.randint(0, 2, (BATCH, 2)).float()
    torch.testing.assert_close(traced(logits, labels), model.loss((logits,), labels))


@pytest.mark.parametrize("name", MODELS)
def test_task_weights_length_names_key_and_labels(name: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.task_weights.*3 weights.*2 labels \(click, conversion\)"):
        _build(name, task_weights=[1.0, 1.0, 1.0])


def test_negative_task_weight_names_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.task_weights"):
        registry.model_config("mmoe", {"task_weights": [1.0, -0.5]})


@pytest.mark.parametrize("name", ["sharedbottom", "mmoe", "ple"])
def test_task_weights_scale_each_task(name: str) -> None:
    dense, _, kjt = _inputs()
    labels = torch.randint(0, 2, (BATCH, 2), generator=torch.Generator().manual_seed(3)).float()
    model = _build(name, task_weights=[0.25, 2.0])
    logits = model(dense, kjt)[0]
    want = 0.25 * bce(logits[:, 0], labels[:, 0]) + 2.0 * bce(logits[:, 1], labels[:, 1])
    torch.testing.assert_close(model.loss((logits,), labels), want)


def test_mmoe_gates_sum_to_one() -> None:
    model = _build("mmoe", num_experts=3)
    dense, _, kjt = _inputs()
    x = model.embed(dense, kjt)
    assert len(model.gates) == 2 and len(model.experts.experts) == 3
    for gate in model.gates:
        w = gate(x)
        assert w.shape == (BATCH, 3) and (w > 0).all()
        torch.testing.assert_close(w.sum(dim=1), torch.ones(BATCH))


def test_mmoe_needs_two_experts() -> None:
    with pytest.raises(ConfigError, match=r"model\.num_experts.*sharedbottom"):
        registry.model_config("mmoe", {"num_experts": 1})


def test_ple_two_levels_expert_counts() -> None:
    model = _build("ple", ["a", "b", "c"], num_levels=2, num_task_experts=2, num_shared_experts=3)
    assert len(model.levels) == 2
    for level in model.levels:
        assert [len(e.experts) for e in level.task_experts] == [2, 2, 2]
        assert len(level.shared_experts.experts) == 3
        # Each task gate weighs its own 2 experts and the 3 shared ones.
        assert [g.linear.out_features for g in level.task_gates] == [5, 5, 5]
    # Below the last level a shared gate weighs all 3 * 2 + 3 experts; the last level has none.
    assert model.levels[0].shared_gate.linear.out_features == 9
    assert model.levels[1].shared_gate is None


def test_ple_gates_sum_to_one() -> None:
    model = _build("ple", num_levels=2)
    dense, _, kjt = _inputs()
    x = model.embed(dense, kjt)
    level = model.levels[0]
    for gate in [*level.task_gates, level.shared_gate]:
        torch.testing.assert_close(gate(x).sum(dim=1), torch.ones(BATCH))


def test_ple_config_errors_name_keys() -> None:
    for key in ("num_levels", "num_task_experts", "num_shared_experts"):
        with pytest.raises(ConfigError, match=rf"model\.{key}"):
            registry.model_config("ple", {key: 0})


def test_esmm_ctcvr_logit_is_logit_of_product() -> None:
    model = _build("esmm").eval()
    dense, _, kjt = _inputs()
    x = model.embed(dense, kjt)
    ctr, cvr = model.ctr(x).squeeze(-1), model.cvr(x).squeeze(-1)
    logits = model(dense, kjt)
    torch.testing.assert_close(logits[:, 0], ctr)
    torch.testing.assert_close(logits[:, 1], torch.logit(ctr.sigmoid() * cvr.sigmoid()), rtol=1e-4, atol=1e-4)


def test_product_logit_is_stable_for_large_logits() -> None:
    a = torch.tensor([40.0, -40.0, 40.0, 0.0], requires_grad=True)
    b = torch.tensor([40.0, 40.0, -40.0, 0.0])
    got = product_logit(a, b)
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(a.grad).all()
    # sigmoid(0)^2 = 1/4, logit = log(1/3).
    torch.testing.assert_close(got[3], torch.tensor(1 / 3).log())
    torch.testing.assert_close(got[1], torch.tensor(-40.0), atol=1e-4, rtol=0)


def test_esmm_loss_is_ctr_plus_ctcvr_over_entire_space() -> None:
    model = _build("esmm", task_weights=[1.0, 0.5])
    dense, _, kjt = _inputs()
    click = torch.tensor([1, 1, 0, 0, 1, 0]).float()
    conversion = torch.tensor([1, 0, 0, 1, 1, 0]).float()  # row 3 converts without a click: not a CTCVR positive
    logits = model(dense, kjt)[0]
    x = model.embed(dense, kjt)
    p_ctr = model.ctr(x).squeeze(-1).sigmoid()
    p_ctcvr = p_ctr * model.cvr(x).squeeze(-1).sigmoid()
    bce_prob = nn.functional.binary_cross_entropy
    want = bce_prob(p_ctr, click) + 0.5 * bce_prob(p_ctcvr, click * conversion)
    got = model.loss((logits,), torch.stack([click, conversion], dim=1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_esmm_needs_exactly_two_labels() -> None:
    with pytest.raises(ConfigError, match=r"esmm.*exactly 2 labels in features\.label"):
        _build("esmm", ["click", "cart", "buy"])


def test_aitm_needs_two_labels() -> None:
    with pytest.raises(ConfigError, match=r"aitm.*features\.label"):
        _build("aitm", ["click"])


def test_aitm_calibrator_zero_when_steps_fall_positive_otherwise() -> None:
    falling = torch.tensor([[2.0, 1.0, -1.0], [0.0, 0.0, -3.0]])  # p_t <= p_{t-1} everywhere
    assert calibrator_loss(falling).item() == 0.0
    rising = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    p = rising.sigmoid()
    want = (p[0, 1] - p[0, 0]) / 2  # mean over the batch of relu(p_2 - p_1): one row rises
    assert calibrator_loss(rising).item() > 0
    torch.testing.assert_close(calibrator_loss(rising), want)


def test_aitm_loss_adds_weighted_calibrator() -> None:
    model = _build("aitm", calibrator_weight=0.6)
    dense, _, kjt = _inputs()
    labels = torch.randint(0, 2, (BATCH, 2), generator=torch.Generator().manual_seed(4)).float()
    logits = model(dense, kjt)[0]
    want = bce(logits[:, 0], labels[:, 0]) + bce(logits[:, 1], labels[:, 1]) + 0.6 * calibrator_loss(logits)
    torch.testing.assert_close(model.loss((logits,), labels), want)


def test_aitm_attention_weights_sum_to_one_and_mix_values() -> None:
    model = _build("aitm")
    (ait,) = model.attention
    gen = torch.Generator().manual_seed(5)
    p, q = torch.randn(BATCH, 32, generator=gen), torch.randn(BATCH, 32, generator=gen)
    inputs = torch.stack([p, q], dim=1)
    w = ait.weights(inputs)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(BATCH))
    scores = torch.stack([(ait.query(u) * ait.key(u)).sum(dim=1) / 32**0.5 for u in (p, q)], dim=1)
    torch.testing.assert_close(w, scores.softmax(dim=1))
    torch.testing.assert_close(ait(p, q), w[:, :1] * ait.value(p) + w[:, 1:] * ait.value(q))


def test_aitm_calibrator_weight_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match=r"model\.calibrator_weight"):
        registry.model_config("aitm", {"calibrator_weight": -1.0})


@pytest.mark.parametrize("name", MODELS)
def test_loss_falls_on_planted_funnel(name: str) -> None:
    model = _build(name)
    dense, ids, kjt = _inputs(batch=64, seed=2)
    # A click depends on one sparse id; a conversion needs a click and a dense column above 0.
    click = (ids[:, 0] < ROWS // 2).float()
    labels = torch.stack([click, click * (dense[:, 0] > 0).float()], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(40):
        loss, _ = registry.training_loss(model, model(dense, kjt), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
