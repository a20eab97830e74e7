"""TensorBoard scalars of a real 2-rank run, read back with tensorboard's own event reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import tiny_job_dict
from shardrec.train.metrics import MetricsLog


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_metrics_log_writes_train_and_eval_scalars(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True, tensorboard=tmp_path / "tb")
    log.write("train", step=10, loss=0.5, samples_per_s=1000.0, lr_dense=0.001)
    log.write("resume", step=10, checkpoint="x")  # not a scalar record
    log.write("eval", step=10, auc=0.75, rows=1024)
    log.close()
    got = _scalars(tmp_path / "tb")
    assert got == {"train/loss": {10: 0.5}, "train/samples_per_s": {10: 1000.0}, "train/lr_dense": {10: pytest.approx(0.001)},
                   "eval/auc": {10: 0.75}, "eval/rows": {10: 1024.0}}
    off = MetricsLog(tmp_path / "off.jsonl", enabled=True)
    off.write("train", step=1, loss=0.1)
    assert not (tmp_path / "tensorboard").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "off.jsonl", "tb"]


def _train(job: Path, *overrides: str) -> Path:
    done = subprocess.run([sys.executable, "-m", "shardrec.cli", "train", str(job), "--nproc", "2", *overrides],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("run folder: ")]
    return Path(line.removeprefix("run folder: "))


def test_a_run_writes_what_metrics_jsonl_holds_as_scalars(tmp_path: Path) -> None:
    schedule = {"warmup_steps": 4, "decay": "cosine", "min_ratio": 0.1}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job_dict(tmp_path, steps=12, train={"log_interval": 2, "eval_interval": 6,
                                                                           "lr_schedule": schedule})))
    run = _train(job)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got = _scalars(run / "tensorboard")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    for name in ("loss", "samples_per_s", "lr_dense", "lr_sparse"):
        assert got[f"train/{name}"] == {r["step"]: pytest.approx(r[name], rel=1e-6) for r in train}, name
    # The rates follow the warm-up then the cosine decay: rising to step 4, falling after.
    lr = [got["train/lr_dense"][s] for s in (2, 4, 6, 12)]
    assert lr[0] < lr[1] and lr[1] > lr[2] > lr[3]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12]
    for name in ("auc", "log_loss"):
        assert got[f"eval/{name}"] == {r["step"]: pytest.approx(r[name], rel=1e-6) for r in evals}, name
    quiet = _train(job, "--train.tensorboard=false")
    assert (quiet / "metrics.jsonl").is_file() and not (quiet / "tensorboard").exists()
