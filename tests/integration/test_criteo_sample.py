"""Real data: the Criteo sample converted to Parquet trains DeepFM on 2 gloo ranks (skips without it)."""

from __future__ import annotations

from pathlib import Path

from shardrec.config import build, to_dict
from shardrec.data.criteo_convert import convert_criteo
from shardrec.data.schema import criteo_schema
from shardrec.job import JobConfig
from shardrec.launch.spawn import run_ranks
from shardrec.train.worker import run


def _train(job: JobConfig, run_dir: Path) -> list[float]:
    return run(job, run_dir=run_dir, resume=None).losses


def test_deepfm_trains_on_converted_criteo_sample(sample_data: Path, tmp_path: Path) -> None:
    parquet = tmp_path / "criteo.parquet"
    stats = convert_criteo(sample_data / "criteo" / "criteo_sample.txt", parquet)
    assert (stats.rows, stats.positives) == (200, 49)
    job = build(
        JobConfig,
        {
            "model": {"name": "deepfm", "deep_layer_sizes": [32, 16]},
            "features": to_dict(criteo_schema(rows=[500] * 26, dim=8)),
            "data": {"train_path": str(parquet), "batch_size": 20, "prefetch": 0},
            "sharding": {"compute_device": "cpu"},
            "train": {"epochs": 6, "steps": None, "progress_bar": False, "timeout_s": 120,
                      "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.1}, "dense_optimizer": {"lr": 0.005}},
            "checkpoint": {"enabled": False},
        },
        key="",
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    losses = run_ranks(_train, job, run_dir)[0]
    per_epoch = len(losses) // 6
    assert len(losses) == 6 * per_epoch == 30
    first, last = losses[:per_epoch], losses[-per_epoch:]
    assert sum(last) / per_epoch < sum(first) / per_epoch - 0.1, losses
