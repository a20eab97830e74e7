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


def test_warm_start_takes_renamed_tables_and_keeps_the_rest_fresh(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    import torch

    job = yaml.safe_load((run_dir / "config.yaml").read_text())
    tables = job["features"]["tables"]
    tables[0]["name"] = "users"  # t_C1 renamed
    job["features"]["sparse"][0]["table"] = "users"
    tables[4]["num_embeddings"] = 301  # t_C5 reshaped: cannot take the saved rows
    job["train"]["steps"] = 1
    job["checkpoint"] = {"enabled": True, "warm_start": {"path": str(run_dir), "tables": {"users": "t_C1"}}}
    job["run"] = {"root": str(tmp_path / "runs"), "name": "warm"}
    (tmp_path / "warm.yaml").write_text(yaml.safe_dump(job))
    capsys.readouterr()
    assert cli_main(["train", str(tmp_path / "warm.yaml"), "--nproc", "1", "--train.steps=1", "--train.sparse_optimizer.lr=1e-9", "--train.dense_optimizer.lr=1e-9"]) == 0
    out = capsys.readouterr().out
    assert "warm start from" in out and "t_C5" in out and "kept fresh values" in out
    (new_run,) = (tmp_path / "runs" / "warm").iterdir()
    dcp_to_torch_save(str(new_run / "checkpoints" / "step-00000001"), str(tmp_path / "new.pt"))
    dcp_to_torch_save(str(run_dir / "checkpoints" / "step-00000004"), str(tmp_path / "old.pt"))
    new, old = torch.load(tmp_path / "new.pt", weights_only=False)["model"], torch.load(tmp_path / "old.pt", weights_only=False)["model"]
    key = "model.ebc.embedding_bags.{}.weight"
    # After one step at lr 1e-9 the renamed and the untouched tables still hold the saved rows.
    torch.testing.assert_close(new[key.format("users")], old[key.format("t_C1")], rtol=0, atol=1e-6)
    torch.testing.assert_close(new[key.format("t_C3")], old[key.format("t_C3")], rtol=0, atol=1e-6)
    assert new[key.format("t_C5")].shape == (301, 8)


def test_warm_start_from_a_table_the_checkpoint_lacks_is_an_error(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = yaml.safe_load((run_dir / "config.yaml").read_text())
    job["checkpoint"] = {"enabled": False, "warm_start": {"path": str(run_dir), "tables": {"t_C1": "nope"}}}
    job["run"] = {"root": str(tmp_path / "runs")}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(job))
    capsys.readouterr()
    assert cli_main(["train", str(tmp_path / "bad.yaml"), "--nproc", "1"]) == 2
    assert "checkpoint.warm_start.tables maps to ['nope']" in capsys.readouterr().err


def test_keep_last_n_prunes_older_checkpoints_and_no_tmp_is_left(tmp_path: Path) -> None:
    job = tiny_job_dict(tmp_path, steps=6, checkpoint={"enabled": True, "interval": 2, "keep_last_n": 2})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert cli_main(["train", str(tmp_path / "job.yaml"), "--nproc", "1"]) == 0
    (run,) = (tmp_path / "runs" / "dlrm").iterdir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
