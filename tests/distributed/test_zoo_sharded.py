"""Every registered model trains sharded on 2 gloo ranks, and its loss falls; retrieval models then
rank the item catalogue better than chance. The same with every table stored in fp16."""

from __future__ import annotations

from pathlib import Path

import pytest

import pyarrow.parquet as pq

from helpers import SEQ_ITEMS, tiny_job
from shardrec.launch.spawn import run_ranks
from shardrec.models import registry
from shardrec.sharding.planner import half_tables
from shardrec.sharding.shardable import meta_model, model_tables
from shardrec.train.worker import run


# YouTubeDNN's sampled softmax over 16 negatives and HLLM's item transformer, trained from text
# alone, start slower than the others on this data.
STEPS = {"youtubednn": 60, "hllm": 60}


def _losses(tmp: Path, model: str) -> tuple[list[float], dict[str, float] | None]:
    run_dir = tmp / f"run-{model}"
    run_dir.mkdir(exist_ok=True)
    result = run(tiny_job(tmp, model=model, steps=STEPS.get(model, 30)), run_dir=run_dir, resume=None)
    return result.losses, result.eval


@pytest.mark.parametrize("model", registry.names())
def test_model_trains_sharded(tmp_path: Path, model: str) -> None:
    tiny_job(tmp_path, model=model)
    losses, metrics = run_ranks(_losses, tmp_path, model)[0]
    assert len(losses) == STEPS.get(model, 30)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02, losses
    if registry.get(model).retrieval:
        # 60 items: a random ranking hits the next item in its top 10 a sixth of the time.
        assert metrics is not None and metrics["items"] == SEQ_ITEMS and metrics["hr@10"] > 10 / SEQ_ITEMS + 0.05, metrics
        assert pq.read_table(tmp_path / f"run-{model}" / "item_embeddings.parquet").num_rows == SEQ_ITEMS



def _fp16_run(tmp: Path, model: str) -> tuple[list[float], dict[str, float] | None, bool]:
    job = tiny_job(tmp, model=model, steps=STEPS.get(model, 30), features={"table_precision": "fp16"})
    module = meta_model(job).module
    every_table_fp16 = half_tables(module) == set(model_tables(module))
    run_dir = tmp / f"run16-{model}"
    run_dir.mkdir(exist_ok=True)
    result = run(job, run_dir=run_dir, resume=None)
    return result.losses, result.eval, every_table_fp16


@pytest.mark.parametrize("model", registry.names())
def test_model_trains_sharded_with_fp16_tables(tmp_path: Path, model: str) -> None:
    # Every table in fp16 (features.table_precision), none of them data-parallel (the planner keeps
    # fp16 tables on fused kernels), the loss falling as in fp32.
    tiny_job(tmp_path, model=model)
    losses, metrics, every_table_fp16 = run_ranks(_fp16_run, tmp_path, model)[0]
    assert every_table_fp16
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02, losses
    if registry.get(model).retrieval:
        assert metrics is not None and metrics["hr@10"] > 10 / SEQ_ITEMS + 0.05, metrics
