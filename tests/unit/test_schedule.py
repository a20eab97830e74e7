"""Learning-rate schedule: the factor by step, and that it reaches the fused FBGEMM kernels."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

from helpers import tiny_job
from shardrec.errors import ConfigError
from shardrec.launch.spawn import run_ranks
from shardrec.train.schedule import LRSchedule, lr_factor
from shardrec.train.config import LRScheduleConfig


def test_warmup_then_cosine_to_min_ratio() -> None:
    cfg = LRScheduleConfig(warmup_steps=4, decay="cosine", min_ratio=0.1)
    assert [lr_factor(cfg, s, total_steps=14) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_factor(cfg, 9, total_steps=14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(cfg, 14, total_steps=14) == pytest.approx(0.1)
    assert lr_factor(cfg, 40, total_steps=14) == pytest.approx(0.1)


def test_linear_decay_over_decay_steps_and_constant() -> None:
    linear = LRScheduleConfig(decay="linear", decay_steps=10)
    assert [lr_factor(linear, s, total_steps=100) for s in (1, 5, 10, 20)] == [0.9, 0.5, 0.0, 0.0]
    assert lr_factor(LRScheduleConfig(), 7, total_steps=10) == 1.0


@pytest.mark.parametrize(("key", "value"), [("warmup_steps", -1), ("decay_steps", 0), ("min_ratio", 1.5)])
def test_bad_values_name_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"train.lr_schedule.{key}"):
        LRScheduleConfig(**{key: value})


def _kernels(optimizer: object) -> list[SplitTableBatchedEmbeddingBagsCodegen]:
    """The FBGEMM modules under torchrec's (nested) fused optimizers."""
    if isinstance(getattr(optimizer, "_emb_module", None), SplitTableBatchedEmbeddingBagsCodegen):
        return [optimizer._emb_module]  # type: ignore[attr-defined]
    return [k for _, child in getattr(optimizer, "optimizers", []) for k in _kernels(child)]


def _rates(tmp: Path) -> tuple[list[float], list[float]]:
    from shardrec.train.dist import init_distributed, shutdown
    from shardrec.train.trainer import DataPaths, Trainer

    job = tiny_job(tmp, sharding={"default": {"sharding_types": ["table_wise"]}})
    ctx = init_distributed(compute_device="cpu", timeout_s=60)
    try:
        trainer = Trainer(job, ctx=ctx, run_dir=tmp / "run", data=DataPaths(job.data.train_path, None))
        schedule = LRSchedule(LRScheduleConfig(warmup_steps=4), optimizer=trainer.optimizer, model=trainer.model, total_steps=8)
        kernels = _kernels(trainer.model.fused_optimizer)
        schedule.apply(1)
        fused = [k.get_learning_rate() for k in kernels]
        dense = [float(g["lr"]) for g in trainer.optimizer.param_groups]
        return fused, dense
    finally:
        shutdown()


def test_schedule_reaches_the_fused_kernels(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    fused, dense = run_ranks(_rates, tmp_path, world_size=1)[0]
    assert fused and all(lr == pytest.approx(0.1 / 4) for lr in fused)  # sparse lr 0.1, warm-up step 1 of 4
    assert pytest.approx(0.003 / 4) in dense
