"""The sequence models' signatures: DIN's unnormalized, masked attention and Dice; BST's padding
mask; DIEN's AUGRU and auxiliary loss; and the errors naming the history feature."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import sequence_schema
from shardrec.data.schema import criteo_schema
from shardrec.errors import ConfigError
from shardrec.models import registry
from shardrec.models.dien import AUGRUCell, run_cell
from shardrec.models.layers import Dice

CPU = torch.device("cpu")
DIM = 8


def _build(name: str, **params: object) -> nn.Module:
    torch.manual_seed(0)
    return registry.build_model(name, dict(params), schema=sequence_schema(dim=DIM), device=CPU)


def _padded(batch: int = 4, length: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    history = torch.randn(batch, length, DIM, generator=gen)
    lengths = torch.tensor([0, 2, 5, 6])[:batch]
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    return history * mask.unsqueeze(-1), mask, torch.randn(batch, DIM, generator=gen)


def test_din_weights_are_zero_at_padding_and_not_normalized() -> None:
    model = _build("din")
    history, mask, target = _padded()
    weights = model.attention(history, target, mask)
    assert weights.shape == mask.shape
    assert (weights[~mask] == 0).all()
    assert not torch.allclose(weights[2:].sum(dim=1), torch.ones(2))


def test_dice_matches_its_formula() -> None:
    dice = Dice(3, device=CPU)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    p = torch.sigmoid((x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-8))
    torch.testing.assert_close(dice(x), p * x + (1 - p) * dice.alpha * x)
    # Masked positions take no part in the statistics.
    mask = torch.tensor([True, True, True, False, False])
    torch.testing.assert_close(dice(x, mask)[:3], dice(x[:3]))


def test_bst_mask_hides_padding() -> None:
    model = _build("bst").eval()
    history, mask, target = _padded()
    noisy = history + torch.randn_like(history) * (~mask).unsqueeze(-1)
    torch.testing.assert_close(model.encode(noisy, mask, target), model.encode(history, mask, target))
    assert not torch.equal(model.encode(history * 2, mask, target), model.encode(history, mask, target))


def test_bst_pre_norm_and_target_in_the_mlp() -> None:
    paper, variant = _build("bst"), _build("bst", norm_first=True, target_in_mlp=True)
    assert [b.norm_first for b in paper.layers] == [False] and [b.norm_first for b in variant.layers] == [True]
    first = lambda m: next(l for l in m.mlp.modules() if isinstance(l, nn.Linear))  # noqa: E731
    assert first(variant).in_features == first(paper).in_features + DIM  # the target's embedding, once more
    history, mask, target = _padded()
    x, seq_mask = torch.cat([target.unsqueeze(1), history], 1), torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
    block = variant.layers[0].eval()
    # Pre-norm: the residual stream is not normalized, so scaling the input moves the output's norm.
    assert not torch.allclose(block(x * 3, seq_mask).norm(dim=-1), block(x, seq_mask).norm(dim=-1), rtol=0.1)
    with pytest.raises(ConfigError, match="target_in_mlpz"):
        _build("bst", target_in_mlpz=True)


def test_augru_with_zero_attention_keeps_the_state() -> None:
    cell = AUGRUCell(DIM, DIM, device=CPU)
    x, h = torch.randn(3, DIM), torch.randn(3, DIM)
    torch.testing.assert_close(cell(x, h, torch.zeros(3)), h)
    assert not torch.allclose(cell(x, h, torch.ones(3)), h)


def test_dien_auxiliary_loss_is_positive_and_trains_the_extractor() -> None:
    model = _build("dien")
    history, mask, _ = _padded()
    interests = run_cell(model.extractor, history, steps=6)
    aux = model.auxiliary_loss(interests, history, mask)
    assert aux.item() > 0
    aux.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.extractor.parameters())


def test_dien_attention_is_a_softmax_over_real_steps() -> None:
    model = _build("dien")
    history, mask, target = _padded()
    weights = model.target_attention(history, target, mask)
    assert weights[0].abs().sum() == 0  # an empty history: zeros, not NaN
    assert (weights[~mask] == 0).all()
    torch.testing.assert_close(weights[1:].sum(dim=1), torch.ones(3))


@pytest.mark.parametrize("name", ["din", "bst", "dien"])
def test_missing_history_names_the_key(name: str) -> None:
    with pytest.raises(ConfigError, match=r"sequence: true.*max_len"):
        registry.build_model(name, {}, schema=criteo_schema(num_dense=1, num_sparse=2, rows=[9, 9], dim=DIM), device=CPU)


def test_unknown_history_feature_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"model\.history_feature.*user_id, item_id, history"):
        registry.build_model("din", {"history_feature": "clicks"}, schema=sequence_schema(dim=DIM), device=CPU)
