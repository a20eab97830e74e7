"""MaskNet, WuKong, MultiTower and Rocket Launching: their blocks against the papers' formulas on hand
inputs, their structures, their config errors, and the training-loss hook Rocket Launching uses."""

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
from shardrec.models.masknet import InstanceGuidedMask, MaskBlock
from shardrec.models.wukong import FactorizationMachineBlock, LinearCompressBlock, WuKongConfig, WukongLayer

CPU = torch.device("cpu")
ROWS, DIM, BATCH = 20, 4, 5


def _schema() -> FeatureSchema:
    return criteo_schema(num_dense=3, num_sparse=4, rows=[ROWS] * 4, dim=DIM)


def _build(name: str, **params: Any) -> nn.Module:
    torch.manual_seed(0)
    return registry.build_model(name, params, schema=_schema(), device=CPU)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, KeyedJaggedTensor]:
    """Dense ``[B, 3]``, ids ``[B, 4]`` and a KJT holding exactly those ids, one per bag."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(BATCH, 3, generator=gen)
    ids = torch.randint(0, ROWS, (BATCH, 4), generator=gen)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=_schema().sparse_names, values=ids.t().flatten(), lengths=torch.ones(4 * BATCH, dtype=torch.long)
    )
    return dense, ids, kjt


def _rows(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each feature's embedding looked up by hand: table t_Ck's rows at ids[:, k - 1]."""
    bags = model.ebc.embedding_bags
    return [bags[f"t_C{k + 1}"].weight[ids[:, k]] for k in range(4)]


