"""fp16 tables in checkpoints: saved at their precision, restored onto fp32 tables and back, kept
by the offline reshard, and exported as fp16 inference tables."""

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
from shardrec.checkpoint.dcp_reader import SavedCheckpoint
from shardrec.checkpoint.reshard import reshard_checkpoint
from shardrec.data.reader import ParquetReader
from shardrec.job import load_job
from shardrec.serving.config import ExportConfig
from shardrec.serving.export_model import SAVED_PREFIX, build_unsharded, export_model

STEP = "step-00000004"
LAYOUTS = {"t_C1": "row_wise", "t_C3": "column_wise", "t_C5": "table_wise"}


def _train(tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    job = tiny_job_dict(tmp, steps=4, checkpoint={"enabled": True}, features={"table_precision": "fp16"})
    # The same layouts in fp32 and fp16 (an fp32 table could otherwise become data-parallel).
    job["sharding"]["default"] = {"sharding_types": ["table_wise"]}
    job["sharding"]["tables"] = {t: {"sharding_types": [k], "min_partition": 4} for t, k in LAYOUTS.items()}
    (tmp / "job.yaml").write_text(yaml.safe_dump(job))
    return subprocess.run([sys.executable, "-m", "shardrec.cli", "train", str(tmp / "job.yaml"), "--nproc", "2", *extra],
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)


def _tables(saved: SavedCheckpoint) -> dict[str, torch.Tensor]:
    return {k: saved.read(k) for k in saved.tensors if k.startswith("model.") and ".embedding_bags." in k}


def _optimizer(saved: SavedCheckpoint) -> dict[str, torch.Tensor]:
    return {k: saved.read(k) for k in saved.tensors if k.startswith("optim.state.") and ".embedding_bags." in k}


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("fp16ckpt")
    done = _train(tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (tmp / "runs" / "dlrm").iterdir()
    return tmp, run


def test_fp16_tables_are_saved_in_fp16(fp16_run: tuple[Path, Path]) -> None:
    _, run = fp16_run
    saved = SavedCheckpoint(run / "checkpoints" / STEP)
    tables = _tables(saved)
    assert len(tables) == 6 and {v.dtype for v in tables.values()} == {torch.float16}
    # The fused optimizer's state stays fp32 (fbgemm keeps row-wise Adagrad's accumulator in fp32).
    assert {v.dtype for v in _optimizer(saved).values()} == {torch.float32}


def test_fp16_checkpoint_restores_onto_fp32_and_back(fp16_run: tuple[Path, Path]) -> None:
    tmp, run = fp16_run
    original = SavedCheckpoint(run / "checkpoints" / STEP)
    weights, state = _tables(original), _optimizer(original)
    copy = tmp / "as-fp32"
    shutil.copytree(run, copy)
    # Resuming at the last step trains nothing and saves again, now with fp32 tables.
    done = _train(tmp, f"--resume={copy}", "--features.table_precision=fp32")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "weights of t_C1 fp16 -> fp32" in done.stdout and "converted from the checkpoint's precision" in done.stdout
    widened = SavedCheckpoint(copy / "checkpoints" / STEP)
    for key, value in _tables(widened).items():
        assert value.dtype == torch.float32 and torch.equal(value, weights[key].float()), key  # fp16 widens exactly
    for key, value in _optimizer(widened).items():
        assert torch.equal(value, state[key]), key
    # ... and back onto fp16 tables: every weight as it was.
    done = _train(tmp, f"--resume={copy}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "weights of t_C1 fp32 -> fp16" in done.stdout
    back = SavedCheckpoint(copy / "checkpoints" / STEP)
    for key, value in _tables(back).items():
        assert value.dtype == torch.float16 and torch.equal(value, weights[key]), key


def test_offline_reshard_keeps_fp16(fp16_run: tuple[Path, Path], tmp_path: Path) -> None:
    tmp, run = fp16_run
    other = tmp / "other-plan"
    other.mkdir(exist_ok=True)
    job = tiny_job_dict(tmp, steps=4, checkpoint={"enabled": True}, features={"table_precision": "fp16"})
    job["sharding"]["tables"] = {"t_C1": {"sharding_types": ["table_wise"]}, "t_C3": {"sharding_types": ["row_wise"]}}
    (other / "job.yaml").write_text(yaml.safe_dump(job))
    done = subprocess.run([sys.executable, "-m", "shardrec.cli", "plan", str(other / "job.yaml"), "--topology", "1x2xCPU",
                           "--out", str(other / "plan.json"), "--search-seconds", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "resharded"
    reshard_checkpoint(run / "checkpoints" / STEP, plan=other / "plan.json", out=out)
    before, after = _tables(SavedCheckpoint(run / "checkpoints" / STEP)), _tables(SavedCheckpoint(out))
    assert before.keys() == after.keys()
    for key, value in after.items():
        assert value.dtype == torch.float16 and torch.equal(value, before[key]), key


def test_export_keeps_fp16_tables(fp16_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = fp16_run
    manifest = export_model(ExportConfig(checkpoint=run, out=tmp_path / "export"))
    assert {t: (v["precision"], v["dtype"]) for t, v in manifest["tables"].items()} == {
        f"t_C{i}": ("fp16", "fp16") for i in range(1, 7)}
    widened = export_model(ExportConfig(checkpoint=run, out=tmp_path / "export-fp32", quantize="none"))
    assert {v["dtype"] for v in widened["tables"].values()} == {"none"}
    job = load_job(run / "config.yaml", [])
    eager = build_unsharded(job, run / "checkpoints" / STEP)
    assert eager.ebc.embedding_bags["t_C1"].weight.dtype == torch.float16
    saved = SavedCheckpoint(run / "checkpoints" / STEP)
    assert torch.equal(eager.ebc.embedding_bags["t_C1"].weight, saved.read(SAVED_PREFIX + "ebc.embedding_bags.t_C1.weight"))
    batch = next(iter(ParquetReader(job.data.eval_path, schema=job.features, batch_size=200)))
    kjt = batch.sparse_features
    with torch.no_grad():
        expected = torch.sigmoid(eager(batch.dense_features, kjt))
        for folder in ("export", "export-fp32"):  # fp16 inference tables hold the same fp16 values
            served = torch.jit.load(str(tmp_path / folder / "model.pt"))(batch.dense_features, kjt.values(), kjt.lengths())
            assert (served - expected).abs().max().item() < 1e-5, folder
    assert json.loads((tmp_path / "export" / "manifest.json").read_text())["tables"]["t_C1"]["dtype"] == "fp16"
