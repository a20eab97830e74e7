"""DLRM on 2 gloo ranks with every sharding type: loss falls, and every type computes the same thing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import tiny_job
from shardrec.launch.spawn import run_ranks
from shardrec.train.worker import run
from shardrec.sharding.sharders import ALL_SHARDING_TYPES


def _train(tmp: Path, sharding_type: str, steps: int) -> dict:
    job = tiny_job(tmp, steps=steps, sharding={"compute_device": "cpu", "default": {"sharding_types": [sharding_type]}})
    run_dir = tmp / f"run-{sharding_type}"
    run_dir.mkdir(exist_ok=True)
    result = run(job, run_dir=run_dir, resume=None)
    plan = (run_dir / "plan.json").read_text() if (run_dir / "plan.json").exists() else None
    return {"losses": result.losses, "eval": result.eval, "plan": plan}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("sharding")
    tiny_job(tmp)  # writes the data once, before the ranks start
    return {st: run_ranks(_train, tmp, st, 25) for st in ALL_SHARDING_TYPES}


@pytest.mark.parametrize("sharding_type", ALL_SHARDING_TYPES)
def test_plan_uses_the_type_and_loss_falls(results: dict[str, list[dict]], sharding_type: str) -> None:
    rank0 = results[sharding_type][0]
    assert f'"sharding_type": "{sharding_type}"' in rank0["plan"]
    losses = rank0["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02, losses


@pytest.mark.parametrize("sharding_type", [t for t in ALL_SHARDING_TYPES if t != "table_wise"])
def test_losses_match_table_wise(results: dict[str, list[dict]], sharding_type: str) -> None:
    reference = torch.tensor(results["table_wise"][0]["losses"])
    for rank in (0, 1):
        losses = torch.tensor(results[sharding_type][rank]["losses"])
        torch.testing.assert_close(losses, reference if rank == 0 else torch.tensor(results["table_wise"][1]["losses"]), atol=2e-4, rtol=0)


def test_same_seed_same_result(tmp_path: Path) -> None:
    tiny_job(tmp_path)
    first = run_ranks(_train, tmp_path, "row_wise", 8)
    second = run_ranks(_train, tmp_path, "row_wise", 8)
    assert [r["losses"] for r in first] == [r["losses"] for r in second]
    assert first[0]["eval"] == second[0]["eval"]


def _train_with_pipeline(tmp: Path, pipeline: str) -> list[float]:
    job = tiny_job(tmp, steps=12, train={"pipeline": pipeline, "steps": 12})
    run_dir = tmp / f"run-{pipeline}"
    run_dir.mkdir(exist_ok=True)
    return run(job, run_dir=run_dir, resume=None).losses


def test_pipelines_compute_the_same_losses(tmp_path: Path) -> None:
    tiny_job(tmp_path)
    base = run_ranks(_train_with_pipeline, tmp_path, "base")
    sparse_dist = run_ranks(_train_with_pipeline, tmp_path, "sparse_dist")
    for rank in (0, 1):
        torch.testing.assert_close(torch.tensor(base[rank]), torch.tensor(sparse_dist[rank]), atol=1e-6, rtol=0)
