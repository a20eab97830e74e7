"""The search space file of ``shardrec tune``: distributions, '*' over lists, checks against the job."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import tiny_job_dict
from shardrec.errors import ConfigError
from shardrec.tune.space import check_against, read_space, set_key, with_params


def _space(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_space_of_each_kind(tmp_path: Path) -> None:
    dims = read_space(_space(tmp_path, {
        "train.dense_optimizer.lr": {"loguniform": [1e-4, 1e-1]}, "model.mlp.dropout": {"uniform": [0.0, 0.5]},
        "data.batch_size": {"randint": [64, 256]}, "train.seed": {"grid": [0, 1]},
        "features.tables.*.embedding_dim": {"choice": [8, 16]},
    }))
    assert [(d.key, d.kind, d.args) for d in dims] == [
        ("train.dense_optimizer.lr", "loguniform", (1e-4, 1e-1)), ("model.mlp.dropout", "uniform", (0.0, 0.5)),
        ("data.batch_size", "randint", (64, 256)), ("train.seed", "grid", (0, 1)),
        ("features.tables.*.embedding_dim", "choice", (8, 16)),
    ]
    assert dims[0].probes()[:2] == [1e-4, 1e-1] and 1e-4 < dims[0].probes()[2] < 1e-1 and dims[4].probes() == [8, 16]


@pytest.mark.parametrize("spec, message", [
    ({"loguniform": [0, 1]}, "'loguniform' needs low > 0"),
    ({"uniform": [0.5, 0.1]}, "needs low < high"),
    ({"uniform": [0.1]}, "takes \\[low, high\\]"),
    ({"randint": [1.5, 4]}, "whole numbers"),
    ({"choice": []}, "non-empty list"),
    ({"normal": [0, 1]}, "unknown distribution 'normal'"),
    ({"uniform": [0, 1], "choice": [1]}, "one distribution"),
    (0.1, "one distribution"),
])
def test_bad_ranges_name_the_file_and_key(tmp_path: Path, spec: object, message: str) -> None:
    path = _space(tmp_path, {"train.dense_optimizer.lr": spec})
    with pytest.raises(ConfigError, match=message) as info:
        read_space(path)
    assert f"'{path}'" in str(info.value) and "'train.dense_optimizer.lr'" in str(info.value)


def test_a_space_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must map job keys"):
        read_space(_space(tmp_path, ["train.lr"]))
    with pytest.raises(ConfigError, match="does not exist"):
        read_space(tmp_path / "nope.yaml")


def test_set_key_reaches_every_item_of_a_list() -> None:
    data = {"features": {"tables": [{"name": "a", "embedding_dim": 4}, {"name": "b", "embedding_dim": 4}]}}
    set_key(data, "features.tables.*.embedding_dim", 16)
    assert [t["embedding_dim"] for t in data["features"]["tables"]] == [16, 16]
    set_key(data, "train.dense_optimizer.lr", 0.1)
    assert data["train"] == {"dense_optimizer": {"lr": 0.1}}
    with pytest.raises(ConfigError, match="'\\*' must stand for the items"):
        set_key(data, "train.*.lr", 1)
    original = {"a": {"b": 1}}
    assert with_params(original, {"a.b": 2}) == {"a": {"b": 2}} and original == {"a": {"b": 1}}


def test_keys_and_values_are_checked_against_the_job(tmp_path: Path) -> None:
    base = tiny_job_dict(tmp_path)
    ok = read_space(_space(tmp_path, {"train.dense_optimizer.lr": {"loguniform": [1e-4, 1e-1]},
                                      "features.tables.*.embedding_dim": {"choice": [4, 8]}}))
    check_against(ok, base, space=tmp_path / "space.yaml")
    for spec, message in [
        ({"train.dense_optimizer.lrr": {"uniform": [0.1, 0.2]}}, "train.dense_optimizer.lrr"),
        ({"data.batch_size": {"uniform": [64, 128]}}, "data.batch_size"),  # a float for an int key
        ({"train.sparse_optimizer.lr": {"uniform": [0.0, 0.1]}}, "must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message) as info:
            check_against(read_space(_space(tmp_path, spec)), base, space=tmp_path / "space.yaml")
        assert "search space file" in str(info.value) and next(iter(spec)) in str(info.value)
