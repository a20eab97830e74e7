"""How a rank's failure maps to its exit code: a Ctrl-C that reaches the rank wrapped by a library
(DCP raises a CheckpointException, a BaseException, around each rank's error) still exits 130."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

from shardrec.train import worker


def _raising(error: BaseException):
    def run(job, *, run_dir, resume):  # noqa: ANN001 - stands in for worker.run
        raise error

    return run


def _interrupted_write() -> BaseException:
    """What torch.save leaves when SIGINT lands mid-write: the zip writer's __exit__ fails with the
    KeyboardInterrupt as its context, and DCP wraps that per rank."""
    try:
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as e:
        return CheckpointException("write", {0: _wrap_exception(e)})


@pytest.fixture
def args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    monkeypatch.setattr(worker, "load_job", lambda config, overrides: object())
    monkeypatch.setattr(worker._SIGINT, "received", False)
    return argparse.Namespace(config=tmp_path / "job.yaml", run_dir=tmp_path / "run", resume=None)


def test_an_interrupt_inside_a_checkpoint_save_exits_130(args: argparse.Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "run", _raising(_interrupted_write()))
    assert worker._run_rank(args, [], rank=0, logged=False) == worker.INTERRUPTED


def test_a_failed_save_without_an_interrupt_is_a_crash(args: argparse.Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    failure = CheckpointException("write", {0: _wrap_exception(OSError("No space left on device"))})
    monkeypatch.setattr(worker, "run", _raising(failure))
    with pytest.raises(CheckpointException):
        worker._run_rank(args, [], rank=0, logged=False)
    args.run_dir.mkdir()
    (args.run_dir / "logs").mkdir()
    assert worker._run_rank(args, [], rank=0, logged=True) == 1


def test_system_exit_passes_through(args: argparse.Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "run", _raising(SystemExit(3)))
    with pytest.raises(SystemExit):
        worker._run_rank(args, [], rank=0, logged=True)
