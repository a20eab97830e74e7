"""Every registered model trains sharded on 2 gloo ranks, and its loss falls; retrieval models then
rank the item catalogue better than chance."""

from __future__ import annotations

from pathlib import Path

import pytest

import pyarrow.parquet as pq

from helpers import SEQ_ITEMS, tiny_job
from shardrec.launch.spawn import run_ranks
from shardrec.models import registry
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