def _layer_norm(h: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    centered = h - h.mean(dim=-1, keepdim=True)
    return centered / torch.sqrt(h.var(dim=-1, unbiased=False, keepdim=True) + norm.eps) * norm.weight + norm.bias


def _randomize(module: nn.Module) -> None:
    # Layer norms start at weight 1, bias 0; random values make a hand formula check mean something.
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


# MaskNet


def test_instance_guided_mask_matches_formula() -> None:
    mask = InstanceGuidedMask(emb_width=6, out_width=4, reduction_ratio=2.0, device=CPU)
    assert (mask.aggregation.out_features, mask.projection.out_features) == (8, 4)
    v_emb = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    w1, b1, w2, b2 = mask.aggregation.weight, mask.aggregation.bias, mask.projection.weight, mask.projection.bias
    torch.testing.assert_close(mask(v_emb), torch.relu(v_emb @ w1.T + b1) @ w2.T + b2)


def test_mask_block_matches_formula() -> None:
    block = MaskBlock(emb_width=6, in_width=5, out_width=3, reduction_ratio=1.5, device=CPU)
    _randomize(block)
    gen = torch.Generator().manual_seed(1)
    x, v_emb = torch.randn(4, 5, generator=gen), torch.randn(4, 6, generator=gen)
    masked = block.mask(v_emb) * x
    want = torch.relu(_layer_norm(masked @ block.linear.weight.T, block.norm))
    assert block.linear.bias is None
    torch.testing.assert_close(block(x, v_emb), want)


def _masknet_fields(model: nn.Module, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, 4 + 3, D]: the sparse embeddings, then v_j * x_j for each dense feature j."""
    dense_fields = dense.unsqueeze(-1) * model.dense_embedding.weight
    return torch.cat([torch.stack(_rows(model, ids), dim=1), dense_fields], dim=1)


@pytest.mark.parametrize("structure", ["serial", "parallel"])
def test_masknet_structure(structure: str) -> None:
    model = _build("masknet", structure=structure, num_blocks=3, block_dim=6, mlp_layer_sizes=[5])
    _randomize(model)
    dense, ids, kjt = _inputs()
    fields = _masknet_fields(model, dense, ids)
    v_emb = fields.flatten(1)
    ln_emb = _layer_norm(fields, model.emb_norm).flatten(1)  # LN-EMB: each field normalized alone
    b1, b2, b3 = model.blocks
    emb_width = 7 * DIM
    if structure == "serial":
        assert [b.linear.in_features for b in model.blocks] == [emb_width, 6, 6]
        want = model.head(b3(b2(b1(ln_emb, v_emb), v_emb), v_emb))
    else:
        assert [b.linear.in_features for b in model.blocks] == [emb_width] * 3
        want = model.head(torch.cat([b(ln_emb, v_emb) for b in model.blocks], dim=1))
    # Every mask reads V_emb and is as wide as what it masks.
    assert all(b.mask.aggregation.in_features == emb_width for b in model.blocks)
    assert [b.mask.projection.out_features for b in model.blocks] == [b.linear.in_features for b in model.blocks]
    torch.testing.assert_close(model(dense, kjt), want.squeeze(-1))


def test_masknet_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.structure.*serial, parallel"):
        registry.model_config("masknet", {"structure": "stacked"})
    with pytest.raises(ConfigError, match=r"model\.reduction_ratio"):
        registry.model_config("masknet", {"reduction_ratio": 0})


# WuKong


def test_fmb_optimized_fm_equals_x_xt_y() -> None:
    fmb = FactorizationMachineBlock(num_in=5, num_out=3, dim=4, rank=2, layer_sizes=[7], device=CPU)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    y = fmb.projection.weight.T  # [n, k]
    explicit = x @ x.transpose(1, 2) @ y
    torch.testing.assert_close(fmb.interactions(x), explicit)
    out = fmb(x)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out, fmb.mlp(_layer_norm(explicit.flatten(1), fmb.norm)).view(2, 3, 4))


def test_lcb_is_linear_over_the_embedding_axis() -> None:
    lcb = LinearCompressBlock(5, 3, device=CPU)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    w = lcb.linear.weight  # [n_out, n_in]
    torch.testing.assert_close(lcb(x), torch.einsum("oi,bid->bod", w, x))


@pytest.mark.parametrize(("n_fmb", "n_lcb", "identity"), [(3, 2, True), (4, 3, False)])
def test_wukong_layer_is_residual_layer_norm_of_fmb_and_lcb(n_fmb: int, n_lcb: int, identity: bool) -> None:
    config = WuKongConfig(num_emb_fmb=n_fmb, num_emb_lcb=n_lcb, rank=2, fmb_layer_sizes=[6])
    layer = WukongLayer(num_in=5, dim=4, config=config, device=CPU)
    _randomize(layer)
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
    assert isinstance(layer.residual, nn.Identity) == identity
    residual = x if identity else layer.residual(x)
    want = _layer_norm(torch.cat([layer.fmb(x), layer.lcb(x)], dim=1) + residual, layer.norm)
    out = layer(x)
    assert out.shape == (2, n_fmb + n_lcb, 4)
    torch.testing.assert_close(out, want)


def test_wukong_shapes_per_layer() -> None:
    model = _build("wukong", num_layers=3, num_emb_fmb=4, num_emb_lcb=2, rank=3, fmb_layer_sizes=[8],
                   dense_layer_sizes=[8], final_layer_sizes=[8])
    shapes: list[tuple[int, ...]] = []
    for layer in model.layers:
        layer.register_forward_hook(lambda _m, args, out: shapes.append((tuple(args[0].shape), tuple(out.shape))))
    dense, ids, kjt = _inputs()
    logits = model(dense, kjt)
    # X_0: one embedding from the dense MLP, then the 4 sparse ones; each layer gives n_F + n_L = 6.
    first, rest = (BATCH, 5, DIM), (BATCH, 6, DIM)
    assert shapes == [(first, rest), (rest, rest), (rest, rest)]
    assert logits.shape == (BATCH,)
    assert not isinstance(model.layers[0].residual, nn.Identity)
    assert all(isinstance(layer.residual, nn.Identity) for layer in model.layers[1:])


def test_wukong_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.rank"):
        registry.model_config("wukong", {"rank": 0})
    with pytest.raises(ConfigError, match=r"model\.fmb_layer_sizes"):
        registry.model_config("wukong", {"fmb_layer_sizes": []})


# MultiTower


def test_multitower_builds_one_tower_per_group() -> None:
    model = _build("multitower", groups={"user": ["C1", "I1"], "item": ["C4", "C2", "C3", "I3", "I2"]},
                   tower_layer_sizes=[6, 3], final_layer_sizes=[4])
    assert list(model.towers) == ["user", "item"]
    assert [t[0].in_features for t in model.towers.values()] == [DIM + 1, 3 * DIM + 2]
    assert model.final[0].in_features == 2 * 3
    dense, ids, kjt = _inputs()
    c1, c2, c3, c4 = _rows(model, ids)
    user = model.towers["user"](torch.cat([c1, dense[:, [0]]], dim=1))
    item = model.towers["item"](torch.cat([c4, c2, c3, dense[:, [2, 1]]], dim=1))
    torch.testing.assert_close(model(dense, kjt), model.final(torch.cat([user, item], dim=1)).squeeze(-1))


def test_multitower_accepts_mixed_embedding_dims() -> None:
    schema = _schema()
    schema.tables[1].embedding_dim = 8
    model = registry.build_model("multitower", {"groups": {"a": ["C1", "C2", "I1"], "b": ["C3", "C4", "I2", "I3"]}},
                                 schema=schema, device=CPU)
    assert [t[0].in_features for t in model.towers.values()] == [DIM + 8 + 1, 2 * DIM + 2]
    dense, _, kjt = _inputs()
    assert model(dense, kjt).shape == (BATCH,)


def test_multitower_default_groups_are_sparse_and_dense() -> None:
    model = _build("multitower")
    assert list(model.groups) == ["sparse", "dense"]
    assert [t[0].in_features for t in model.towers.values()] == [4 * DIM, 3]


def test_multitower_unknown_feature_is_named() -> None:
    groups = {"a": ["C1", "C2", "C9"], "b": ["C3", "C4", "I1", "I2", "I3"]}
    with pytest.raises(ConfigError, match=r"model\.groups\.a.*'C9'.*known features: C1, C2"):
        _build("multitower", groups=groups)


def test_multitower_feature_in_no_group_is_named() -> None:
    with pytest.raises(ConfigError, match=r"features C4, I3 are in no group of 'model\.groups'"):
        _build("multitower", groups={"a": ["C1", "C2", "C3"], "b": ["I1", "I2"]})


def test_multitower_empty_group_is_named() -> None:
    with pytest.raises(ConfigError, match=r"model\.groups\.a"):
        registry.model_config("multitower", {"groups": {"a": []}})


# Rocket Launching


def _rocket() -> nn.Module:
    return _build("rocket_launching", shared_layer_sizes=[6], booster_layer_sizes=[8, 5], light_layer_sizes=[3])


def test_rocket_serves_the_light_net_alone() -> None:
    model = _rocket()
    dense, ids, kjt = _inputs()
    booster_calls = []
    model.booster.register_forward_hook(lambda *_: booster_calls.append(1))
    light_train, _ = model(dense, kjt)
    model.eval()
    served = model(dense, kjt)
    shared = model.shared(torch.cat([*_rows(model, ids), dense], dim=1))
    torch.testing.assert_close(served, model.light(shared).squeeze(-1))
    torch.testing.assert_close(served, light_train)
    assert len(booster_calls) == 1, "the booster ran in eval mode"


def _grads(loss: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """d loss / d params, zeros where ``loss`` does not depend on a parameter."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def test_rocket_gradient_block() -> None:
    model = _rocket()
    dense, _, kjt = _inputs()
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    light, booster = model(dense, kjt)
    total = model.loss((light, booster), labels)
    hint = nn.functional.mse_loss(light, booster.detach())
    torch.testing.assert_close(total, bce(light, labels) + bce(booster, labels) + hint)
    booster_params, light_params = list(model.booster.parameters()), list(model.light.parameters())
    # The booster learns from its own cross-entropy only: the hint loss sends it nothing.
    for got, want in zip(_grads(total, booster_params), _grads(bce(booster, labels), booster_params)):
        torch.testing.assert_close(got, want)
    assert all(g.abs().sum() > 0 for g in _grads(bce(booster, labels), booster_params))
    # The light net learns from its cross-entropy and from the hint.
    light_ce = _grads(bce(light, labels), light_params)
    assert all(g.abs().sum() > 0 for g in light_ce)
    for got, ce, h in zip(_grads(total, light_params), light_ce, _grads(hint, light_params)):
        torch.testing.assert_close(got, ce + h)
    assert any(g.abs().sum() > 0 for g in _grads(hint, light_params))
    # The shared layers hear from both nets.
    shared = list(model.shared.parameters())
    assert all(g.abs().sum() > 0 for g in _grads(bce(booster, labels), shared))
    assert all(g.abs().sum() > 0 for g in _grads(bce(light, labels), shared))


def test_training_loss_hook() -> None:
    model = _rocket()
    dense, _, kjt = _inputs()
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    outputs = model(dense, kjt)
    loss, logits = registry.training_loss(model, outputs, labels)
    torch.testing.assert_close(loss, model.loss(outputs, labels))
    assert logits is outputs[0]
    model.eval()
    served = model(dense, kjt)
    loss, logits = registry.training_loss(model, served, labels)
    torch.testing.assert_close(loss, bce(served, labels))
    assert logits is served


def test_rocket_light_net_learns_with_the_hint() -> None:
    # Fresh batches with 10% label noise keep the booster's logits bounded, as on real data.
    schema = criteo_schema(num_dense=3, num_sparse=4, rows=[ROWS] * 4, dim=DIM)
    torch.manual_seed(0)
    model = registry.build_model("rocket_launching", {}, schema=schema, device=CPU)
    gen = torch.Generator().manual_seed(2)

    def batch(n: int) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
        dense, ids = torch.randn(n, 3, generator=gen), torch.randint(0, ROWS, (n, 4), generator=gen)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=schema.sparse_names, values=ids.t().flatten(), lengths=torch.ones(4 * n, dtype=torch.long)
        )
        labels = (ids[:, 0] < ROWS // 2).float()
        return dense, kjt, torch.where(torch.rand(n, generator=gen) < 0.1, 1 - labels, labels)

    held_dense, held_kjt, held_labels = batch(512)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):
        dense, kjt, labels = batch(128)
        loss = model.loss(model(dense, kjt), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    light, booster = model(held_dense, held_kjt)
    # From ln 2 = 0.69 towards the noise floor (0.33).
    assert bce(light, held_labels) < 0.5 and bce(booster, held_labels) < 0.5


def test_rocket_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"model\.hint_weight"):
        registry.model_config("rocket_launching", {"hint_weight": -1.0})
    with pytest.raises(ConfigError, match=r"model\.light_layer_sizes"):
        registry.model_config("rocket_launching", {"light_layer_sizes": [0]})
