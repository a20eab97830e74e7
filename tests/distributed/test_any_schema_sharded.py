"""Any schema end to end on 2 gloo ranks (#17 parts 5-6): a DeepFM of dense features alone (no
embedding table anywhere) trains through the real CLI, checkpoints, resumes, exports and
predicts; a Wide & Deep of ids alone, its wide part on a crossed feature, trains sharded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from helpers import tiny_job, tiny_job_dict
from shardrec.config import build
from shardrec.job import JobConfig
from shardrec.cli import main as cli_main
from shardrec.launch.spawn import run_ranks
from shardrec.serving.config import ExportConfig
from shardrec.serving.export_model import export_model
from shardrec.train.metrics import auc
from shardrec.train.worker import run


def _dense_data(path: Path, *, rows: int, seed: int) -> Path:
    """I1..I3 ~ N(0, 1); the label follows I1 and the product I2 * I3 (a pairwise interaction)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 3)).astype(np.float32)
    p = 1 / (1 + np.exp(-(2 * x[:, 0] + 2 * x[:, 1] * x[:, 2])))
    cols = {"label": (rng.random(rows) < p).astype(np.int8), **{f"I{i + 1}": x[:, i] for i in range(3)}}
    pq.write_table(pa.table(cols), path, row_group_size=1024)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardrec.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)


def _train_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if m["kind"] == "train"}


def test_dense_only_deepfm_trains_resumes_and_serves(tmp_path: Path) -> None:
    job = tiny_job_dict(tmp_path, model="deepfm", steps=30, checkpoint={"enabled": True, "interval": 15})
    job["model"] = {"name": "deepfm", "dense_embedding_dim": 8, "deep_layer_sizes": [32, 16]}
    job["features"] = {"label": "label", "dense": [{"name": f"I{i}"} for i in (1, 2, 3)], "sparse": [], "tables": []}
    job["data"].update(train_path=str(_dense_data(tmp_path / "dense_train.parquet", rows=8192, seed=1)),
                       eval_path=str(_dense_data(tmp_path / "dense_eval.parquet", rows=1024, seed=2)))
    job["train"].update(log_interval=5)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    first = _cli("train", str(tmp_path / "job.yaml"), "--nproc", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no embedding tables" in first.stdout
    (run_dir,) = (tmp_path / "runs" / "deepfm").iterdir()
    assert json.loads((run_dir / "plan.json").read_text())["tables"] == []
    losses = _train_losses(run_dir)
    assert losses[30] < losses[5] - 0.05, losses

    resumed = _cli("train", str(tmp_path / "job.yaml"), "--nproc", "2", f"--resume={run_dir}", "--train.steps=40")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoints/step-00000030 at step 30" in resumed.stdout
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == 40 and result["eval"]["auc"] > 0.7, result
    assert _train_losses(run_dir)[35] < losses[5] - 0.05  # went on from the trained weights

    manifest = export_model(ExportConfig(checkpoint=run_dir / "checkpoints" / "step-00000040", out=tmp_path / "export",
                                         quantize="none"))
    assert manifest["tables"] == {} and manifest["inputs"]["sparse"] == []
    out = tmp_path / "scores.parquet"
    assert cli_main(["predict", "--model", str(tmp_path / "export"), "--data", job["data"]["eval_path"], "--out", str(out),
                     "--id-column", "I1", "--no-progress"]) == 0
    scores = pq.read_table(out).column("score").to_numpy()
    labels = pq.read_table(job["data"]["eval_path"]).column("label").to_numpy()
    assert auc(torch.from_numpy(scores), torch.from_numpy(labels).float()) > 0.7


def _sparse_only_losses(tmp: Path) -> list[float]:
    run_dir = tmp / "run-sparse"
    run_dir.mkdir(exist_ok=True)
    job = tiny_job_dict(tmp, model="widedeep", steps=30)
    tables = [("C1", 200), ("C2", 50), ("C3", 1000)]
    job["features"].update(
        dense=[],
        sparse=[*({"name": n, "table": f"t_{n}"} for n, _ in tables),
                {"name": "C1xC2", "table": "t_C1xC2", "cross": ["C1", "C2"], "hash": True}],
        tables=[{"name": f"t_{n}", "num_embeddings": rows, "embedding_dim": 8} for n, rows in [*tables, ("C1xC2", 4096)]],
    )
    job["model"] = {"name": "widedeep", "deep_layer_sizes": [32],
                    "feature_groups": {"wide": ["C1xC2", "C3"], "deep": ["C1", "C2", "C3"]}}
    return run(build(JobConfig, job, key=""), run_dir=run_dir, resume=None).losses


def test_sparse_only_widedeep_with_a_crossed_wide_group_trains_sharded(tmp_path: Path) -> None:
    tiny_job(tmp_path, model="widedeep")  # writes the data once, before the ranks start
    losses = run_ranks(_sparse_only_losses, tmp_path)[0]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02, losses
