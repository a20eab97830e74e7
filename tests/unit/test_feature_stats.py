"""Dense normalization, clip, fill_missing: mean and quantile buckets: statistics from one streamed
pass over the training data (row group by row group) equal those of the whole column, and every
reader applies them the same way; a schema that needs them cannot be read without them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardrec.config import build, to_dict
from shardrec.data.feature_stats import FeatureStats, apply_stats, compute_stats, read_stats, write_stats
from shardrec.data.reader import ParquetReader
from shardrec.data.schema import DenseFeature, FeatureSchema, SparseFeature, TableConfig
from shardrec.errors import ConfigError, DataError

ROWS = 5000


def _data(tmp_path: Path, *, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cols = {
        "label": rng.integers(0, 2, ROWS).astype(np.int8),
        "price": rng.lognormal(5.0, 1.5, ROWS),  # heavy-tailed, in the thousands
        "ratio": rng.uniform(0, 1, ROWS),
        "age": rng.normal(40, 12, ROWS),
        "id": rng.integers(0, 50, ROWS),
    }
    price = pa.array(cols["price"], mask=rng.uniform(size=ROWS) < 0.1)  # 10% missing
    cols["price_masked"] = np.where(price.is_null().to_numpy(zero_copy_only=False), np.nan, cols["price"])
    table = pa.table({"label": cols["label"], "price": price, "ratio": cols["ratio"], "age": cols["age"], "id": cols["id"]})
    path = tmp_path / "train.parquet"
    pq.write_table(table, path, row_group_size=700)  # 8 row groups: the pass combines them
    return path, cols


def _schema(**dense: dict) -> FeatureSchema:
    return FeatureSchema(
        label="label",
        dense=[DenseFeature(name=name, **kw) for name, kw in dense.items()],
        sparse=[SparseFeature(name="id", table="t_id"), SparseFeature(name="age_b", source="age", num_buckets=8, table="t_age")],
        tables=[TableConfig(name="t_id", num_embeddings=50, embedding_dim=4), TableConfig(name="t_age", num_embeddings=8, embedding_dim=4)],
    )


def _read_all(path: Path, schema: FeatureSchema):
    (batch,) = list(ParquetReader(path, schema=schema, batch_size=ROWS))
    return batch


def test_streamed_statistics_equal_the_whole_columns(tmp_path: Path) -> None:
    path, cols = _data(tmp_path)
    schema = _schema(price={"normalize": "log_zscore", "fill_missing": "mean", "clip": [0.0, 5000.0]},
                     ratio={"normalize": "minmax"}, age={"normalize": "zscore"})
    stats = compute_stats(path, schema)
    price = np.clip(cols["price_masked"], 0, 5000)
    seen = price[~np.isnan(price)]
    s = stats.dense["price"]
    assert s.count == seen.size and s.missing == ROWS - seen.size
    assert math.isclose(s.raw_mean, seen.mean(), rel_tol=1e-12)
    assert math.isclose(s.mean, np.log1p(seen).mean(), rel_tol=1e-12)
    assert math.isclose(s.std, np.log1p(seen).std(), rel_tol=1e-9)
    assert stats.dense["ratio"].min == cols["ratio"].min() and stats.dense["ratio"].max == cols["ratio"].max()
    assert math.isclose(stats.dense["age"].std, cols["age"].std(), rel_tol=1e-9)
    expected = np.unique(np.quantile(cols["age"], np.arange(1, 8) / 8))
    np.testing.assert_allclose(stats.quantiles["age_b"], expected)


def test_readers_apply_the_statistics(tmp_path: Path) -> None:
    path, cols = _data(tmp_path)
    schema = _schema(price={"normalize": "log_zscore", "fill_missing": "mean", "clip": [0.0, 5000.0]},
                     ratio={"normalize": "minmax"}, age={"normalize": "zscore"})
    stats = compute_stats(path, schema)
    batch = _read_all(path, apply_stats(schema, stats, where="test"))
    dense = batch.dense_features.numpy()
    price = np.clip(cols["price_masked"], 0, 5000)
    filled = np.log1p(np.where(np.isnan(price), stats.dense["price"].raw_mean, price))
    np.testing.assert_allclose(dense[:, 0], (filled - stats.dense["price"].mean) / stats.dense["price"].std, atol=1e-5)
    assert dense[:, 1].min() == 0.0 and abs(dense[:, 1].max() - 1.0) < 1e-6  # minmax on the training range
    assert abs(dense[:, 2].mean()) < 1e-4 and abs(dense[:, 2].std() - 1.0) < 1e-4  # zscore
    buckets = batch.sparse_features["age_b"].values().numpy()
    assert buckets.min() == 0 and buckets.max() == 7
    counts = np.bincount(buckets, minlength=8)
    assert counts.min() > 0.8 * ROWS / 8  # quantile buckets are about equally full


def test_eval_data_use_the_training_statistics(tmp_path: Path) -> None:
    train, _ = _data(tmp_path)
    other = tmp_path / "eval"
    other.mkdir()
    held_out, cols = _data(other, seed=1)
    schema = _schema(age={"normalize": "zscore"})
    stats = compute_stats(train, schema)
    dense = _read_all(held_out, apply_stats(schema, stats, where="test")).dense_features.numpy()
    np.testing.assert_allclose(dense[:, 0], (cols["age"] - stats.dense["age"].mean) / stats.dense["age"].std, atol=1e-5)
    # Statistics of the held-out data itself would center it exactly; the training ones do not.
    assert abs(dense[:, 0].mean()) > 1e-3


def test_a_schema_that_needs_statistics_is_not_read_without_them(tmp_path: Path) -> None:
    path, _ = _data(tmp_path)
    schema = _schema(age={"normalize": "zscore"})
    with pytest.raises(ConfigError, match="features.sparse 'age_b': num_buckets needs the training data's quantiles"):
        _read_all(path, schema)
    dense_only = FeatureSchema(label="label", dense=schema.dense)
    with pytest.raises(ConfigError, match="features.dense 'age': normalize: zscore .* needs the training data's statistics"):
        _read_all(path, dense_only)
    stats = compute_stats(path, _schema(ratio={"normalize": "zscore"}))
    with pytest.raises(ConfigError, match="stats.json' has no statistics for feature 'age'"):
        apply_stats(schema, stats, where="'stats.json'")


def test_statistics_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    path, _ = _data(tmp_path)
    schema = _schema(age={"normalize": "zscore"})
    stats = compute_stats(path, schema)
    out = tmp_path / "feature_stats.json"
    write_stats(out, stats)
    assert read_stats(out) == stats
    (tmp_path / "bad.json").write_text(json.dumps({"format": 1, "dense": {"age": {"mean": 1}}}))
    with pytest.raises(ConfigError, match="bad.json' is not a shardrec feature statistics file"):
        read_stats(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="does not exist; compute it with shardrec data stats"):
        read_stats(tmp_path / "missing.json")


def test_a_column_without_values_has_no_statistics(tmp_path: Path) -> None:
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"label": [0, 1], "x": pa.array([None, None], pa.float64())}), path)
    schema = FeatureSchema(label="label", dense=[DenseFeature(name="x", normalize="zscore", fill_missing=0.0)])
    with pytest.raises(DataError, match="column 'x' .* has no non-missing value"):
        compute_stats(path, schema)


@pytest.mark.parametrize(("feature", "message"), [
    ({"name": "x", "normalize": "l2"}, "valid choices: none, zscore, minmax, log_zscore"),
    ({"name": "x", "clip": [3, 1]}, "clip must be \\[lo, hi\\] with finite lo < hi"),
    ({"name": "x", "normalize": "log_zscore", "transform": "log1p"}, "log_zscore already takes log1p"),
    ({"name": "x", "fill_missing": "median"}, "fill_missing"),
])
def test_bad_dense_options_name_the_key(feature: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(FeatureSchema, {"dense": [feature]}, key="features")


def test_num_buckets_checks_and_resolved_fields_stay_out_of_the_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num_buckets 8 is more than table 't' has rows \\(4\\)"):
        FeatureSchema(sparse=[SparseFeature(name="b", source="x", num_buckets=8, table="t")],
                      tables=[TableConfig(name="t", num_embeddings=4, embedding_dim=2)])
    with pytest.raises(ConfigError, match="num_buckets cannot be combined with boundaries"):
        SparseFeature(name="b", source="x", num_buckets=8, boundaries=[1.0], table="t")
    path, _ = _data(tmp_path)
    schema = _schema(age={"normalize": "zscore"})
    resolved = apply_stats(schema, compute_stats(path, schema), where="test")
    assert to_dict(resolved) == to_dict(schema)  # statistics are not YAML keys: a dumped job loads again
    assert isinstance(FeatureStats.from_json(json.loads(json.dumps(compute_stats(path, schema).to_json())), where="x"), FeatureStats)


def test_data_stats_command_and_a_stats_file_for_another_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from shardrec.cli import main as cli_main

    path, _ = _data(tmp_path)
    features = to_dict(_schema(age={"normalize": "zscore"}, ratio={"normalize": "minmax"}))
    job = {"model": {"name": "dlrm", "dense_arch_layer_sizes": [8, 4]},
           "features": {**features, "tables": [{**t, "embedding_dim": 4} for t in features["tables"]]},
           "data": {"train_path": str(path)}, "train": {"steps": 2}, "run": {"root": str(tmp_path / "runs")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    out = tmp_path / "stats" / "feature_stats.json"
    assert cli_main(["data", "stats", str(tmp_path / "job.yaml"), "--out", str(out)]) == 0
    assert read_stats(out) == compute_stats(path, build(FeatureSchema, job["features"], key="features"))
    assert f"use it with data.feature_stats={out}" in capsys.readouterr().out
    other = FeatureStats(source="x", rows=1)
    write_stats(tmp_path / "other.json", other)
    rc = cli_main(["train", str(tmp_path / "job.yaml"), f"--data.feature_stats={tmp_path / 'other.json'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has no statistics for feature 'age' (and 2 more)" in err[0]
    assert not (tmp_path / "runs").exists()  # rejected before the run folder is made
