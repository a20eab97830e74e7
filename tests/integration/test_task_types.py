"""Task types end to end on a crafted table whose numeric columns differ in scale by 1000x:
``shardrec train`` on 2 ranks (a regression DLRM; an MMoE mixing regression, string multiclass
and binary tasks) with z-scored / min-max / log-z-scored dense features and quantile buckets,
then export and predict. The loss falls, the metrics follow each task's type, the training
data's statistics are kept in the run and its checkpoint, and predict normalizes new data with
the training statistics (not its own): a value, class probabilities with the argmax class, a
probability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from shardrec.cli import main as cli_main

ROWS = 3000
CLASSES = ["high", "low", "mid"]


def _table(rng: np.random.Generator, rows: int) -> pa.Table:
    area = rng.lognormal(7.0, 0.6, rows)  # in the thousands
    rooms = rng.uniform(0, 1, rows)
    age = rng.normal(40, 10, rows)
    zone = rng.integers(0, 20, rows)
    value = 2.0 * np.log(area) / 7.0 + 1.5 * rooms - 0.02 * (age - 40) + 0.1 * (zone % 4) + rng.normal(0, 0.1, rows)
    cls = np.where(value > np.quantile(value, 0.66), "high", np.where(value < np.quantile(value, 0.33), "low", "mid"))
    click = (rng.uniform(size=rows) < 1 / (1 + np.exp(-3 * (rooms - 0.5)))).astype(np.int8)
    return pa.table({"area": area, "rooms": rooms, "age": age, "zone": zone, "value": value, "tier": cls, "click": click})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    pq.write_table(_table(rng, ROWS), tmp / "train.parquet", row_group_size=500)
    pq.write_table(_table(rng, 600), tmp / "eval.parquet")
    return tmp


def _job(tmp: Path, *, model: dict, label: object, steps: int = 150) -> Path:
    job = {
        "model": model,
        "features": {
            "label": label,
            "dense": [{"name": "area", "normalize": "log_zscore"}, {"name": "rooms", "normalize": "minmax"},
                      {"name": "age", "normalize": "zscore", "clip": [0, 100]}],
            "sparse": [{"name": "zone", "table": "t_zone"}, {"name": "age_b", "source": "age", "num_buckets": 8, "table": "t_age"}],
            "tables": [{"name": "t_zone", "num_embeddings": 20, "embedding_dim": 8}, {"name": "t_age", "num_embeddings": 8, "embedding_dim": 8}],
        },
        "data": {"train_path": str(tmp / "train.parquet"), "eval_path": str(tmp / "eval.parquet"), "batch_size": 64, "prefetch": 0},
        "train": {"steps": steps, "progress_bar": False, "log_interval": 10, "timeout_s": 120,
                  "dense_optimizer": {"name": "adam", "lr": 0.01}, "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.1}},
        "checkpoint": {"enabled": True},
        "run": {"root": str(tmp / "runs")},
    }
    path = tmp / f"{model['name']}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _train(job: Path) -> Path:
    assert cli_main(["train", str(job), "--nproc", "2"]) == 0
    (run,) = [p for p in (job.parent / "runs").glob("*/*") if (p / "config.yaml").read_text() and p.parent.name in job.stem]
    return run


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _normalized(stats: dict, table: pa.Table) -> np.ndarray:
    """The dense input as the job defines it, computed here from the statistics file alone."""
    area, rooms, age = (table.column(c).to_numpy() for c in ("area", "rooms", "age"))
    s = stats["dense"]
    return np.stack([
        (np.log1p(area) - s["area"]["mean"]) / s["area"]["std"],
        (rooms - s["rooms"]["min"]) / (s["rooms"]["max"] - s["rooms"]["min"]),
        (np.clip(age, 0, 100) - s["age"]["mean"]) / s["age"]["std"],
    ], axis=1).astype(np.float32)


def test_regression_trains_exports_and_predicts_with_the_training_statistics(data: Path, tmp_path: Path) -> None:
    run = _train(_job(data, model={"name": "dlrm", "dense_arch_layer_sizes": [16, 8], "over_arch_layer_sizes": [32, 1]},
                      label={"name": "value", "type": "regression"}))
    losses = [r["loss"] for r in _records(run, "train")]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2])
    (final,) = _records(run, "eval")[-1:]
    assert {"rmse", "mae", "r2"} <= set(final) and "auc" not in final and final["r2"] > 0.5
    stats = json.loads((run / "feature_stats.json").read_text())
    assert stats["rows"] == ROWS and len(stats["quantiles"]["age_b"]) == 7
    checkpoint = json.loads((run / "result.json").read_text())["checkpoint"]
    assert json.loads((Path(checkpoint) / "feature_stats.json").read_text()) == stats

    out = tmp_path / "model"
    assert cli_main(["export", checkpoint, "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["feature_stats"] == stats and manifest["outputs"]["tasks"][0]["kind"] == "value"
    # New data whose own statistics differ from the training data's: the larger houses only.
    held_out = pq.read_table(data / "eval.parquet")
    big = held_out.filter(pa.compute.greater(held_out.column("area"), float(np.median(held_out.column("area").to_numpy()))))
    pq.write_table(big, tmp_path / "big.parquet")
    scores = tmp_path / "scores.parquet"
    assert cli_main(["predict", "--model", str(out), "--data", str(tmp_path / "big.parquet"), "--out", str(scores),
                     "--id-column", "zone"]) == 0
    got = pq.read_table(scores)
    assert got.column_names == ["zone", "score"]
    module = torch.jit.load(str(out / "model.pt"))
    dense = torch.from_numpy(_normalized(stats, big))
    age = big.column("age").to_numpy()
    buckets = np.searchsorted(np.asarray(stats["quantiles"]["age_b"]), age, side="right")
    values = torch.from_numpy(np.concatenate([big.column("zone").to_numpy(), buckets]).astype(np.int64))
    lengths = torch.ones(2 * big.num_rows, dtype=torch.int32)
    with torch.inference_mode():
        expected = module(dense, values, lengths).numpy()
    np.testing.assert_allclose(got.column("score").to_numpy(), expected, atol=1e-5)
    assert np.corrcoef(got.column("score").to_numpy(), big.column("value").to_numpy())[0, 1] > 0.7


def test_multi_task_model_mixes_regression_string_multiclass_and_binary(data: Path, tmp_path: Path) -> None:
    label = [{"name": "value", "type": "regression", "loss": "huber", "huber_delta": 1.0},
             {"name": "tier", "type": "multiclass", "num_classes": 3, "weight": 0.5}, "click"]
    run = _train(_job(data, model={"name": "mmoe", "num_experts": 2, "expert_layer_sizes": [32], "tower_layer_sizes": [16]},
                      label=label))
    losses = [r["loss"] for r in _records(run, "train")]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2])
    final = _records(run, "eval")[-1]
    assert {"rmse_task0", "accuracy_task1", "top3_accuracy_task1", "log_loss_task1", "auc_task2"} - set(final) == {"top3_accuracy_task1"}
    assert final["accuracy_task1"] > 0.6 and final["r2_task0"] > 0.5 and final["auc_task2"] > 0.6
    assert json.loads((run / "feature_stats.json").read_text())["classes"] == {"tier": CLASSES}

    out = tmp_path / "model"
    checkpoint = json.loads((run / "result.json").read_text())["checkpoint"]
    assert cli_main(["export", checkpoint, "--out", str(out)]) == 0
    scores = tmp_path / "scores.parquet"
    assert cli_main(["predict", "--model", str(out), "--data", str(data / "eval.parquet"), "--out", str(scores),
                     "--id-column", "zone"]) == 0
    got = pq.read_table(scores)
    probs = [f"score_tier_{c}" for c in CLASSES]
    assert got.column_names == ["zone", "score_value", *probs, "score_click", "class_tier"]
    p = np.stack([got.column(c).to_numpy() for c in probs], axis=1)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert got.column("class_tier").to_pylist() == [CLASSES[i] for i in p.argmax(axis=1)]
    assert 0 < got.column("score_click").to_numpy().min() and got.column("score_click").to_numpy().max() < 1
    truth = pq.read_table(data / "eval.parquet").column("tier").to_pylist()
    assert np.mean([a == b for a, b in zip(got.column("class_tier").to_pylist(), truth)]) > 0.6
