"""HLLM on ``transformers`` models end to end: it trains sharded on 2 gloo ranks and its loss falls,
a second run reuses the cached item embeddings without running the item LLM, and the exported
towers (the user LLM traced into TorchScript) give the eager model's vectors, through predict too."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from helpers import SEQ_ITEMS, retrieval_schema, tiny_job_dict
from llm_helpers import hllm_params, write_text_catalogue
from shardrec.checkpoint.dcp_reader import SavedCheckpoint
from shardrec.cli import main as cli_main
from shardrec.config import build, to_dict
from shardrec.data.catalogue import catalogue_kjt, read_catalogue
from shardrec.data.reader import ParquetReader
from shardrec.job import JobConfig
from shardrec.launch.spawn import run_ranks
from shardrec.models import registry
from shardrec.serving.config import ExportConfig
from shardrec.serving.export_model import SAVED_PREFIX, export_model, tower_inputs
from shardrec.train.worker import run

STEPS = 40
FP32_TOL = 1e-5


def _train(job: JobConfig, run_dir: Path) -> tuple[list[float], dict[str, float] | None]:
    result = run(job, run_dir=run_dir, resume=None)
    return result.losses, result.eval


def _job(tmp: Path, **model: Any) -> JobConfig:
    catalogue = tmp / "text_items.parquet"
    if not catalogue.exists():
        write_text_catalogue(catalogue)
    job = tiny_job_dict(tmp, model="hllm", steps=STEPS, checkpoint={"enabled": True}, data={"items_path": str(catalogue)},
                        train={"dense_optimizer": {"name": "adam", "lr": 0.003},
                               "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.1}})
    # The retrieval data without token features: the language model reads the catalogue's text.
    job["features"] = to_dict(retrieval_schema())
    job["model"] = hllm_params(tmp, catalogue=catalogue, **model)
    return build(JobConfig, job, key="")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, JobConfig, list[float], dict[str, float] | None]:
    tmp = tmp_path_factory.mktemp("hllm_llm")
    job = _job(tmp)
    losses, metrics = run_ranks(_train, job, tmp / "run")[0]
    return tmp, job, losses, metrics


def test_trains_sharded_and_learns(trained: tuple[Path, JobConfig, list[float], dict[str, float] | None]) -> None:
    tmp, _, losses, metrics = trained
    assert len(losses) == STEPS
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    # 60 items: a random ranking hits the next item in its top 10 a sixth of the time.
    assert metrics is not None and metrics["items"] == SEQ_ITEMS and metrics["hr@10"] > 10 / SEQ_ITEMS + 0.05, metrics
    plan = json.loads((tmp / "run" / "plan.json").read_text())
    assert "item" in json.dumps(plan)


def test_second_run_reuses_the_item_embeddings(trained: tuple[Path, JobConfig, list[float], dict[str, float] | None]) -> None:
    tmp, job, _, _ = trained
    files = list((tmp / "cache").glob("item_embeddings_*.parquet"))
    assert len(files) == 1
    written = files[0].stat().st_mtime_ns
    short = copy.deepcopy(job)
    short.train.steps = 2
    short.checkpoint.enabled = False
    run_ranks(_train, short, tmp / "run-again")
    assert [f.stat().st_mtime_ns for f in (tmp / "cache").glob("item_embeddings_*.parquet")] == [written]


def _eager(job: JobConfig, checkpoint: Path) -> torch.nn.Module:
    model = registry.build_model(job.model_name, job.model_params, schema=job.features, device=torch.device("cpu"))
    saved = SavedCheckpoint(checkpoint)
    model.load_state_dict({k: saved.read(SAVED_PREFIX + k) for k in model.state_dict()})
    return model.eval()


def test_export_and_predict_give_the_eager_vectors(trained: tuple[Path, JobConfig, list[float], dict[str, float] | None]) -> None:
    tmp, job, _, _ = trained
    checkpoint = tmp / "run" / "checkpoints" / f"step-{STEPS:08d}"
    out = tmp / "export"
    manifest = export_model(ExportConfig(checkpoint=checkpoint, out=out, quantize="none"))
    assert manifest["inputs"]["user"]["sparse"] == ["user_id", "history"] and manifest["inputs"]["item"]["sparse"] == ["item_id"]
    user, item = torch.jit.load(str(out / "user_tower.pt")), torch.jit.load(str(out / "item_tower.pt"))
    eager = _eager(job, checkpoint)
    with torch.no_grad():
        batch = next(iter(ParquetReader(job.data.eval_path, schema=job.features, batch_size=100)))
        expected = eager.user_vectors(batch.dense_features, batch.sparse_features)
        got = user(batch.dense_features, *tower_inputs(batch.sparse_features, manifest["inputs"]["user"]["sparse"]))
        assert (got - expected).abs().max().item() < FP32_TOL
        ids, table = read_catalogue(job.data.items_path, job.features, item_feature="item_id")
        kjt = catalogue_kjt(table, job.features, where="test")
        items = item(*tower_inputs(kjt, ["item_id"]))
        assert (items - eager.item_vectors(kjt)).abs().max().item() < FP32_TOL
    written = pq.read_table(out / "item_embeddings.parquet")
    assert written.column("id").to_pylist() == ids.tolist()
    users = tmp / "users.parquet"
    pq.write_table(pq.read_table(job.data.eval_path).drop(["label", "item_id"]).slice(0, 100), users)
    vectors = tmp / "vectors.parquet"
    assert cli_main(["predict", "--model", str(out), "--data", str(users), "--out", str(vectors), "--id-column", "user_id",
                     "--batch-size", "100", "--no-progress"]) == 0
    torch.testing.assert_close(torch.tensor(pq.read_table(vectors).column("vector").to_pylist()), expected, rtol=0, atol=1e-5)
