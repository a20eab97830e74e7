"""Every registered model trains sharded on 2 gloo ranks, and its loss falls."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import tiny_job
from shardrec.launch.spawn import run_ranks
from shardrec.models import registry
from shardrec.platform.worker import run


def _losses(tmp: Path, model: str) -> list[float]:
    run_dir = tmp / f"run-{model}"
    run_dir.mkdir(exist_ok=True)
    return run(tiny_job(tmp, model=model, steps=30), run_dir=run_dir, resume=None).losses


@pytest.mark.parametrize("model", registry.names())
def test_model_trains_sharded(tmp_path: Path, model: str) -> None:
    tiny_job(tmp_path, model=model)
    losses = run_ranks(_losses, tmp_path, model)[0]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02, losses
