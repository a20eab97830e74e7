"""`shardrec checkpoint inspect` on a checkpoint written by a real (one-rank) training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import TINY_ROWS, tiny_job_dict
from shardrec.cli import main as cli_main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("inspect")
    job = tiny_job_dict(tmp, steps=4, checkpoint={"enabled": True, "interval": 0})
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    assert cli_main(["train", str(tmp / "job.yaml"), "--nproc", "1"]) == 0
    (run,) = (tmp / "runs" / "dlrm").iterdir()
    return run


def test_inspect_lists_tables_step_and_optimizer_state(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert cli_main(["checkpoint", "inspect", str(run_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["step"] == 4 and data["model"] == "dlrm" and data["world_size"] == 1
    shapes = {t["name"]: t["shape"] for t in data["tables"]}
    assert shapes == {f"t_C{i + 1}": [rows, 8] for i, rows in enumerate(TINY_ROWS)}
    plan = {r["table"]: r["sharding_type"] for r in json.loads((run_dir / "plan.json").read_text())["tables"]}
    for t in data["tables"]:
        assert t["weight_bytes"] == t["shape"][0] * 8 * 4
        assert t["sharding_type"] == plan[t["name"]]
        if t["sharding_type"] != "data_parallel":  # fused tables carry row-wise Adagrad state, one value per row
            assert t["optimizer_state"] == {"momentum1": t["shape"][0] * 4}
    assert data["dense_params"] > 0 and data["config"]["model"]["name"] == "dlrm"


def test_inspect_text_and_bad_paths(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert cli_main(["checkpoint", "inspect", str(run_dir / "checkpoints" / "step-00000004")]) == 0
    out = capsys.readouterr().out
    assert "step 4, model dlrm" in out and "t_C3" in out and "1000x8" in out
    assert cli_main(["checkpoint", "inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    partial = tmp_path / "step-00000009"
    partial.mkdir()
    assert cli_main(["checkpoint", "inspect", str(partial)]) == 2
    assert "is not a complete checkpoint" in capsys.readouterr().err


def test_resume_into_a_different_model_names_what_differs(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = yaml.safe_load((run_dir / "config.yaml").read_text())
    job["features"]["tables"][2]["num_embeddings"] = 999  # t_C3: 1000 rows when saved
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(job))
    capsys.readouterr()
    assert cli_main(["train", str(tmp_path / "other.yaml"), "--nproc", "1", f"--resume={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "was written by a different model" in err and "t_C3" in err and "[1000, 8]" in err and "[999, 8]" in err
