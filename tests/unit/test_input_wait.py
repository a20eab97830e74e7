"""The training loop's input wait: time spent in ``next`` on the batch iterator, against the loop's
time, and the input-bound verdict the run summary prints."""

from __future__ import annotations

import pytest

from shardrec.train import trainer
from shardrec.train.trainer import INPUT_BOUND, InputWait, TimedBatches


def test_timed_batches_add_up_the_time_inside_next(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.5, 10.0, 10.25, 20.0, 20.125])

    monkeypatch.setattr(trainer.time, "perf_counter", lambda: next(clock))
    timed = TimedBatches(iter(["a", "b"]))
    assert list(timed) == ["a", "b"]
    # Two batches (0.5 s and 0.25 s) and the end of the iterator (0.125 s) are all waited for.
    assert timed.wait_s == pytest.approx(0.875)


def test_input_bound_verdict() -> None:
    assert not InputWait(wait_s=0.5, step_s=10.0, rank=0).bound
    waited = InputWait(wait_s=3.0, step_s=10.0, rank=1)
    assert waited.bound and waited.fraction == pytest.approx(0.3) and INPUT_BOUND == 0.1
    assert waited.to_json() == {"wait_s": 3.0, "step_s": 10.0, "fraction": 0.3, "rank": 1, "input_bound": True}
    assert InputWait(wait_s=0.0, step_s=0.0, rank=0).fraction == 0.0
