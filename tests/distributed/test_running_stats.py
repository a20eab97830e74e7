"""Running statistics (BatchNorm's, Dice's) under DistributedModelParallel on 2 gloo ranks, for DIN
with ``model.mlp.norm: batch`` (batch norm and Dice in both MLPs, masked in the attention unit):
their true initial values once the model is placed, one value on every rank after training,
saved and restored bit for bit (through an offline reshard, then a resume), and carried into the
exported artifact, which scores as the eager model does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_job_dict
from shardrec.checkpoint.dcp_reader import SavedCheckpoint
from shardrec.config import build
from shardrec.checkpoint.reshard import reshard_checkpoint
from shardrec.data.reader import ParquetReader
from shardrec.job import JobConfig
from shardrec.launch.spawn import run_ranks
from shardrec.serving.config import ExportConfig
from shardrec.serving.export_model import SAVED_PREFIX, build_unsharded, export_model
from shardrec.train.dist import init_distributed, shutdown
from shardrec.train.trainer import DataPaths, Trainer

STEPS = 6
STATS = ("running_mean", "running_var", "num_batches_tracked")

Stats = dict[str, torch.Tensor]
Trained = tuple[JobConfig, Path, list[tuple[Stats, ...]]]
"""The job, its run folder, and each rank's statistics once placed and after training."""


def _stats(trainer: Trainer) -> dict[str, np.ndarray]:
    """Every running statistic of the trainer's zoo model, by its name in the model (as numpy
    arrays: tensors a spawned rank sends back would be shared through file descriptors)."""
    model = trainer.model.module.model  # DMP -> TrainModule -> the zoo model
    return {k: v.detach().numpy().copy() for k, v in model.named_buffers() if k.rsplit(".", 1)[-1] in STATS}


def _rank(job: JobConfig, run_dir: Path, resume: list[Path]) -> list[dict[str, np.ndarray]]:
    """On one rank: the statistics once the model is placed, then after training (no ``resume``)
    or after resuming from each of ``resume`` in turn."""
    ctx = init_distributed(compute_device="cpu", timeout_s=120)
    try:
        trainer = Trainer(job, ctx=ctx, run_dir=run_dir, data=DataPaths(job.data.train_path, job.data.eval_path))
        out = [_stats(trainer)]
        if not resume:
            trainer.fit()
            out.append(_stats(trainer))
        for path in resume:
            trainer.resume(path)
            out.append(_stats(trainer))
        return out
    finally:
        shutdown()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tmp = tmp_path_factory.mktemp("stats")
    job_dict = tiny_job_dict(tmp, model="din", steps=STEPS, checkpoint={"enabled": True, "interval": 0})
    job_dict["model"]["mlp"] = {"norm": "batch"}
    job = build(JobConfig, job_dict, key="")
    run_dir = tmp / "run"
    run_dir.mkdir()
    return job, run_dir, [_tensors(r) for r in run_ranks(_rank, job, run_dir, [])]


def _tensors(stats: list[dict[str, np.ndarray]]) -> tuple[Stats, ...]:
    return tuple({k: torch.from_numpy(v) for k, v in s.items()} for s in stats)


def _saved(checkpoint: Path, names: Stats) -> Stats:
    saved = SavedCheckpoint(checkpoint)
    return {k: saved.read(SAVED_PREFIX + k) for k in names}


def _assert_equal(got: Stats, want: Stats) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_statistics_start_true_on_every_rank(trained: Trained) -> None:
    _, _, ranks = trained
    for placed, _ in ranks:
        # Two hidden layers in each MLP, each with a BatchNorm (mean, var, count) and a Dice (mean, var).
        assert {k.split(".")[0] for k in placed} == {"attention", "mlp"} and len(placed) == 2 * (2 * 3 + 2 * 2)
        for k, v in placed.items():
            want = 1.0 if k.endswith("running_var") else 0.0
            assert torch.equal(v, torch.full_like(v, want)), k  # DMP itself leaves zeros


def test_trained_statistics_are_one_value_on_every_rank_and_saved_bit_for_bit(
    trained: Trained,
) -> None:
    _, run_dir, ranks = trained
    (_, final0), (_, final1) = ranks
    # Each rank normalizes its own batches (DDP does not broadcast buffers): they were averaged.
    _assert_equal(final0, final1)
    variances = [v for k, v in final0.items() if k.endswith("running_var")]
    assert len(variances) == 8 and not any(torch.allclose(v, torch.ones_like(v)) for v in variances), "training moves them all"
    assert all(int(v) == STEPS for k, v in final0.items() if k.endswith("num_batches_tracked"))
    _assert_equal(_saved(run_dir / "checkpoints" / f"step-{STEPS:08d}", final0), final0)


def test_statistics_survive_resume_and_reshard(trained: Trained, tmp_path: Path) -> None:
    job, run_dir, ranks = trained
    want = ranks[0][1]
    step = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    moved = tmp_path / "run" / "checkpoints" / f"step-{STEPS:08d}"
    reshard_checkpoint(step, plan=run_dir / "plan.json", out=moved)
    _assert_equal(_saved(moved, want), want)
    for placed, resumed, resumed_resharded in map(_tensors, run_ranks(_rank, job, tmp_path / "run", [step, moved])):
        assert not torch.equal(placed["mlp.1.running_var"], want["mlp.1.running_var"])
        _assert_equal(resumed, want)
        _assert_equal(resumed_resharded, want)


def test_export_carries_the_statistics_and_scores_as_eager(
    trained: Trained, tmp_path: Path,
) -> None:
    job, run_dir, ranks = trained
    step = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    export_model(ExportConfig(checkpoint=step, out=tmp_path / "export", quantize="none"))
    scripted = torch.jit.load(str(tmp_path / "export" / "model.pt"))
    held = {k.removeprefix("model."): v for k, v in scripted.state_dict().items()}
    floats = {k: v for k, v in ranks[0][1].items() if v.is_floating_point()}
    _assert_equal({k: held[k] for k in floats}, floats)
    eager = build_unsharded(job, step)
    batch = next(iter(ParquetReader(job.data.eval_path, schema=job.features, batch_size=256)))
    kjt = batch.sparse_features
    with torch.no_grad():
        want = torch.sigmoid(eager(batch.dense_features, kjt))
        got = scripted(batch.dense_features, kjt.values(), kjt.lengths())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
