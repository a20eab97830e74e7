"""Evaluation metrics against brute-force references, and the JSON-lines metrics log."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from shardrec.train.metrics import MetricsLog, auc, eval_metrics, gather, log_loss


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted 1/2, by comparing every pair."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("levels", [3, 20, None], ids=["heavy-ties", "some-ties", "continuous"])
def test_auc_equals_pairwise_count(seed: int, levels: int | None) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 400))
    labels = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(np.float32)
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if levels is not None:
        scores = np.round(scores * levels / 4) / levels  # many exact ties, across both classes
    scores = scores.astype(np.float32)
    assert labels.min() == 0 and labels.max() == 1
    got = auc(torch.from_numpy(scores), torch.from_numpy(labels))
    assert got == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),
        ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),  # all tied
        ([0.3, 0.5, 0.5, 0.7], [0, 0, 1, 1], 0.875),  # one tied pair out of four: (3 + 0.5) / 4
        ([2.0, 1.0, 3.0], [1, 0, 0], 0.5),
    ],
)
def test_auc_small_cases(scores: list[float], labels: list[int], expected: float) -> None:
    assert auc(torch.tensor(scores), torch.tensor(labels, dtype=torch.float32)) == pytest.approx(expected)


def test_auc_is_invariant_to_order_and_monotone_transforms() -> None:
    rng = np.random.default_rng(9)
    scores = torch.from_numpy(rng.normal(size=300))
    labels = torch.from_numpy((rng.random(300) < 0.3).astype(np.float32))
    base = auc(scores, labels)
    perm = torch.from_numpy(rng.permutation(300))
    assert auc(scores[perm], labels[perm]) == pytest.approx(base, abs=1e-12)
    assert auc(torch.sigmoid(scores), labels) == pytest.approx(base, abs=1e-12)
    assert auc(-scores, labels) == pytest.approx(1 - base, abs=1e-12)


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_auc_is_nan_with_one_class(label: float) -> None:
    assert math.isnan(auc(torch.tensor([0.1, 0.7, 0.3]), torch.full((3,), label)))


def test_auc_is_nan_when_empty() -> None:
    assert math.isnan(auc(torch.tensor([]), torch.tensor([])))


def _numpy_log_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    p = 1.0 / (1.0 + np.exp(-logits))
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


@pytest.mark.parametrize("seed", range(3))
def test_log_loss_equals_numpy_formula(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=500)
    labels = (rng.random(500) < 0.4).astype(np.float64)
    got = log_loss(torch.from_numpy(logits).float(), torch.from_numpy(labels).float())
    expected = _numpy_log_loss(logits.astype(np.float32).astype(np.float64), labels)
    assert got == pytest.approx(expected, rel=1e-9)


def test_log_loss_known_values() -> None:
    assert log_loss(torch.zeros(4), torch.tensor([0.0, 1.0, 0.0, 1.0])) == pytest.approx(math.log(2))
    # Stable for large logits: a confident right answer costs ~0, a confident wrong one ~|logit|.
    assert log_loss(torch.tensor([100.0]), torch.tensor([1.0])) == pytest.approx(0.0, abs=1e-30)
    assert log_loss(torch.tensor([100.0]), torch.tensor([0.0])) == pytest.approx(100.0)


def test_gather_without_process_group_returns_input() -> None:
    assert not dist.is_initialized()
    t = torch.tensor([3.0, 1.0, 2.0])
    out = gather(t)
    assert out is t
    assert out.tolist() == [3.0, 1.0, 2.0]


def test_eval_metrics_on_one_process() -> None:
    logits = torch.tensor([-2.0, -1.0, 0.5, 2.0, 0.0])
    labels = torch.tensor([0, 0, 1, 1, 0])
    out = eval_metrics(logits, labels)
    assert out["rows"] == 5
    assert out["auc"] == pytest.approx(1.0)
    assert out["log_loss"] == pytest.approx(_numpy_log_loss(logits.numpy().astype(np.float64), labels.numpy()), rel=1e-6)


def test_metrics_log_writes_json_lines_when_enabled(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=True)
    log.write("train", step=10, loss=0.5)
    log.write("eval", step=10, auc=0.75, rows=1024)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert [r["kind"] for r in records] == ["train", "eval"]
    assert records[0]["step"] == 10 and records[0]["loss"] == 0.5
    assert records[1]["auc"] == 0.75 and records[1]["rows"] == 1024
    assert all(isinstance(r["time"], float) and r["time"] > 1.6e9 for r in records)


def test_metrics_log_appends(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path, enabled=True).write("a", x=1)
    MetricsLog(path, enabled=True).write("b", x=2)
    assert [json.loads(line)["kind"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_metrics_log_disabled_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=False)
    log.write("train", step=1, loss=0.1)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_eval_metrics_per_task_for_two_label_columns() -> None:
    from shardrec.train.metrics import auc as auc_fn, eval_metrics

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 2, generator=g)
    labels = (torch.rand(200, 2, generator=g) < torch.sigmoid(logits)).float()
    got = eval_metrics(logits, labels)
    assert got["rows"] == 200
    for i in range(2):
        assert got[f"auc_task{i}"] == auc_fn(logits[:, i], labels[:, i])
    assert got["auc"] == (got["auc_task0"] + got["auc_task1"]) / 2
