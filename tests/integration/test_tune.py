"""``shardrec tune`` end to end on Ray Tune (an embedded local Ray): a 4-trial grid with ASHA
stopping the trials that learn nothing, the results files, the best job trained as it is, a
resumed finished sweep, and bad space files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import tiny_job_dict
from shardrec.data.synthetic_signal import generate

pytestmark = pytest.mark.slow

STEPS, EVAL = 240, 24


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardrec.cli", *args], capture_output=True, text=True, timeout=900, cwd=cwd,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tune")
    data = tiny_job_dict(tmp, steps=STEPS, train={"eval_interval": EVAL, "log_interval": EVAL, "progress_bar": False},
                         checkpoint={"enabled": False}, run={"root": str(tmp / "runs")})
    # Training and evaluation rows drawn with one planted signal, so a learning trial's AUC rises.
    from shardrec.config import build
    from shardrec.data.schema import FeatureSchema

    schema = build(FeatureSchema, data["features"], key="features")
    for name, rows, seed in (("train", 8192, 1), ("eval", 2048, 2)):
        generate(schema, rows=rows, path=tmp / f"signal_{name}.parquet", seed=seed, signal_seed=7, zipf_a=1.2, row_group_size=1024)
    data["data"].update(train_path=str(tmp / "signal_train.parquet"), eval_path=str(tmp / "signal_eval.parquet"))
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def sweep(job: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    space = job.parent / "space.yaml"
    # The first grid point learns; the others barely move their weights, and ASHA cuts them.
    space.write_text(yaml.safe_dump({"train.dense_optimizer.lr": {"grid": [0.003, 1.0e-7]},
                                     "train.sparse_optimizer.lr": {"grid": [0.1, 1.0e-7]}}, sort_keys=False))
    out = job.parent / "sweep"
    done = _cli("tune", str(job), "--space", str(space), "--samples", "1", "--scheduler", "asha", "--out", str(out), cwd=job.parent)
    return done, out


def _rows(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "results.json").read_text())["trials"]


def test_a_sweep_stops_trials_early_and_writes_its_results(sweep: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, out = sweep
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "Trial status" in done.stdout  # Ray's live progress table
    rows = _rows(out)
    assert len(rows) == 4
    by_lrs = {(r["param:train.dense_optimizer.lr"], r["param:train.sparse_optimizer.lr"]): r for r in rows}
    assert set(by_lrs) == {(0.003, 0.1), (0.003, 1e-7), (1e-7, 0.1), (1e-7, 1e-7)}
    learner = by_lrs[(0.003, 0.1)]
    assert rows[0] is not None and rows[0]["trial"] == learner["trial"]  # best first
    assert learner["status"] == "completed" and learner["evals"] == STEPS // EVAL and learner["steps"] == STEPS
    assert learner["auc"] > 0.6
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped, rows
    for r in stopped:
        assert r["evals"] < STEPS // EVAL and r["steps"] < STEPS
        # Its run did not go on to the end: the ranks stopped with the trial.
        result = Path(r["run"]) / "result.json"
        assert not result.is_file() or json.loads(result.read_text())["status"] == "interrupted"
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [t["trial"] for t in table] == [r["trial"] for r in rows] and {"auc", "evals", "steps", "status"} <= set(table[0])
    assert "results (auc, max; best first):" in done.stdout and learner["trial"] in done.stdout
    leftover = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.strip()
    assert not leftover, f"processes of the sweep still running: {leftover}"


def test_the_best_job_trains_as_it_is(sweep: tuple[subprocess.CompletedProcess[str], Path], job: Path) -> None:
    done, out = sweep
    assert done.returncode == 0
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["dense_optimizer"]["lr"] == 0.003 and best["train"]["sparse_optimizer"]["lr"] == 0.1
    assert best["run"]["root"] == str(job.parent / "runs")  # not a trial's folder
    trained = _cli("train", str(out / "best.yaml"), "--nproc", "2", cwd=job.parent)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "eval auc" in trained.stdout


def test_resume_of_a_finished_sweep_reruns_nothing(sweep: tuple[subprocess.CompletedProcess[str], Path], job: Path) -> None:
    done, out = sweep
    before = _rows(out)
    again = _cli("tune", str(job), "--space", str(job.parent / "space.yaml"), "--out", str(out), "--resume", cwd=job.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    after = _rows(out)
    assert [(r["trial"], r["status"], r["evals"]) for r in after] == [(r["trial"], r["status"], r["evals"]) for r in before]
    runs = {p for r in after for p in (out / "trials" / r["trial"] / "runs").glob("*/*")}
    assert len(runs) == 4  # no trial trained again


@pytest.mark.parametrize("space, message", [
    ({"train.dense_optimizer.lrr": {"uniform": [0.001, 0.01]}}, "train.dense_optimizer.lrr"),
    ({"train.dense_optimizer.lr": {"loguniform": [0, 0.1]}}, "'loguniform' needs low > 0"),
])
def test_a_bad_space_is_one_line_before_anything_starts(job: Path, space: dict[str, Any], message: str) -> None:
    path = job.parent / "bad_space.yaml"
    path.write_text(yaml.safe_dump(space))
    out = job.parent / "never"
    done = _cli("tune", str(job), "--space", str(path), "--out", str(out), cwd=job.parent)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardrec: error: ") and message in lines[0] and "bad_space.yaml" in lines[0]
    assert not out.exists()


def test_optuna_cannot_take_a_grid(job: Path) -> None:
    path = job.parent / "grid_space.yaml"
    path.write_text(yaml.safe_dump({"train.seed": {"grid": [0, 1]}}))
    done = _cli("tune", str(job), "--space", str(path), "--search", "optuna", "--out", str(job.parent / "never2"), cwd=job.parent)
    assert done.returncode == 2 and "optuna" in done.stderr and "'choice'" in done.stderr


def test_optuna_with_median_stopping(job: Path) -> None:
    path = job.parent / "optuna_space.yaml"
    path.write_text(yaml.safe_dump({"train.dense_optimizer.lr": {"loguniform": [1.0e-4, 1.0e-2]},
                                    "train.sparse_optimizer.lr": {"choice": [0.05, 0.1]}}))
    out = job.parent / "optuna"
    done = _cli("tune", str(job), "--space", str(path), "--search", "optuna", "--scheduler", "median", "--samples", "3",
                "--out", str(out), cwd=job.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 3 and all(r["status"] in ("completed", "stopped early") for r in rows)
    assert all(1e-4 <= r["param:train.dense_optimizer.lr"] <= 1e-2 and r["param:train.sparse_optimizer.lr"] in (0.05, 0.1) for r in rows)
    assert (out / "best.yaml").is_file()
