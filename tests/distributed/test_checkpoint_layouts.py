"""Tables change layout: the optimizer state follows them on load (column-wise <-> table-wise,
data-parallel <-> fused; shardrec/checkpoint/relayout.py), and the offline tools rewrite a
checkpoint for a new plan (``checkpoint reshard``) or as plain per-table files (``checkpoint export``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import tiny_job_dict
from shardrec.errors import CheckpointError
from shardrec.checkpoint.store import load
from shardrec.checkpoint.reshard import reshard_checkpoint
from shardrec.checkpoint.dcp_reader import SavedCheckpoint
from shardrec.checkpoint.export_tables import export_checkpoint

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
def moved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A checkpoint in the BEFORE layouts, and the run resumed from a copy of it in the AFTER layouts."""
    tmp = tmp_path_factory.mktemp("relayout")
    done = _train(tmp, BEFORE)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp / "runs" / "dlrm").iterdir()
    copy = tmp / "moved"
    shutil.copytree(run, copy)
    # Resuming at the last step trains nothing and saves again, now in the AFTER layouts.
    done = _train(tmp, AFTER, f"--resume={copy}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run / "checkpoints" / "step-00000004", copy, done.stdout


@pytest.fixture(scope="module")
def states(moved: tuple[Path, Path, str]) -> tuple[SavedCheckpoint, SavedCheckpoint, str]:
    step, copy, stdout = moved
    return SavedCheckpoint(step), SavedCheckpoint(copy / "checkpoints" / "step-00000004"), stdout


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
    assert "note: optimizer state of ['t_C2', 't_C3', 't_C4', 't_C5'] converted" in stdout, stdout
    assert "starts from zero" not in stdout


def test_weights_are_unchanged(states: tuple[SavedCheckpoint, SavedCheckpoint, str]) -> None:
    before, after, _ = states
    weights = [k for k in before.tensors if k.startswith("model.")]
    assert weights
    for key in weights:
        assert torch.equal(after.read(key), before.read(key)), key


def _chunks(saved: SavedCheckpoint, key: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return sorted((tuple(c.offsets), tuple(c.sizes)) for c in saved.tensors[key].chunks)


def test_offline_reshard_equals_the_conversion_on_load(moved: tuple[Path, Path, str], tmp_path: Path) -> None:
    step, copy, _ = moved
    out = tmp_path / "resharded"
    reshard_checkpoint(step, plan=copy / "plan.json", out=out, block_bytes=256)  # several blocks per shard
    online, offline = SavedCheckpoint(copy / "checkpoints" / "step-00000004"), SavedCheckpoint(out)
    assert offline.tensors.keys() == online.tensors.keys()
    for key in online.tensors:
        assert torch.equal(offline.read(key), online.read(key)), key
        assert _chunks(offline, key) == _chunks(online, key), key
    assert yaml.safe_load((out / "plan.json").read_text()) == yaml.safe_load((copy / "plan.json").read_text())
    assert not list(tmp_path.glob("*.tmp-*"))


def test_resharded_checkpoint_resumes_with_its_plan(moved: tuple[Path, Path, str], tmp_path: Path) -> None:
    step, copy, _ = moved
    run = tmp_path / "run"
    reshard_checkpoint(step, plan=copy / "plan.json", out=run / "checkpoints" / "step-00000004")
    shutil.copyfile(run / "checkpoints" / "step-00000004" / "config.yaml", run / "config.yaml")
    before = SavedCheckpoint(run / "checkpoints" / "step-00000004")
    expected = {k: before.read(k) for k in before.tensors}
    done = _train(tmp_path, AFTER, f"--resume={run}", f"--sharding.plan={copy / 'plan.json'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "converted" not in done.stdout
    after = SavedCheckpoint(run / "checkpoints" / "step-00000004")
    for key, value in expected.items():
        assert torch.equal(after.read(key), value), key


def test_export_writes_one_plain_file_per_table(moved: tuple[Path, Path, str], tmp_path: Path) -> None:
    step, _, _ = moved
    out = tmp_path / "export"
    manifest = export_checkpoint(step, out, block_bytes=100)
    saved = SavedCheckpoint(step)
    assert sorted(manifest["tables"]) == ["t_C1", "t_C2", "t_C3", "t_C4", "t_C5", "t_C6"]
    for name, entry in manifest["tables"].items():
        weight = torch.load(out / entry["file"], weights_only=True, mmap=True)
        assert weight.shape == (entry["rows"], entry["dim"])
        assert torch.equal(weight, saved.read("model." + entry["key"])), name
    dense = torch.load(out / "dense.pt", weights_only=True)
    assert dense and all(torch.equal(v, saved.read("model." + k)) for k, v in dense.items())
    with pytest.raises(CheckpointError, match="already exists"):
        export_checkpoint(step, out)


def test_reshard_rejects_a_plan_for_other_tables(moved: tuple[Path, Path, str], tmp_path: Path) -> None:
    step, copy, _ = moved
    plan = yaml.safe_load((copy / "plan.json").read_text())
    plan["tables"] = [t for t in plan["tables"] if t["table"] != "t_C6"]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(CheckpointError, match=r"not planned \['t_C6'\]"):
        reshard_checkpoint(step, plan=tmp_path / "plan.json", out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_truncated_checkpoint_is_named_before_anything_loads(moved: tuple[Path, Path, str], tmp_path: Path) -> None:
    step, _, _ = moved
    broken = tmp_path / "step-00000004"
    shutil.copytree(step, broken)
    data = broken / "__1_0.distcp"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated: '__1_0.distcp' has \d+ bytes"):
        load(broken, model=torch.nn.Linear(1, 1), optimizer=torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1))
    with pytest.raises(CheckpointError, match="truncated"):
        export_checkpoint(broken, tmp_path / "export")
    (broken / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="data file '__1_0.distcp' is missing"):
        reshard_checkpoint(broken, plan=step / "plan.json", out=tmp_path / "out")
