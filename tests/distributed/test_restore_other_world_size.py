"""A checkpoint of 2 ranks restores onto 1 and 3 ranks (other plans) with identical weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from helpers import tiny_job_dict


def _shardrec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardrec.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)


def _weights(step_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    dcp_to_torch_save(str(step_dir), str(out))
    return {k: v for k, v in torch.load(out, weights_only=False)["model"].items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("restore")
    job = tiny_job_dict(tmp, steps=5, checkpoint={"enabled": True, "interval": 0})
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    done = _shardrec("train", str(tmp / "job.yaml"), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp / "runs" / "dlrm").iterdir()
    return tmp, run


@pytest.mark.parametrize("nproc", [1, 3])
def test_restore_onto_other_world_size_keeps_every_weight(trained: tuple[Path, Path], nproc: int) -> None:
    tmp, run = trained
    copy = run.with_name(f"{run.name}-on-{nproc}")
    shutil.copytree(run, copy)
    # Resuming at the last step trains nothing and saves again, now laid out for nproc ranks.
    shutil.rmtree(copy / "checkpoints" / "step-00000005")
    shutil.copytree(run / "checkpoints" / "step-00000005", copy / "checkpoints" / "step-00000005")
    done = _shardrec("train", str(tmp / "job.yaml"), "--nproc", str(nproc), f"--resume={copy}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    before = _weights(run / "checkpoints" / "step-00000005", tmp / "before.pt")
    after = _weights(copy / "checkpoints" / "step-00000005", tmp / f"after-{nproc}.pt")
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    saved_plan = yaml.safe_load((copy / "checkpoints" / "step-00000005" / "plan.json").read_text())
    assert saved_plan["topology"]["world_size"] == nproc
