"""Row-wise Adagrad state follows each table into another layout: column-wise <-> table-wise,
data-parallel <-> fused (shardrec/platform/relayout.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import tiny_job_dict
from shardrec.platform.saved import SavedCheckpoint

P = "model.ebc.embedding_bags"
BEFORE = {"t_C3": "column_wise", "t_C5": "table_wise", "t_C4": "data_parallel", "t_C2": "row_wise"}
AFTER = {"t_C3": "table_wise", "t_C5": "column_wise", "t_C4": "table_wise", "t_C2": "data_parallel"}


def _train(tmp: Path, layouts: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    job = tiny_job_dict(tmp, steps=4, checkpoint={"enabled": True})
    job["sharding"]["tables"] = {t: {"sharding_types": [k], "min_partition": 4} for t, k in layouts.items()}
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    return subprocess.run([sys.executable, "-m", "shardrec.cli", "train", str(tmp / "job.yaml"), "--nproc", "2", *extra],
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)


def _fused(table: str) -> str:
    return f"optim.state.{P}.{table}.weight.{table}.momentum1"


def _dp(table: str) -> str:
    return f"optim.state.{P}.{table}.weight.sum"


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> tuple[SavedCheckpoint, SavedCheckpoint, str]:
    tmp = tmp_path_factory.mktemp("relayout")
    done = _train(tmp, BEFORE)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp / "runs" / "dlrm").iterdir()
    step = run / "checkpoints" / "step-00000004"
    copy = tmp / "moved"
    shutil.copytree(run, copy)
    # Resuming at the last step trains nothing and saves again, now in the AFTER layouts.
    done = _train(tmp, AFTER, f"--resume={copy}")
    assert done.returncode == 0, done.stderr[-3000:]
    return SavedCheckpoint(step), SavedCheckpoint(copy / "checkpoints" / "step-00000004"), done.stdout


def test_column_wise_state_merges_into_table_wise(states: tuple[SavedCheckpoint, SavedCheckpoint, str]) -> None:
    before, after, _ = states
    rows = before.tensors[f"model.{P}.t_C3.weight"].size[0]
    old = before.read(_fused("t_C3")).view(2, rows)  # two column shards of width 4
    assert not torch.equal(old[0], old[1])
    torch.testing.assert_close(after.read(_fused("t_C3")), old.double().mean(0).float(), rtol=0, atol=1e-7)


def test_table_wise_state_splits_into_column_shards(states: tuple[SavedCheckpoint, SavedCheckpoint, str]) -> None:
    before, after, _ = states
    old = before.read(_fused("t_C5"))
    assert old.abs().sum() > 0
    assert torch.equal(after.read(_fused("t_C5")), torch.cat([old, old]))


def test_data_parallel_state_becomes_fused_and_back(states: tuple[SavedCheckpoint, SavedCheckpoint, str]) -> None:
    before, after, stdout = states
    assert _dp("t_C4") in before.tensors and _fused("t_C4") not in before.tensors
    assert torch.equal(after.read(_fused("t_C4")), before.read(_dp("t_C4")).flatten())
    assert torch.equal(after.read(_dp("t_C2")), before.read(_fused("t_C2")).unsqueeze(1))
    assert float(after.read(f"optim.state.{P}.t_C2.weight.step")) == 4.0
    assert "converted from the layout" in stdout and "starts from zero" not in stdout


def test_weights_are_unchanged(states: tuple[SavedCheckpoint, SavedCheckpoint, str]) -> None:
    before, after, _ = states
    weights = [k for k in before.tensors if k.startswith("model.")]
    assert weights
    for key in weights:
        assert torch.equal(after.read(key), before.read(key)), key
