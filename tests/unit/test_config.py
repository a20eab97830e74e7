"""Typed config loading: errors that name the dotted key and the valid keys or choices, overrides,
YAML files, the default job's round trip, and the schema / model checks that run at load time."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardrec.config import apply_overrides, build, load_yaml, to_dict
from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.job import JobConfig, default_job_text, dump_job, load_job
from shardrec.models import registry
from shardrec.train.config import TrainConfig

TRAIN_KEYS = (
    "dense_optimizer, epochs, eval_batches, eval_interval, log_interval, lr_schedule, pipeline, precision, progress_bar, retrieval, seed, "
    "sparse_optimizer, steps, tensorboard, timeout_s"
)


def _default_data() -> dict[str, Any]:
    return yaml.safe_load(default_job_text())


def _error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_job(None, overrides)
    return str(info.value)


# Unknown keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "full_key", "valid"),
    [
        ("colour=red", "colour", "checkpoint, data, features, model, run, sharding, train"),
        ("train.colour=red", "train.colour", TRAIN_KEYS),
        ("train.sparse_optimizer.colour=red", "train.sparse_optimizer.colour", "eps, lr, name, weight_decay"),
        ("sharding.tables={t_C1: {colour: red}}", "sharding.tables.t_C1.colour", "cache_load_factor, compute_kernels, min_partition, sharding_types"),
        ("model.colour=red", "model.colour", "dense_arch_layer_sizes, dense_arch_mlp, dense_embedding_dim, mlp, over_arch_layer_sizes, over_arch_mlp"),
    ],
)
def test_unknown_key_names_full_dotted_key_and_valid_keys(override: str, full_key: str, valid: str) -> None:
    message = _error([override])
    assert f"unknown config key '{full_key}'" in message
    assert f"are: {valid}" in message


def test_unknown_key_inside_a_list_item_names_its_index() -> None:
    data = _default_data()
    data["features"]["tables"][0]["colour"] = "red"
    with pytest.raises(ConfigError) as info:
        build(JobConfig, data, key="")
    message = str(info.value)
    assert "unknown config key 'features.tables[0].colour'" in message
    assert "valid keys under 'features.tables[0]' are: embedding_dim, name, num_embeddings, pooling" in message


def test_top_level_valid_keys_are_called_the_top_level() -> None:
    assert "valid keys under 'the top level'" in _error(["colour=red"])


# Values: choices, types, required keys ------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "choices"),
    [
        ("train.pipeline=fast", "train.pipeline", "auto, sparse_dist, base"),
        ("sharding.compute_device=tpu", "sharding.compute_device", "auto, cpu, cuda"),
        ("train.sparse_optimizer.name=lamb", "train.sparse_optimizer.name", "rowwise_adagrad, adagrad, adam, sgd"),
        (
            "sharding.default.sharding_types=[table_wise, diagonal]",
            "sharding.default.sharding_types[1]",
            "table_wise, row_wise, column_wise, table_row_wise, table_column_wise, data_parallel",
        ),
    ],
)
def test_literal_errors_list_the_choices(override: str, key: str, choices: str) -> None:
    message = _error([override])
    assert f"for '{key}'; valid choices: {choices}" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=ten", "'train.steps' must be of type int, got 'ten'"),
        ("train.steps=true", "'train.steps' must be of type int, got True"),
        ("train.eval_interval=false", "'train.eval_interval' must be of type int, got False"),
        ("train.steps=2.5", "'train.steps' must be of type int, got 2.5"),
        ("train.progress_bar=1", "'train.progress_bar' must be of type bool, got 1"),
        ("train.timeout_s=fast", "'train.timeout_s' must be of type float, got 'fast'"),
        ("data.synthetic=5", "'data.synthetic' must be a mapping of keys to values, got 5"),
        ("model.over_arch_layer_sizes=8", "'model.over_arch_layer_sizes' must be a list, got 8"),
        ("sharding.tables=[t_C1]", "'sharding.tables' must be a mapping, got ['t_C1']"),
    ],
)
def test_type_errors_name_the_key(override: str, expected: str) -> None:
    assert expected in _error([override])


def test_int_is_accepted_for_float_and_converted() -> None:
    job = load_job(None, ["train.timeout_s=30", "train.sparse_optimizer.lr=1", "sharding.memory_per_device_gb=2"])
    assert job.train.timeout_s == 30.0 and type(job.train.timeout_s) is float
    assert job.train.sparse_optimizer.lr == 1.0 and type(job.train.sparse_optimizer.lr) is float
    assert job.sharding.memory_per_device_gb == 2.0 and type(job.sharding.memory_per_device_gb) is float


def test_float_in_exponent_notation_is_accepted() -> None:
    job = load_job(None, ["train.sparse_optimizer.lr=1e-3"])
    assert job.train.sparse_optimizer.lr == pytest.approx(0.001)


def test_missing_required_top_level_section(tmp_path: Path) -> None:
    data = _default_data()
    del data["data"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"missing config key 'data' \(required\)"):
        load_job(path, [])


def test_missing_required_nested_key() -> None:
    data = _default_data()
    del data["features"]["tables"][2]["num_embeddings"]
    with pytest.raises(ConfigError, match=r"missing config key 'features\.tables\[2\]\.num_embeddings' \(required\)"):
        build(JobConfig, data, key="")


def test_missing_model_name_lists_known_models() -> None:
    data = _default_data()
    del data["model"]["name"]
    with pytest.raises(ConfigError) as info:
        build(JobConfig, data, key="")
    assert "missing config key 'model.name'" in str(info.value)
    assert "known models: " + ", ".join(registry.names()) in str(info.value)


def test_post_init_errors_surface_through_load_job() -> None:
    assert "data.batch_size must be > 0, got 0" in _error(["data.batch_size=0"])
    assert "checkpoint.keep_last_n must be >= 1, got 0" in _error(["checkpoint.keep_last_n=0"])
    assert "train.sparse_optimizer.lr must be > 0, got -1.0" in _error(["train.sparse_optimizer.lr=-1"])


def test_empty_sharding_types_names_the_table_key() -> None:
    assert "sharding.tables.t_C1.sharding_types" in _error(["sharding.tables={t_C1: {sharding_types: []}}"])


# train.steps / train.epochs -----------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [["train.epochs=2"], ["train.steps=null"], ["train.steps=null", "train.epochs=null"]])
def test_steps_and_epochs_are_exclusive(overrides: list[str]) -> None:
    assert "set exactly one of train.steps and train.epochs" in _error(overrides)


def test_epochs_instead_of_steps() -> None:
    job = load_job(None, ["train.steps=null", "train.epochs=3"])
    assert job.train.steps is None and job.train.epochs == 3


@pytest.mark.parametrize(("override", "expected"), [("train.steps=0", "train.steps must be > 0, got 0"),
                                                    ("train.log_interval=0", "train.log_interval > 0")])
def test_train_counts_must_be_positive(override: str, expected: str) -> None:
    assert expected in _error([override])


# apply_overrides ----------------------------------------------------------------------------------


def test_overrides_create_nested_sections_and_keep_siblings() -> None:
    data: dict[str, Any] = {"train": {"steps": 5, "seed": 1}}
    out = apply_overrides(data, ["--train.dense_optimizer.lr=0.5", "a.b.c=x"])
    assert out is data
    assert data == {"train": {"steps": 5, "seed": 1, "dense_optimizer": {"lr": 0.5}}, "a": {"b": {"c": "x"}}}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("[1,2]", [1, 2]),
        ("[a, 2.5]", ["a", 2.5]),
        ("null", None),
        ("true", True),
        ("false", False),
        ("7", 7),
        ("0.25", 0.25),
        ("'7'", "7"),
        ("{x: 1}", {"x": 1}),
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_override_values_are_parsed_as_yaml(raw: str, expected: Any) -> None:
    data = apply_overrides({}, [f"s.k={raw}"])
    assert data["s"]["k"] == expected
    assert type(data["s"]["k"]) is type(expected)


def test_later_override_wins() -> None:
    assert apply_overrides({}, ["s.k=1", "s.k=2"]) == {"s": {"k": 2}}


@pytest.mark.parametrize("item", ["train.steps", "--train.steps", "=5", "--=5"])
def test_malformed_override_is_rejected(item: str) -> None:
    with pytest.raises(ConfigError, match="must look like --section.key=value") as info:
        apply_overrides({}, [item])
    assert f"'{item}'" in str(info.value)


def test_override_through_a_value_that_is_not_a_section() -> None:
    with pytest.raises(ConfigError, match=r"override 'train\.steps\.x=1': 'steps' is not a section"):
        apply_overrides({"train": {"steps": 5}}, ["train.steps.x=1"])


@pytest.mark.parametrize("raw", ["[1,", "@x", "*a"])
def test_unparseable_override_value_raises_config_error(raw: str) -> None:
    with pytest.raises(ConfigError, match="train.steps"):
        apply_overrides({}, [f"train.steps={raw}"])


def test_overrides_take_precedence_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(default_job_text())
    job = load_job(path, ["train.steps=7", "data.batch_size=64"])
    assert (job.train.steps, job.data.batch_size) == (7, 64)
    assert load_job(path, []).train.steps == 300


# load_yaml ----------------------------------------------------------------------------------------


def test_load_yaml_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_yaml(path)
    assert str(path) in str(info.value)


def test_load_yaml_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as info:
        load_yaml(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "42\n"])
def test_load_yaml_non_mapping_names_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="must hold a mapping at the top level") as info:
        load_yaml(path)
    assert str(path) in str(info.value)


def test_load_yaml_returns_the_mapping(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("train: {steps: 3}\nrun: {name: x}\n")
    assert load_yaml(path) == {"train": {"steps": 3}, "run": {"name": "x"}}


# to_dict round trip -------------------------------------------------------------------------------


def test_default_job_round_trips_through_dump(tmp_path: Path) -> None:
    job = load_job(None, [])
    text = dump_job(job)
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    again = load_job(path, [])
    assert again == job
    assert dump_job(again) == text
    # The default job's values survive, not just the structure.
    assert again.model == {"name": "dlrm", "dense_arch_layer_sizes": [64, 16], "over_arch_layer_sizes": [64, 32, 1]}
    assert len(again.features.tables) == 26 and again.features.table("t_C24").num_embeddings == 100_000
    assert again.data.synthetic is not None and again.data.synthetic.train_rows == 320_000


def test_non_default_values_round_trip(tmp_path: Path) -> None:
    overrides = [
        "sharding.tables={t_C1: {sharding_types: [row_wise], min_partition: 4}}",
        "sharding.memory_per_device_gb=1.5",
        "train.steps=null",
        "train.epochs=2",
        "run.name=exp",
    ]
    job = load_job(None, overrides)
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_job(job))
    again = load_job(path, [])
    assert again == job
    assert again.sharding.tables["t_C1"].sharding_types == ["row_wise"]
    assert again.sharding.tables["t_C1"].min_partition == 4
    assert again.train.epochs == 2 and again.run.name == "exp"


def test_to_dict_turns_paths_into_strings_and_recurses() -> None:
    schema = build(FeatureSchema, {"sparse": [{"name": "a", "table": "t"}],
                                   "tables": [{"name": "t", "num_embeddings": 3, "embedding_dim": 2}]}, key="features")
    assert to_dict({"p": Path("/x/y"), "s": [schema]}) == {
        "p": "/x/y",
        "s": [{"label": "label", "dense": [], "sparse": [{"name": "a", "table": "t", "source": None, "hash": False, "weights": None, "sequence": False,
                                                  "max_len": None, "boundaries": None, "num_buckets": None, "cross": None, "raw": False, "negatives": None}],
               "tables": [{"name": "t", "num_embeddings": 3, "embedding_dim": 2, "pooling": "sum", "precision": None}],
               "table_precision": "fp32"}],
    }


def test_build_returns_an_instance_unchanged_and_treats_none_as_empty() -> None:
    job = load_job(None, [])
    assert build(JobConfig, job, key="") is job
    assert build(TrainConfig, None, key="train") == TrainConfig()


# Feature schema -----------------------------------------------------------------------------------


def _schema(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "dense": [{"name": "I1"}],
        "sparse": [{"name": "C1", "table": "t_a"}, {"name": "C2", "table": "t_b"}],
        "tables": [{"name": "t_a", "num_embeddings": 10, "embedding_dim": 4},
                   {"name": "t_b", "num_embeddings": 20, "embedding_dim": 4}],
    }
    data.update(copy.deepcopy(changes))
    return data


def _schema_error(**changes: Any) -> str:
    with pytest.raises(ConfigError) as info:
        build(FeatureSchema, _schema(**changes), key="features")
    return str(info.value)


def test_sparse_feature_naming_unknown_table_lists_known_tables() -> None:
    message = _schema_error(sparse=[{"name": "C1", "table": "t_a"}, {"name": "C2", "table": "t_zz"}, {"name": "C3", "table": "t_b"}])
    assert "features.sparse[1] ('C2') names table 't_zz'" in message
    assert "known tables: t_a, t_b" in message


def test_sparse_feature_with_no_tables_says_none() -> None:
    message = _schema_error(sparse=[{"name": "C1", "table": "t_a"}], tables=[])
    assert "known tables: (none)" in message


def test_duplicate_table_names() -> None:
    message = _schema_error(tables=[{"name": "t_a", "num_embeddings": 10, "embedding_dim": 4},
                                    {"name": "t_a", "num_embeddings": 5, "embedding_dim": 4}])
    assert "features.tables: name 't_a' appears twice" in message


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"sparse": [{"name": "C1", "table": "t_a"}, {"name": "C1", "table": "t_b"}]}, "C1"),
        ({"dense": [{"name": "C2"}]}, "C2"),  # dense and sparse share one namespace (the data's columns)
    ],
)
def test_duplicate_feature_names(changes: dict[str, Any], name: str) -> None:
    assert f"features: name '{name}' appears twice" in _schema_error(**changes)


def test_unused_table_is_named() -> None:
    message = _schema_error(sparse=[{"name": "C1", "table": "t_a"}])
    assert "table 't_b' is used by no sparse feature" in message


@pytest.mark.parametrize(("field", "value"), [("num_embeddings", 0), ("embedding_dim", -1)])
def test_table_sizes_must_be_positive(field: str, value: int) -> None:
    tables = [{"name": "t_a", "num_embeddings": 10, "embedding_dim": 4, field: value},
              {"name": "t_b", "num_embeddings": 20, "embedding_dim": 4}]
    message = _schema_error(tables=tables)
    assert f"table 't_a': {field} must be > 0, got {value}" in message


def test_shared_table_is_valid() -> None:
    schema = build(FeatureSchema, _schema(sparse=[{"name": "C1", "table": "t_a"}, {"name": "C2", "table": "t_a"},
                                                  {"name": "C3", "table": "t_b"}]), key="features")
    assert schema.features_of("t_a") == ["C1", "C2"]
    assert schema.sparse_names == ["C1", "C2", "C3"] and schema.dense_names == ["I1"]


def test_schema_errors_surface_through_load_job() -> None:
    message = _error(["features.sparse=[{name: C1, table: t_nope}]"])
    assert "names table 't_nope'" in message and "known tables: t_C1, t_C2" in message


# Model registry -----------------------------------------------------------------------------------


def test_unknown_model_lists_known_models() -> None:
    assert {"dlrm", "deepfm", "widedeep"} <= set(registry.names())
    with pytest.raises(ConfigError) as info:
        registry.get("dlrn")
    assert "unknown model 'dlrn' (config key 'model.name')" in str(info.value)
    assert f"known models: {', '.join(registry.names())}" in str(info.value)


def test_unknown_model_through_load_job() -> None:
    message = _error(["model.name=transformer"])
    assert "unknown model 'transformer'" in message and "dlrm" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.over_arch_layer_sizes=[64,2]", "'model.over_arch_layer_sizes' must end in 1 (one logit), got [64, 2]"),
        ("model.dense_arch_layer_sizes=[]", "'model.dense_arch_layer_sizes' must be a non-empty list of positive layer widths"),
        ("model.dense_arch_layer_sizes=[64,0,16]", "'model.dense_arch_layer_sizes' must be a non-empty list of positive layer widths"),
        ("model.over_arch_layer_sizes=[a, 1]", "'model.over_arch_layer_sizes[0]' must be of type int, got 'a'"),
    ],
)
def test_dlrm_param_errors_through_load_job(override: str, expected: str) -> None:
    assert expected in _error([override])


def test_dlrm_params_reach_the_job() -> None:
    job = load_job(None, ["model.over_arch_layer_sizes=[8,1]"])
    assert job.model_name == "dlrm"
    assert job.model_params == {"dense_arch_layer_sizes": [64, 16], "over_arch_layer_sizes": [8, 1]}


def test_several_labels_need_a_multi_task_model(tmp_path: Path) -> None:
    from helpers import tiny_job_dict
    from shardrec.config import build as build_config
    from shardrec.job import JobConfig

    job = tiny_job_dict(tmp_path)
    job["features"]["label"] = ["label", "label"]
    with pytest.raises(ConfigError, match=r"features.label lists 2 labels \(label, label\) but model 'dlrm' predicts one"):
        build_config(JobConfig, job, key="")


def test_sparse_adam_on_cpu_is_a_config_error_naming_the_choices() -> None:
    from shardrec.train.config import SparseOptimizerConfig
    from shardrec.sharding.shardable import check_sparse_optimizer

    with pytest.raises(ConfigError, match=r"train\.sparse_optimizer\.name 'adam'.*rowwise_adagrad, adagrad, sgd"):
        check_sparse_optimizer(SparseOptimizerConfig(name="adam"), device_type="cpu")
    check_sparse_optimizer(SparseOptimizerConfig(name="adam"), device_type="cuda")


def test_a_partial_section_keeps_the_fields_own_default() -> None:
    # HSTU's loss defaults to a sampled softmax; naming only the temperature must not reset the kind.
    cfg = registry.model_config("hstu", {"loss": {"temperature": 0.1}})
    assert (cfg.loss.kind, cfg.loss.temperature) == ("sampled", 0.1)
    assert registry.model_config("hstu", {}).loss.temperature == 0.05
