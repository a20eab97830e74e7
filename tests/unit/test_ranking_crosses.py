"""DCN, DCN-V2, xDeepFM and AutoInt: each interaction layer against its paper's formula, the
non-default structures, initialization after meta materialization, and the config errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema, criteo_schema
from shardrec.errors import ConfigError
from shardrec.models import registry
from shardrec.models.autoint import InteractingLayer
from shardrec.models.dcn import CrossLayer
from shardrec.models.dcnv2 import LowRankMixtureCrossLayer, MatrixCrossLayer
from shardrec.models.layers import DenseFieldEmbedding
from shardrec.models.xdeepfm import CIN, cin_layer
from shardrec.train.weight_init import init_dense

CPU = torch.device("cpu")
ROWS = 20
DIM = 4


def _schema(dims: list[int] | None = None) -> FeatureSchema:
    schema = criteo_schema(num_dense=2, num_sparse=3, rows=[ROWS] * 3, dim=DIM)
    for table, dim in zip(schema.tables, dims or []):
        table.embedding_dim = dim
    return schema


def _inputs(schema: FeatureSchema, batch: int = 5) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    gen = torch.Generator().manual_seed(0)
    keys = schema.sparse_names
    ids = torch.randint(0, ROWS, (len(keys) * batch,), generator=gen)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=ids, lengths=torch.ones(len(keys) * batch, dtype=torch.long))
    return torch.randn(batch, len(schema.dense), generator=gen), kjt


def _randomize(module: torch.nn.Module) -> None:
    # Zero-initialized biases would hide a term that is missing from a forward.
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


def test_dcn_cross_layer_on_a_hand_input() -> None:
    layer = CrossLayer(3, device=CPU)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 0.0, 2.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    x0, x = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, -1.0, 2.0]])
    # x . w = 0.5 + 0 + 4 = 4.5; x0 * 4.5 + b + x
    torch.testing.assert_close(layer(x0, x), torch.tensor([[5.1, 8.2, 15.8]]))


def test_dcnv2_full_rank_layer_matches_formula() -> None:
    layer = MatrixCrossLayer(5, device=CPU)
    gen = torch.Generator().manual_seed(0)
    x0, x = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    w, b = layer.linear.weight, layer.linear.bias
    torch.testing.assert_close(layer(x0, x), x0 * (x @ w.T + b) + x)


def _mixture_by_loop(layer: LowRankMixtureCrossLayer, x0: torch.Tensor, x: torch.Tensor, gating: str, act: str) -> torch.Tensor:
    """DCN-V2 Eq. 3-4 one row and one expert at a time."""
    g = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda t: t}[act]
    rows = []
    for b in range(x.shape[0]):
        experts = []
        for i in range(layer.u.shape[0]):
            low = layer.v[i].T @ x[b]
            inner = low if layer.c is None else g(layer.c[i] @ g(low))
            experts.append(x0[b] * (layer.u[i] @ inner + layer.bias))
        if gating == "constant":
            weights = torch.ones(len(experts))
        else:
            scores = layer.gate.weight @ x[b]
            weights = scores.softmax(0) if gating == "softmax" else scores.sigmoid()
        rows.append(sum(w * e for w, e in zip(weights, experts)) + x[b])
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("gating", "act"), [("softmax", "tanh"), ("sigmoid", "relu"), ("constant", "tanh"), ("softmax", "identity")]
)
def test_dcnv2_low_rank_mixture_matches_paper(gating: str, act: str) -> None:
    layer = LowRankMixtureCrossLayer(6, rank=2, num_experts=3, gating=gating, activation=act, device=CPU)
    _randomize(layer)
    gen = torch.Generator().manual_seed(1)
    x0, x = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    torch.testing.assert_close(layer(x0, x), _mixture_by_loop(layer, x0, x, gating, act))
    assert (layer.c is None) == (act == "identity")
    assert (layer.gate is None) == (gating == "constant")


def test_dcnv2_one_softmax_expert_has_no_gate() -> None:
    kwargs: dict[str, Any] = {"rank": 2, "num_experts": 1, "activation": "tanh", "device": CPU}
    assert LowRankMixtureCrossLayer(6, gating="softmax", **kwargs).gate is None
    assert LowRankMixtureCrossLayer(6, gating="sigmoid", **kwargs).gate is not None


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
def test_dcnv2_structures(structure: str) -> None:
    schema = _schema()
    model = registry.build_model("dcnv2", {"structure": structure, "deep_layer_sizes": [16, 8]}, schema=schema, device=CPU)
    d = 3 * DIM + 2
    # Stacked: the logit reads the deep network's output alone; parallel: [cross output, deep output].
    assert model.logit.in_features == (8 if structure == "stacked" else d + 8)
    dense, kjt = _inputs(schema)
    x0 = torch.cat([*(model.ebc(kjt).to_dict()[k] for k in schema.sparse_names), dense], dim=1)
    x = x0
    for layer in model.cross:
        x = layer(x0, x)
    final = model.deep(x) if structure == "stacked" else torch.cat([x, model.deep(x0)], dim=1)
    torch.testing.assert_close(model(dense, kjt), model.logit(final).squeeze(-1))


def test_cin_layer_matches_hadamard_sum() -> None:
    gen = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 5, 4, generator=gen)
    weight = torch.randn(6, 3 * 5, generator=gen)
    want = torch.zeros(2, 6, 4)
    for h in range(6):
        for i in range(3):
            for j in range(5):
                want[:, h] += weight[h, i * 5 + j] * x[:, i] * x0[:, j]
    torch.testing.assert_close(cin_layer(x, x0, weight), want)


def test_cin_split_half_halves_the_hidden_layers() -> None:
    full = CIN(3, [4, 6, 5], split_half=False, device=CPU)
    half = CIN(3, [4, 6, 5], split_half=True, device=CPU)
    assert full.output_dim == 15 and [m.in_features for m in full.layers] == [9, 12, 18]
    assert half.output_dim == 2 + 3 + 5 and [m.in_features for m in half.layers] == [9, 6, 9]
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    # Each hidden layer passes its first half on and sum-pools its second half into the output.
    z1 = cin_layer(x0, x0, half.layers[0].weight)
    z2 = cin_layer(z1[:, :2], x0, half.layers[1].weight)
    z3 = cin_layer(z2[:, :3], x0, half.layers[2].weight)
    want = torch.cat([z1[:, 2:].sum(2), z2[:, 3:].sum(2), z3.sum(2)], dim=1)
    torch.testing.assert_close(half(x0), want)


@pytest.mark.parametrize("linear", [True, False])
def test_xdeepfm_linear_part_is_optional(linear: bool) -> None:
    model = registry.build_model("xdeepfm", {"linear": linear}, schema=_schema(), device=torch.device("meta"))
    linear_tables = [n for n in model.state_dict() if "_linear" in n]
    assert bool(linear_tables) == linear


def test_autoint_attention_rows_sum_to_one_and_match_inner_products() -> None:
    layer = InteractingLayer(4, num_heads=2, head_dim=3, residual=True, device=CPU)
    e = torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(0))
    att = layer.attention(e)
    assert att.shape == (5, 2, 7, 7)
    torch.testing.assert_close(att.sum(dim=-1), torch.ones(5, 2, 7))
    q, k = layer.query(e)[..., 3:], layer.key(e)[..., 3:]  # head 1; scores are unscaled inner products
    torch.testing.assert_close(att[:, 1], (q @ k.transpose(1, 2)).softmax(-1))


def test_autoint_residual_path() -> None:
    e = torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(0))
    with_res = InteractingLayer(4, num_heads=2, head_dim=3, residual=True, device=CPU)
    with torch.no_grad():
        with_res.value.weight.zero_()
    # No attended values: only the residual projection is left inside the ReLU.
    torch.testing.assert_close(with_res(e), torch.relu(with_res.residual(e)))
    without = InteractingLayer(4, num_heads=2, head_dim=3, residual=False, device=CPU)
    assert without.residual is None
    v = without.value(e).unflatten(2, (2, 3)).transpose(1, 2)
    torch.testing.assert_close(without(e), torch.relu((without.attention(e) @ v).transpose(1, 2).flatten(2)))


def test_autoint_dense_fields_scale_their_own_vector() -> None:
    emb = DenseFieldEmbedding(2, 4, init="normal", device=CPU)
    dense = torch.tensor([[2.0, -1.0]])
    torch.testing.assert_close(emb(dense)[0], torch.stack([2.0 * emb.weight[0], -1.0 * emb.weight[1]]))
    model = registry.build_model("autoint", {}, schema=_schema(), device=torch.device("meta"))
    # 3 sparse + 2 dense fields, each 2 heads x 32 wide after the last interacting layer.
    assert model.logit.in_features == 5 * 2 * 32 and model.deep is None


VARIANTS = [
    ("dcn", {"num_cross_layers": 2, "deep_layer_sizes": [8]}),
    ("dcnv2", {"structure": "parallel", "low_rank": 2, "num_experts": 3, "gating": "sigmoid", "deep_layer_sizes": [8]}),
    ("dcnv2", {"low_rank": 3, "expert_activation": "identity", "gating": "constant", "num_experts": 2}),
    ("xdeepfm", {"cin_layer_sizes": [4, 3], "split_half": True, "linear": False, "deep_layer_sizes": [8]}),
    ("autoint", {"num_attention_layers": 2, "residual": False, "deep_layer_sizes": [8]}),
]


@pytest.mark.parametrize(("name", "params"), VARIANTS)
def test_variants_train_every_parameter(name: str, params: dict[str, Any]) -> None:
    torch.manual_seed(0)
    schema = _schema()
    model = registry.build_model(name, params, schema=schema, device=CPU)
    logits = model(*_inputs(schema))
    assert logits.shape == (5,)
    logits.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


@pytest.mark.parametrize(("name", "params"), VARIANTS + [("dcnv2", {"low_rank": 2})])
def test_init_dense_fills_every_dense_parameter_after_meta(name: str, params: dict[str, Any]) -> None:
    # DistributedModelParallel materializes meta modules uninitialized; reset_parameters must cover every weight.
    model = registry.build_model(name, params, schema=_schema(), device=torch.device("meta")).to_empty(device=CPU)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    init_dense(model, seed=0)
    dense = {n: p for n, p in model.named_parameters() if "embedding_bags" not in n}
    assert dense
    for pname, p in dense.items():
        assert torch.isfinite(p).all(), f"{pname} is not re-initialized by reset_parameters"


@pytest.mark.parametrize("name", ["dcn", "dcnv2"])
def test_dcns_accept_mixed_embedding_dims(name: str) -> None:
    schema = _schema(dims=[4, 8, 4])
    model = registry.build_model(name, {"deep_layer_sizes": [8]}, schema=schema, device=CPU)
    assert model(*_inputs(schema)).shape == (5,)


@pytest.mark.parametrize("name", ["xdeepfm", "autoint"])
def test_shared_dim_models_name_the_tables(name: str) -> None:
    with pytest.raises(ConfigError, match=r"t_C1=4.*t_C2=8.*features\.tables"):
        registry.build_model(name, {}, schema=_schema(dims=[4, 8, 4]), device=torch.device("meta"))


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("dcn", {"num_cross_layers": 0}, "num_cross_layers"),
        ("dcn", {"deep_layer_sizes": []}, "deep_layer_sizes"),
        ("dcnv2", {"num_experts": 4}, "low_rank"),
        ("dcnv2", {"low_rank": 0}, "low_rank"),
        ("dcnv2", {"low_rank": 4, "num_experts": 0}, "num_experts"),
        ("dcnv2", {"structure": "interleaved"}, "structure"),
        ("dcnv2", {"gating": "topk"}, "gating"),
        ("xdeepfm", {"cin_layer_sizes": [200, 0]}, "cin_layer_sizes"),
        ("xdeepfm", {"cin_layer_sizes": [201, 100], "split_half": True}, "cin_layer_sizes"),
        ("autoint", {"num_heads": 0}, "num_heads"),
        ("autoint", {"attention_dim": -1}, "attention_dim"),
        ("autoint", {"deep_layer_sizes": [400, 0]}, "deep_layer_sizes"),
    ],
)
def test_config_errors_name_the_key(name: str, params: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"model\.{key}"):
        registry.model_config(name, params)


def test_split_half_allows_an_odd_last_layer() -> None:
    assert registry.model_config("xdeepfm", {"cin_layer_sizes": [200, 101], "split_half": True}).split_half
