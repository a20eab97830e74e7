"""A rank that runs out of data early turns into a clear error within train.timeout_s, not a hang."""

from __future__ import annotations

import os
from pathlib import Path

from helpers import tiny_job
from shardrec.errors import RankLostError
from shardrec.launch.spawn import run_ranks
from shardrec.train.worker import run

TIMEOUT_S = 10


def _rank_1_stops_early(tmp: Path) -> str:
    """Rank 1 has data for 3 steps, rank 0 for 12: their last collectives no longer pair up."""
    rank = int(os.environ["RANK"])
    job = tiny_job(tmp, steps=12 if rank == 0 else 3, train={"timeout_s": TIMEOUT_S}, data={"eval_path": None})
    try:
        run(job, run_dir=tmp / "run", resume=None)
    except RankLostError as e:
        return str(e)
    return "finished"


def test_rank_that_stops_early_is_an_error_after_the_timeout(tmp_path: Path) -> None:
    tiny_job(tmp_path)  # writes the data once, before the ranks read it
    # Without the timeout both ranks would wait for each other forever.
    errors = run_ranks(_rank_1_stops_early, tmp_path, timeout=240)
    for rank, error in enumerate(errors):
        assert f"rank {rank} stopped waiting for the other ranks in a collective" in error
        assert f"train.timeout_s={TIMEOUT_S}" in error and "ran out of data" in error
    # The wait that ended first ended by gloo's timeout, which is train.timeout_s.
    assert any(f"Timed out waiting {TIMEOUT_S * 1000}ms" in e for e in errors), errors
    assert (tmp_path / "run" / "config.yaml").is_file()  # the worker wrote the job it ran
