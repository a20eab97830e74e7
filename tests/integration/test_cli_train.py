"""The real CLI end to end on tiny configs: training, resume, and bad input."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from helpers import tiny_job_dict
from shardrec.cli import main as cli_main


def _write_job(tmp: Path, **kwargs: object) -> Path:
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job_dict(tmp, **kwargs)))
    return path


def _shardrec(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "shardrec.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if r["kind"] == "train"]


def _only_run(tmp: Path) -> Path:
    (run,) = (tmp / "runs" / "dlrm").iterdir()
    return run


@pytest.mark.parametrize("async_save", [False, True])
def test_train_two_ranks_then_resume_matches_uninterrupted(tmp_path: Path, async_save: bool) -> None:
    # With async_save the step-8 checkpoint is written while steps 9-16 train: resuming from it
    # still matches, so the save holds the state of step 8, not a later one.
    # The learning-rate schedule is mid-decay at step 8: a resume must continue it, not restart it.
    schedule = {"warmup_steps": 4, "decay": "cosine", "min_ratio": 0.1}
    job = _write_job(tmp_path, steps=16, checkpoint={"enabled": True, "interval": 8, "async_save": async_save},
                     train={"log_interval": 1, "lr_schedule": schedule})
    first = _shardrec("train", str(job), "--nproc", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sharding plan:" in first.stdout and "eval auc:" in first.stdout
    run = _only_run(tmp_path)
    assert f"checkpoint: {run / 'checkpoints' / 'step-00000016'}" in first.stdout
    assert re.search(r"input: steps waited \d+\.\d% of their time for batches \([\d.]+ s of [\d.]+ s, rank [01]\): "
                     r"(not input-bound|input-bound: )", first.stdout), first.stdout[-2000:]
    waited = json.loads((run / "result.json").read_text())["input"]
    assert 0 <= waited["fraction"] <= 1 and waited["step_s"] > 0 and waited["input_bound"] == (waited["fraction"] > 0.1)
    assert (run / "plan.json").is_file() and (run / "config.yaml").is_file()
    uninterrupted = dict(_losses(run))
    assert sorted(uninterrupted) == list(range(1, 17))
    step8 = run / "checkpoints" / "step-00000008"
    meta = json.loads((step8 / "meta.json").read_text())
    assert meta["format"] == 1 and meta["step"] == 8 and meta["data"]["batch_size"] == 128
    assert 0.1 < meta["lr_schedule"]["factor"] < 1.0
    assert all(torch.load(step8 / f"rank-{r:05d}.pt", weights_only=True)["rng"]["torch"].numel() > 0 for r in (0, 1))

    resumed = _shardrec("train", str(job), "--nproc", "2", "--resume", str(run / "checkpoints" / "step-00000008"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    after = _losses(run)[16:]
    assert [s for s, _ in after] == list(range(9, 17))
    assert [loss for _, loss in after] == [uninterrupted[s] for s in range(9, 17)]


def test_resume_without_checkpoint_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _write_job(tmp_path)
    assert cli_main(["train", str(job), "--resume"]) == 2
    assert "no run under" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--train.stepz=3", "unknown config key 'train.stepz'; valid keys under 'train' are: dense_optimizer"),
        ("--train.pipeline=fast", "invalid value 'fast' for 'train.pipeline'; valid choices: auto, sparse_dist, base"),
        ("--train.steps=many", "'train.steps' must be of type int"),
        ("--model.name=dlrn", "unknown model 'dlrn' (config key 'model.name'); known models: aitm, autoint, bst"),
        ("--data.train_path=/nonexistent/x.parquet", "'/nonexistent/x.parquet' does not exist"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str) -> None:
    job = _write_job(tmp_path)
    assert cli_main(["train", str(job), "--nproc", "1", override]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def _corrupt(tmp: Path, name: str, column: str, values: pa.Array) -> Path:
    table = pq.read_table(tmp / "train.parquet")
    table = table.set_column(table.schema.get_field_index(column), column, values)
    path = tmp / name
    pq.write_table(table, path, row_group_size=1024)
    return path


def _run_bad(tmp: Path, path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    job = _write_job(tmp, checkpoint={"enabled": True, "interval": 1})
    rc = cli_main(["train", str(job), "--nproc", "1", f"--data.train_path={path}", *extra])
    assert rc != 0
    assert not list((tmp / "runs").glob("*/*/checkpoints/step-*"))
    return capsys.readouterr().err


def test_missing_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_job(tmp_path)
    path = tmp_path / "missing.parquet"
    pq.write_table(pq.read_table(tmp_path / "train.parquet").drop(["C3"]), path)
    err = _run_bad(tmp_path, path, capsys)
    assert "missing.parquet" in err and "C3" in err


def test_wrong_column_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_job(tmp_path)
    n = pq.read_metadata(tmp_path / "train.parquet").num_rows
    path = _corrupt(tmp_path, "typed.parquet", "I2", pa.array(["x"] * n))
    err = _run_bad(tmp_path, path, capsys)
    assert "typed.parquet" in err and "I2" in err


def test_id_outside_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_job(tmp_path)
    n = pq.read_metadata(tmp_path / "train.parquet").num_rows
    path = _corrupt(tmp_path, "ids.parquet", "C4", pa.array([9] * n, pa.int64()))  # table t_C4 has 8 rows
    err = _run_bad(tmp_path, path, capsys)
    assert "C4" in err and "t_C4" in err and "hash: true" in err and "ids.parquet" in err


def test_nan_in_dense_rejected_unless_filled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tiny_job_dict(tmp_path)
    n = pq.read_metadata(tmp_path / "train.parquet").num_rows
    path = _corrupt(tmp_path, "nan.parquet", "I1", pa.array([float("nan")] * n, pa.float32()))
    job["features"]["dense"][0]["fill_missing"] = None
    job["data"]["train_path"] = str(path)
    job["checkpoint"] = {"enabled": True, "interval": 1}
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(job))
    assert cli_main(["train", str(tmp_path / "nan.yaml"), "--nproc", "1"]) != 0
    err = capsys.readouterr().err
    assert "nan.parquet" in err and "I1" in err and "fill_missing" in err
    assert not list((tmp_path / "runs").glob("*/*/checkpoints/step-*"))
    job["features"]["dense"][0]["fill_missing"] = 0.0
    job["train"]["steps"] = 2
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(job))
    assert cli_main(["train", str(tmp_path / "nan.yaml"), "--nproc", "1"]) == 0


def test_plan_that_does_not_fit_names_tables_and_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = _write_job(tmp_path, checkpoint={"enabled": True})
    assert cli_main(["train", str(job), "--nproc", "1", "--sharding.memory_per_device_gb=0.00001"]) == 2
    err = capsys.readouterr().err
    assert "no sharding plan fits" in err and "t_C3" in err and "options:" in err
    assert not list((tmp_path / "runs").glob("*/*/checkpoints/step-*"))
