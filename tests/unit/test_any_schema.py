"""Any schema (#17 part 5): every ranking and multi-task model builds, runs forward/backward and
learns on ids alone and on dense features alone, or says in one ConfigError that it needs ids;
the reader yields batches with no sparse or no dense features. Feature groups (#17 part 6): each
part of Wide & Deep and DeepFM reads its own group's features, and groups listing every feature
change nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import SEQUENCE_MODELS, sequence_schema
from shardrec.data.reader import ParquetReader
from shardrec.data.schema import DenseFeature, FeatureSchema, SparseFeature, TableConfig, criteo_schema
from shardrec.errors import ConfigError
from shardrec.models import registry
from shardrec.serving.export_model import ServingModule, to_torchscript

CPU = torch.device("cpu")
ROWS = 50
DIM = 8
RANKING = [n for n in registry.names() if not registry.get(n).retrieval]
"""Every ranking and multi-task model: all but the retrieval ones (user and item towers)."""
NEEDS_IDS = set(SEQUENCE_MODELS)
"""Models that cannot work on dense features alone: the sequence models read a history of ids."""


def _sparse_only(name: str) -> FeatureSchema:
    schema = sequence_schema(dim=DIM) if name in SEQUENCE_MODELS else criteo_schema(num_dense=3, num_sparse=4, rows=[ROWS] * 4, dim=DIM)
    schema.dense = []
    if registry.get(name).multi_task:
        schema.label = ["click", "conversion"]
    return schema


def _dense_only(name: str) -> FeatureSchema:
    schema = criteo_schema(num_dense=3, num_sparse=0)
    if registry.get(name).multi_task:
        schema.label = ["click", "conversion"]
    return schema


def _has_key(name: str, key: str) -> bool:
    return key in {f.name for f in dataclasses.fields(registry.get(name).config_cls)}


def _params(name: str, schema: FeatureSchema) -> dict[str, Any]:
    # Small MLPs keep the loop quick; a schema without tables sets the embedded dense fields' width.
    params: dict[str, Any] = {
        "dlrm": {"dense_arch_layer_sizes": [16, DIM]},
        "rocket_launching": {"hint_weight": 0.0},
        "wukong": {"fmb_layer_sizes": [32], "dense_layer_sizes": [16], "final_layer_sizes": [32]},
        "dcn": {"deep_layer_sizes": [32]},
        "dcnv2": {"deep_layer_sizes": [32]},
        "xdeepfm": {"cin_layer_sizes": [16, 16], "deep_layer_sizes": [32]},
        "masknet": {"block_dim": 32, "mlp_layer_sizes": [32]},
        "bst": {"mlp_layer_sizes": [64, 32]},
    }.get(name, {})
    if not schema.tables and _has_key(name, "dense_embedding_dim"):
        params["dense_embedding_dim"] = DIM
    return params


def _build(name: str, schema: FeatureSchema, device: torch.device = CPU) -> torch.nn.Module:
    return registry.build_model(name, _params(name, schema), schema=schema, device=device)


def _batch(schema: FeatureSchema, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    """Dense values, one id per key and row (3 for a history), and the first key's ids ``[B]``; a
    schema without sparse features gets a KJT with no keys (what the reader yields for it)."""
    dense = torch.randn(batch, len(schema.dense), generator=gen)
    counts = [3 if f.sequence else 1 for f in schema.sparse]
    values = [torch.randint(0, ROWS, (n * batch,), generator=gen) for n in counts]
    lengths = [torch.full((batch,), n, dtype=torch.int32) for n in counts]
    kjt = KeyedJaggedTensor(keys=schema.sparse_names, values=torch.cat(values) if values else torch.empty(0, dtype=torch.long),
                            lengths=torch.cat(lengths) if lengths else torch.empty(0, dtype=torch.int32), stride=batch)
    return dense, kjt, values[0] if values else torch.empty(0)


def _labels(schema: FeatureSchema, signal: torch.Tensor) -> torch.Tensor:
    labels = signal.float()
    return torch.stack([labels, labels], dim=1) if len(schema.labels) > 1 else labels


def _check_learns(name: str, schema: FeatureSchema, dense: torch.Tensor, kjt: KeyedJaggedTensor, labels: torch.Tensor) -> None:
    """A forward/backward reaches every parameter, and 20 Adam steps on one batch halve the
    cross-entropy of the logits the model serves (DIEN's auxiliary loss has a floor of its own)."""
    torch.manual_seed(0)
    model = _build(name, schema)
    loss, logits = registry.training_loss(model, model(dense, kjt), labels)
    assert logits.shape == labels.shape and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    first = bce(logits, labels).item()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        loss, logits = registry.training_loss(model, model(dense, kjt), labels)
        loss.backward()
        opt.step()
    assert bce(logits, labels).item() < 0.5 * first, (first, bce(logits, labels).item())


@pytest.mark.parametrize("name", RANKING)
def test_every_ranking_model_learns_from_ids_alone(name: str) -> None:
    schema = _sparse_only(name)
    assert _build(name, schema, torch.device("meta")) is not None
    dense, kjt, ids = _batch(schema, 32, torch.Generator().manual_seed(2))
    assert dense.shape == (32, 0)
    _check_learns(name, schema, dense, kjt, _labels(schema, ids < ROWS // 2))


@pytest.mark.parametrize("name", RANKING)
def test_every_ranking_model_learns_from_dense_alone_or_says_it_needs_ids(name: str) -> None:
    schema = _dense_only(name)
    if name in NEEDS_IDS:
        with pytest.raises(ConfigError, match=r"features\.sparse"):
            _build(name, schema, torch.device("meta"))
        return
    model = _build(name, schema, torch.device("meta"))
    assert not any("embedding_bags" in n for n, _ in model.named_parameters())  # no tables at all
    dense, kjt, _ = _batch(schema, 32, torch.Generator().manual_seed(2))
    assert kjt.keys() == [] and kjt.stride() == 32
    _check_learns(name, schema, dense, kjt, _labels(schema, dense[:, 0] > 0))


FIELD_MODELS = [n for n in RANKING if _has_key(n, "dense_embedding_dim")]


@pytest.mark.parametrize("name", FIELD_MODELS)
def test_embedded_dense_fields_need_a_width_without_tables(name: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.dense_embedding_dim"):
        registry.build_model(name, {}, schema=_dense_only(name), device=torch.device("meta"))
    mixed = criteo_schema(num_dense=2, num_sparse=2, rows=[ROWS] * 2, dim=DIM)
    with pytest.raises(ConfigError, match=r"model\.dense_embedding_dim' is 4.*embedding_dim \(8\)"):
        registry.build_model(name, {"dense_embedding_dim": 4}, schema=mixed, device=torch.device("meta"))


def test_dense_only_deepfm_embeds_each_dense_field() -> None:
    model = _build("deepfm", _dense_only("deepfm"))
    assert model.dense_embedding.weight.shape == (3, DIM)
    assert model.ebc is None and model.first_order.ebc is None


def test_dense_only_dlrm_interacts_the_embedded_dense_fields() -> None:
    model = _build("dlrm", _dense_only("dlrm"))
    assert model.ebc is None and model.dense_fields.weight.shape == (3, DIM)
    # Bottom output plus 3 fields: 4 * 3 / 2 dot products beside the bottom output.
    first = next(m for m in model.over_arch.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == DIM + 6
    with pytest.raises(ConfigError, match=r"dense_arch_layer_sizes' must end in the fields' width \(8"):
        registry.build_model("dlrm", {"dense_embedding_dim": DIM, "dense_arch_layer_sizes": [16, 4]}, schema=_dense_only("dlrm"),
                             device=torch.device("meta"))


def test_dlrm_without_dense_needs_two_sparse_features() -> None:
    schema = criteo_schema(num_dense=0, num_sparse=1, rows=[ROWS], dim=DIM)
    with pytest.raises(ConfigError, match=r"pairs of sparse features.*'features\.sparse' has 1"):
        _build("dlrm", schema, torch.device("meta"))


def test_a_schema_without_features_names_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"features\.sparse.*features\.dense"):
        _build("widedeep", FeatureSchema(), torch.device("meta"))


def test_reader_yields_batches_without_sparse_or_dense_features(tmp_path: Path) -> None:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"label": np.array([0, 1, 1, 0, 1], np.int8), "I1": np.arange(5, dtype=np.float32),
                             "C1": np.array([1, 2, 3, 4, 5])}), path)
    dense_only = FeatureSchema(dense=[DenseFeature(name="I1")])
    batch = next(iter(ParquetReader(path, schema=dense_only, batch_size=4, prefetch=0)))
    assert batch.sparse_features.keys() == [] and batch.sparse_features.stride() == 4
    assert batch.dense_features.tolist() == [[0.0], [1.0], [2.0], [3.0]]
    sparse_only = FeatureSchema(sparse=[SparseFeature(name="C1", table="t")], tables=[TableConfig(name="t", num_embeddings=8, embedding_dim=4)])
    batch = next(iter(ParquetReader(path, schema=sparse_only, batch_size=4, prefetch=0)))
    assert batch.dense_features.shape == (4, 0) and batch.sparse_features.values().tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Feature groups.


def _crossed_schema() -> FeatureSchema:
    """I1, I2, C1, C2 and their cross C1xC2, each id feature in its own table."""
    return FeatureSchema(
        dense=[DenseFeature(name="I1"), DenseFeature(name="I2")],
        sparse=[SparseFeature(name="C1", table="t1"), SparseFeature(name="C2", table="t2"),
                SparseFeature(name="C1xC2", table="t12", cross=["C1", "C2"], hash=True)],
        tables=[TableConfig(name=n, num_embeddings=ROWS, embedding_dim=DIM) for n in ("t1", "t2", "t12")],
    )


def _tables(ebc: Any) -> list[str]:
    return [] if ebc is None else [c.name for c in ebc.embedding_bag_configs()]


def _inputs(seed: int, **change: int) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """A batch of 4 rows of :func:`_crossed_schema`; ``change`` adds to one feature's ids or values."""
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(4, 2, generator=gen)
    ids = torch.randint(0, ROWS - 10, (3, 4), generator=gen)
    for i, key in enumerate(["I1", "I2"]):
        dense[:, i] += change.get(key, 0)
    for i, key in enumerate(["C1", "C2", "C1xC2"]):
        ids[i] += change.get(key, 0)
    return dense, KeyedJaggedTensor(keys=["C1", "C2", "C1xC2"], values=ids.flatten(), lengths=torch.ones(12, dtype=torch.int32), stride=4)


def _part_moves(part: Any, key: str) -> bool:
    """Whether changing feature ``key`` changes ``part(dense, kjt)``."""
    with torch.no_grad():
        return not torch.equal(part(*_inputs(0)), part(*_inputs(0, **{key: 3})))


def test_widedeep_wide_group_reads_crossed_ids_and_deep_group_the_rest() -> None:
    groups = {"wide": ["C1xC2", "C1"], "deep": ["C1", "C2", "I1", "I2"]}
    model = registry.build_model("widedeep", {"feature_groups": groups}, schema=_crossed_schema(), device=CPU)
    assert _tables(model.wide.ebc) == ["t1_linear", "t12_linear"] and model.wide.dense is None
    assert _tables(model.ebc) == ["t1", "t2"]  # the cross has no embedding: the deep part never reads it
    assert [_part_moves(model.wide, k) for k in ("C1", "C2", "C1xC2", "I1", "I2")] == [True, False, True, False, False]
    assert _part_moves(model, "C1xC2") and _part_moves(model, "I2")


def test_deepfm_groups_feed_first_order_fm_and_deep_apart() -> None:
    groups = {"wide": ["C1xC2"], "fm": ["C1", "C2", "I1"], "deep": ["C2", "I2"]}
    model = registry.build_model("deepfm", {"feature_groups": groups}, schema=_crossed_schema(), device=CPU)
    assert _tables(model.first_order.ebc) == ["t12_linear"] and _tables(model.ebc) == ["t1", "t2"]
    assert model.dense_embedding.weight.shape == (1, DIM)  # I1, an FM field, embedded as v * x
    assert [_part_moves(model.first_order, k) for k in ("C1", "C2", "C1xC2", "I1", "I2")] == [False, False, True, False, False]
    assert model.deep[0].in_features == DIM + 1
    assert _part_moves(model, "I1")  # read by the FM alone


def test_xdeepfm_linear_group_and_deep_group() -> None:
    groups = {"wide": ["C1xC2", "I2"], "deep": ["C1", "C2", "I1"]}
    model = registry.build_model("xdeepfm", {"feature_groups": groups, "cin_layer_sizes": [4], "deep_layer_sizes": [8]},
                                 schema=_crossed_schema(), device=CPU)
    assert _tables(model.linear.ebc) == ["t12_linear"] and _tables(model.ebc) == ["t1", "t2"]
    assert model.cin.layers[0].in_features == 2 * 2 and model.deep[0].in_features == 2 * DIM + 1
    assert [_part_moves(model.linear, k) for k in ("C1", "C2", "C1xC2", "I1", "I2")] == [False, False, True, False, True]
    with pytest.raises(ConfigError, match=r"model\.feature_groups\.wide' feeds the linear part.*model\.linear"):
        registry.model_config("xdeepfm", {"feature_groups": groups, "linear": False})


@pytest.mark.parametrize("name", ["widedeep", "deepfm", "xdeepfm"])
def test_groups_of_every_feature_change_nothing(name: str) -> None:
    schema = criteo_schema(num_dense=2, num_sparse=3, rows=[ROWS] * 3, dim=DIM)
    every = schema.sparse_names + schema.dense_names
    groups = {"wide": every, "deep": every, **({"fm": schema.sparse_names} if name == "deepfm" else {})}
    outputs = []
    for params in ({}, {"feature_groups": groups}):
        torch.manual_seed(0)
        model = registry.build_model(name, params, schema=schema, device=CPU)
        gen = torch.Generator().manual_seed(1)
        dense, kjt, _ = _batch(schema, 6, gen)
        with torch.no_grad():
            outputs.append(([n for n, _ in model.named_parameters()], model(dense, kjt)))
    assert outputs[0][0] == outputs[1][0]
    assert torch.equal(outputs[0][1], outputs[1][1])


@pytest.mark.parametrize(("groups", "match"), [
    ({"wide": ["C9"]}, r"model\.feature_groups\.wide' names unknown feature 'C9'; .*C1, C2, C1xC2, I1, I2"),
    ({"wide": ["C1"], "deep": ["C1", "I1"]}, r"C2, C1xC2, I2 are in no group of 'model\.feature_groups'"),
])
def test_group_errors_name_the_feature(groups: dict[str, list[str]], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        registry.build_model("widedeep", {"feature_groups": groups}, schema=_crossed_schema(), device=CPU)


@pytest.mark.parametrize(("groups", "match"), [
    ({"linear": ["C1"]}, r"unknown group 'linear'; this model's groups: wide \(.*\), deep \("),
    ({"wide": []}, r"model\.feature_groups\.wide' lists no features"),
])
def test_group_config_errors_name_the_key(groups: dict[str, list[str]], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        registry.model_config("widedeep", {"feature_groups": groups})


@pytest.mark.parametrize(("name", "groups"), [
    ("widedeep", {"wide": ["C1xC2", "I1", "I2"], "deep": ["C1", "C2"]}),
    ("deepfm", {"wide": ["C1", "I2"], "fm": ["C1", "C2", "I1"], "deep": ["C2", "C1xC2", "I2"]}),
    ("xdeepfm", {"wide": ["C1xC2", "I1", "I2"], "deep": ["C1", "C2"]}),
])
def test_grouped_models_script_for_serving(name: str, groups: dict[str, list[str]]) -> None:
    # A part whose group has no dense feature, another reading some columns: `shardrec export` scripts both.
    schema = _crossed_schema()
    model = registry.build_model(name, {"feature_groups": groups}, schema=schema, device=CPU).eval()
    scripted = to_torchscript(ServingModule(model, keys=schema.sparse_names), model=name)
    dense, kjt = _inputs(0)
    with torch.no_grad():
        torch.testing.assert_close(scripted(dense, kjt.values(), kjt.lengths()), torch.sigmoid(model(dense, kjt)))
