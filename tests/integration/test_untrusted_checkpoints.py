"""Opening a crafted checkpoint or export folder runs nothing from it, at every entry point.

The payload is a pickle whose ``__reduce__`` calls ``os.system("touch MARKER")``, the classic
attack on ``pickle.load``. It is put where each reader looks: DCP's ``.metadata`` (inspect,
reshard, checkpoint export, export, resume, warm start), a non-tensor value inside a ``.distcp``
file (DCP's default planner ``torch.load``s those with ``weights_only=False``) and an export's
``model.pt`` (predict). Each case asserts one clear error line, a non-zero exit, no marker file,
and no output folder. A control test shows the payload does run under DCP's own reader.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from shardrec import cli
from shardrec.checkpoint.config import WarmStartConfig
from shardrec.checkpoint.safe_read import read_metadata, safe_load
from shardrec.checkpoint.store import load
from shardrec.checkpoint.warm_start import warm_start
from shardrec.errors import CheckpointError
from shardrec.launch.spawn import run_ranks
from shardrec.train.worker import run
from tests.helpers import tiny_job


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


def _train(job, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    run(job, run_dir=run_dir, resume=None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed checkpoint of a tiny 2-rank DLRM run."""
    tmp = tmp_path_factory.mktemp("run")
    job = tiny_job(tmp, steps=4, checkpoint={"enabled": True})
    run_ranks(_train, job, tmp / "run")
    return tmp / "run" / "checkpoints" / "step-00000004"


@pytest.fixture
def crafted(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the checkpoint whose .metadata is the payload, and the marker it would create."""
    ckpt, marker = tmp_path / "step-00000004", tmp_path / "pwned"
    shutil.copytree(trained, ckpt)
    import pickle

    (ckpt / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    return ckpt, marker


def _one_error_line(capsys: pytest.CaptureFixture[str], *, names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("shardrec: error: ") and "\n" not in err and "Traceback" not in err, err
    assert names in err and "nothing in it ran" in err
    return err


def test_dcp_own_reader_runs_the_payload(crafted: tuple[Path, Path]) -> None:
    ckpt, marker = crafted
    with pytest.raises(Exception):
        dcp.FileSystemReader(str(ckpt)).read_metadata()
    assert marker.exists(), "the control failed: the payload must run under plain pickle.load"


@pytest.mark.parametrize("argv", [
    ["checkpoint", "inspect", "{ckpt}"],
    ["checkpoint", "reshard", "{ckpt}", "--plan", "{plan}", "--out", "{out}"],
    ["checkpoint", "export", "{ckpt}", "--out", "{out}"],
    ["export", "{ckpt}", "--out", "{out}"],
], ids=["inspect", "reshard", "checkpoint-export", "export"])
def test_cli_refuses_crafted_metadata(crafted: tuple[Path, Path], trained: Path, tmp_path: Path, argv: list[str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, marker = crafted
    out = tmp_path / "out"
    args = [a.format(ckpt=ckpt, plan=trained / "plan.json", out=out) for a in argv]
    assert cli.main(args) == 2
    _one_error_line(capsys, names=str(ckpt / ".metadata"))
    assert not marker.exists() and not out.exists()


def test_resume_refuses_crafted_metadata(crafted: tuple[Path, Path]) -> None:
    ckpt, marker = crafted
    model = nn.Linear(2, 1)
    with pytest.raises(CheckpointError, match="nothing in it ran"):
        load(ckpt, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), warn=False)
    assert not marker.exists()


def test_warm_start_refuses_crafted_metadata(crafted: tuple[Path, Path]) -> None:
    ckpt, marker = crafted
    model = nn.Linear(2, 1)
    with pytest.raises(CheckpointError, match="nothing in it ran"):
        warm_start(WarmStartConfig(path=str(ckpt)), model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), warn=False)
    assert not marker.exists()


def test_crafted_value_inside_a_shard_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    dcp.save({"step": _Payload(marker), "w": torch.ones(2)}, checkpoint_id=str(tmp_path / "ckpt"))
    assert not marker.exists()
    read_metadata(tmp_path / "ckpt")  # the metadata itself is plain DCP metadata
    state = {"step": 0, "w": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="'step' is not plain data"):
        safe_load(state, tmp_path / "ckpt")
    assert not marker.exists()
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))  # control: DCP's default planner runs it
    assert marker.exists()


def test_plain_values_still_load(tmp_path: Path) -> None:
    dcp.save({"step": 7, "lrs": [0.1, 0.2], "w": torch.arange(3.0)}, checkpoint_id=str(tmp_path / "ckpt"))
    state = {"step": 0, "lrs": [], "w": torch.zeros(3)}
    safe_load(state, tmp_path / "ckpt")
    assert state["step"] == 7 and state["lrs"] == [0.1, 0.2] and torch.equal(state["w"], torch.arange(3.0))


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", b"not a pickle at all"], ids=["empty", "truncated", "text"])
def test_damaged_metadata_is_one_clear_error(trained: Path, tmp_path: Path, content: bytes,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "step-00000004"
    shutil.copytree(trained, ckpt)
    (ckpt / ".metadata").write_bytes(content)
    assert cli.main(["checkpoint", "inspect", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("shardrec: error: ") and "\n" not in err and "damaged" in err and str(ckpt) in err


def test_predict_refuses_a_crafted_model_file(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pickle

    export = tmp_path / "export"
    assert cli.main(["export", str(trained), "--out", str(export)]) == 0
    marker = tmp_path / "pwned"
    (export / "model.pt").write_bytes(pickle.dumps(_Payload(marker)))
    out = tmp_path / "scores.parquet"
    data = next((trained.parents[2] / "data").glob("*eval*"), None) or next((trained.parents[2]).rglob("*.parquet"))
    capsys.readouterr()
    rc = cli.main(["predict", "--model", str(export), "--data", str(data), "--out", str(out), "--id-column", "label", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("shardrec: error: ") and "\n" not in err and str(export / "model.pt") in err
    assert not marker.exists() and not out.exists()
