"""Embedding storage precision (``features.table_precision`` / a table's ``precision``): the
schema, the embedding configs every model builds, the planner's bytes and choices, plan files,
checkpoint loads and export dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import TensorProperties, TensorStorageMetadata
from torchrec.modules.embedding_configs import DataType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.config import build, to_dict
from helpers import sequence_schema
from shardrec.data.schema import FeatureSchema, criteo_schema
from shardrec.errors import ConfigError, PlanError
from shardrec.models.layers import build_ebc
from shardrec.checkpoint.store import precision_changes
from shardrec.models.registry import build_model
from shardrec.serving.config import ExportConfig
from shardrec.serving.export_model import table_dtypes
from shardrec.sharding.config import ShardingConfig, TableConstraint
from shardrec.sharding.plan_file import check_plan
from shardrec.sharding.plan_job import TableSpec, read_tables, tables_model
from shardrec.sharding.planner import constraints, fp16_choices, half_tables, make_plan
from shardrec.sharding.report import build_report, format_report
from shardrec.sharding.shardable import model_tables
from shardrec.sharding.planner import from_topology_config
from shardrec.sharding.topology import parse_topology

META = torch.device("meta")


def _schema(**changes: object) -> FeatureSchema:
    data = to_dict(criteo_schema(num_dense=2, num_sparse=3, rows=[100, 200, 300], dim=8))
    data.update(changes)
    return build(FeatureSchema, data, key="features")


def test_table_precision_is_every_tables_default_and_a_table_overrides_it() -> None:
    data = to_dict(criteo_schema(num_dense=2, num_sparse=3, rows=[100, 200, 300], dim=8))
    data["tables"][1]["precision"] = "fp32"
    schema = build(FeatureSchema, {**data, "table_precision": "fp16"}, key="features")
    assert [t.storage for t in schema.tables] == ["fp16", "fp32", "fp16"]
    # A schema built from another's tables (as models build their sub-schemas) keeps what was resolved.
    sub = FeatureSchema(sparse=schema.sparse[:1], tables=schema.tables[:1])
    assert sub.tables[0].storage == "fp16"
    # The resolved value is not a YAML key: a saved job keeps only what the user wrote.
    assert "resolved" not in to_dict(schema)["tables"][0] and to_dict(schema)["tables"][0]["precision"] is None
    assert [t.storage for t in _schema().tables] == ["fp32"] * 3


def test_an_unknown_precision_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"features.table_precision.*fp32, fp16"):
        _schema(table_precision="bf16")


def test_models_build_fp16_tables_bags_and_sequences() -> None:
    ebc = build_ebc(_schema(table_precision="fp16"), device=META)
    assert {c.data_type for c in ebc.embedding_bag_configs()} == {DataType.FP16}
    assert {p.dtype for p in ebc.parameters()} == {torch.float16}  # what the planner sizes
    seq = build(FeatureSchema, {**to_dict(sequence_schema(dim=8)), "table_precision": "fp16"}, key="features")
    model = build_model("sasrec", {"loss": {"kind": "in_batch"}}, schema=seq, device=META)
    assert half_tables(model) == set(model_tables(model)) == {"item"}  # through an EmbeddingCollection
    cpu = build_ebc(_schema(table_precision="fp16"), device=torch.device("cpu"))  # unsharded lookups give fp32 vectors
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["C1", "C2", "C3"], values=torch.tensor([1, 2, 3]), lengths=torch.ones(3, dtype=torch.long))
    assert cpu(kjt).values().dtype == torch.float32


def _report(specs: list[TableSpec]):
    spec = from_topology_config(parse_topology("1x2xH100"))
    tables = {t.name: (t.rows, t.dim) for t in specs}
    result = make_plan(tables_model(specs), cfg=ShardingConfig(compute_device="cuda", default=TableConstraint(sharding_types=["table_wise"])),
                       tables=tables, topology=spec, pg=None)
    return build_report(result.options, spec)


def test_the_planner_halves_the_weight_bytes_of_an_fp16_table() -> None:
    rows, dim = 1_000_000, 128
    report = _report([TableSpec(name="a", rows=rows, dim=dim), TableSpec(name="b", rows=rows, dim=dim, precision="fp16")])
    by_name = {t.name: t for t in report.tables}
    full, half = by_name["a"].hbm_bytes, by_name["b"].hbm_bytes
    assert (by_name["a"].precision, by_name["b"].precision) == ("fp32", "fp16")
    assert full >= rows * dim * 4 and half >= rows * dim * 2
    # The weights halve; the rest (row-wise Adagrad's one value per row) is small beside them.
    assert full - half == pytest.approx(rows * dim * 2, rel=0.02)
    text = format_report(report)
    assert "dtype" in text and "fp16" in text


def test_table_lists_take_a_precision_column(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("name,rows,dim,precision\na,10,4,fp16\nb,10,4,\n")
    assert [t.precision for t in read_tables(path)] == ["fp16", "fp32"]
    path.write_text("name,rows,dim,precision\na,10,4,int8\n")
    with pytest.raises(ConfigError, match=r"t.csv line 2.precision'; valid choices: fp32, fp16"):
        read_tables(path)


def test_fp16_tables_are_never_data_parallel_or_dense() -> None:
    out = constraints(ShardingConfig(), ["a", "b"], half={"b"})
    assert out["a"].sharding_types is None
    assert "data_parallel" not in out["b"].sharding_types and "dense" not in out["b"].compute_kernels
    assert fp16_choices("b", TableConstraint(sharding_types=["data_parallel", "row_wise"]))["sharding_types"] == ["row_wise"]
    with pytest.raises(ConfigError, match=r"table 'b' is fp16.*sharding.tables.b.*precision: fp32"):
        constraints(ShardingConfig(tables={"b": TableConstraint(sharding_types=["data_parallel"])}), ["a", "b"], half={"b"})


def test_a_plan_file_giving_an_fp16_table_the_dense_optimizer_is_refused() -> None:
    plan = {"topology": {"world_size": 2, "local_world_size": 2, "compute_device": "cpu"},
            "tables": [{"table": "t", "rows": 10, "dim": 4, "sharding_type": "data_parallel", "compute_kernel": "dense"}]}
    check_plan(plan, path=Path("p.json"), tables={"t": (10, 4)}, world_size=2, compute_device="cpu")
    with pytest.raises(PlanError, match=r"p.json': table 't' is fp16.*plan again"):
        check_plan(plan, path=Path("p.json"), tables={"t": (10, 4)}, world_size=2, compute_device="cpu", half={"t"})


def test_checkpoint_load_names_tables_read_at_another_precision() -> None:
    def md(dtype: torch.dtype) -> TensorStorageMetadata:
        return TensorStorageMetadata(properties=TensorProperties(dtype=dtype), size=torch.Size([2, 2]), chunks=[])

    key = "model.model.ebc.embedding_bags.t_C1.weight"
    flat = {key: torch.zeros(2, 2), "model.model.mlp.weight": torch.zeros(2, 2)}
    saved = {key: md(torch.float16), "model.model.mlp.weight": md(torch.float32)}
    assert precision_changes(flat, saved) == ["t_C1 fp16 -> fp32"]
    assert precision_changes(flat, {**saved, key: md(torch.float32)}) == []


def test_export_keeps_each_tables_training_precision_unless_told() -> None:
    schema = _schema(tables=[{"name": "t_C1", "num_embeddings": 100, "embedding_dim": 8, "precision": "fp16"},
                             {"name": "t_C2", "num_embeddings": 200, "embedding_dim": 8},
                             {"name": "t_C3", "num_embeddings": 300, "embedding_dim": 8}])
    model = build_model("dlrm", {"dense_arch_layer_sizes": [16, 8]}, schema=schema, device=META)
    cfg = ExportConfig(checkpoint=Path("c"), out=Path("o"))
    assert table_dtypes(model, cfg) == {"t_C1": "fp16", "t_C2": "none", "t_C3": "none"}
    assert table_dtypes(model, ExportConfig(checkpoint=Path("c"), out=Path("o"), quantize="int8")) == dict.fromkeys(
        ["t_C1", "t_C2", "t_C3"], "int8")
    assert table_dtypes(model, ExportConfig(checkpoint=Path("c"), out=Path("o"), table_quantize={"t_C1": "none"}))["t_C1"] == "none"


def test_a_prepared_schema_yaml_holds_no_resolved_precision(tmp_path: Path) -> None:
    from shardrec.data.datasets.common import _non_default

    schema = _schema(table_precision="fp16")
    assert _non_default(schema.tables[0]) == {"name": "t_C1", "num_embeddings": 100, "embedding_dim": 8}
