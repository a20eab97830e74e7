"""The per-rank entry point: ``python -m shardrec.train.worker --config JOB.yaml --run-dir DIR``.

``shardrec train`` resolves and checks the job, writes it into the run folder, and starts one of
these per rank (through torchrun, or in-process for a single rank). A torchx job
(shardrec/launch/components.py) starts them the same way, and may instead pass ``--run-id`` (the
run folder is then ``<run.root>/<run.name>/<run id>``), ``--resume auto`` (a restarted job goes on
from its latest checkpoint) and ``--section.key=value`` overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Literal

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record

from shardrec.data.prepare import resolve_data
from shardrec.errors import RankLostError, ShardrecError
from shardrec.job import JobConfig, load_job
from shardrec.checkpoint import store as checkpoint
from shardrec.train import rank_log
from shardrec.train import run_dir as run_dirs
from shardrec.train.dist import DistContext, init_distributed, lost_ranks_as_errors, shutdown
from shardrec.train.quiet import quiet_libraries
from shardrec.train.trainer import DataPaths, Trainer, TrainResult, summary
from shardrec.sharding.planner import resolve_compute_device

Resume = Path | Literal["auto"] | None


def run(job: JobConfig, *, run_dir: Path, resume: Resume) -> TrainResult:
    """Trains ``job`` as one rank of the current launch and returns its result.

    ``resume="auto"`` goes on from the run folder's latest complete checkpoint if it has one and
    starts afresh otherwise, which is what a job that torchrun or its scheduler restarts needs.
    """
    if job.data.train_path is None:  # a job torchx launched directly: make or find its synthetic data
        job = dataclasses.replace(job, data=resolve_data(job.data, job.features))
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = init_distributed(compute_device=resolve_compute_device(job.sharding), timeout_s=job.train.timeout_s)
    try:
        with lost_ranks_as_errors(rank=ctx.rank, timeout_s=job.train.timeout_s):
            if ctx.is_main:
                run_dirs.ensure_config(job, run_dir)
            start = agreed_checkpoint(run_dir) if resume == "auto" else resume
            return _train(job, ctx=ctx, run_dir=run_dir, resume=start)
    finally:
        shutdown()


def _train(job: JobConfig, *, ctx: DistContext, run_dir: Path, resume: Path | None) -> TrainResult:
    assert job.data.train_path is not None
    trainer = Trainer(job, ctx=ctx, run_dir=run_dir, data=DataPaths(job.data.train_path, job.data.eval_path))
    if resume is not None:
        trainer.resume(resume)
    elif job.checkpoint.warm_start is not None:
        trainer.warm_start()
    result = trainer.fit()
    if ctx.is_main:
        (run_dir / "result.json").write_text(json.dumps({"status": "completed", **summary(result)}, indent=2) + "\n")
    return result


def agreed_checkpoint(run_dir: Path) -> Path | None:
    """Rank 0's view of the run folder's latest complete checkpoint, the same on every rank (file
    systems may show ranks on other nodes a newer or older listing)."""
    found = [checkpoint.latest(run_dir / "checkpoints") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(found, src=0)
    return found[0]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Arguments the launcher passes to each rank, and the ``section.key=value`` overrides."""
    p = argparse.ArgumentParser(prog="shardrec-worker")
    p.add_argument("--config", type=Path, required=True)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir", type=Path, help="the run folder")
    where.add_argument("--run-id", help="the run folder is <run.root>/<run.name>/RUN_ID (e.g. the scheduler's job id)")
    p.add_argument("--resume", default=None, help="a checkpoint or run folder; auto: this run's latest checkpoint if any; none: start afresh")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if bad:
        p.error(f"unrecognized arguments {bad}; config overrides look like --section.key=value")
    return args, [a[2:] for a in rest]


def _resume(value: str | None) -> Resume:
    if value is None or value == "none":
        return None
    return "auto" if value == "auto" else checkpoint.resolve_resume(Path(value))


@record
def main(argv: list[str] | None = None) -> int:
    """Runs one rank; a bad-input error is printed as one line and exits 2, Ctrl-C exits 130.

    Under ``shardrec train`` (rank_log.enabled()) the rank's stderr goes to its log in the run
    folder and a failure leaves its one line there for the launcher to print; otherwise (torchx,
    a bare torchrun) the line goes to stderr and other exceptions propagate to torchelastic.
    """
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    quiet_libraries()
    _watch_sigint()
    _SIGINT.received = False
    rank = int(os.environ.get("RANK", "0"))
    if not (rank_log.enabled() and args.run_dir is not None):
        return _run_rank(args, overrides, rank=rank, logged=False)
    with rank_log.captured(args.run_dir, rank):
        return _run_rank(args, overrides, rank=rank, logged=True)


def _run_rank(args: argparse.Namespace, overrides: list[str], *, rank: int, logged: bool) -> int:
    run_dir = args.run_dir
    try:
        job = load_job(args.config, overrides)
        run_dir = run_dir or run_dirs.runs_of(job) / args.run_id
        run(job, run_dir=run_dir, resume=_resume(args.resume))
    except KeyboardInterrupt:
        return INTERRUPTED
    except ShardrecError as e:
        if interrupted(e):  # a peer that Ctrl-C stopped first: not a failure of its own
            return INTERRUPTED
        stream = rank_log.log_only(sys.stderr) if logged else sys.stderr
        print(f"shardrec: error: {e}", file=stream, flush=True)  # type: ignore[call-overload]
        report_error(e, run_dir)
        if logged:
            rank_log.write_error(run_dir, rank, line=str(e), kind="lost" if isinstance(e, RankLostError) else "input")
        return 2
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException, not an Exception
        if interrupted(e):
            return INTERRUPTED
        if not logged:
            raise
        traceback.print_exc(file=rank_log.log_only(sys.stderr))  # type: ignore[arg-type]
        get_error_handler().record_exception(e)
        rank_log.write_error(run_dir, rank, line=f"{type(e).__name__}: {e}", kind="crash")
        return 1
    return 0


INTERRUPTED = 130
"""Exit code of a run stopped by Ctrl-C (SIGINT), as shells report it."""


def interrupted(error: BaseException | None = None) -> bool:
    """Whether this process has received SIGINT, or ``error`` came from a KeyboardInterrupt (a
    library that wraps what its code raised, as DCP's CheckpointException does): the error being
    handled is then the interrupt's consequence."""
    return _SIGINT.received or (error is not None and _from_interrupt(error, depth=0))


def _from_interrupt(error: BaseException, *, depth: int) -> bool:
    if isinstance(error, KeyboardInterrupt):
        return True
    if depth > 8:
        return False
    # DCP's CheckpointException keeps each rank's (exception, stack) in ``failures``.
    wrapped = [f[0] if isinstance(f, tuple) else f for f in getattr(error, "failures", {}).values()]
    inner = [error.__cause__, error.__context__, *wrapped]
    return any(isinstance(e, BaseException) and _from_interrupt(e, depth=depth + 1) for e in inner)


class _SigintFlag:
    """Remembers a SIGINT, then raises KeyboardInterrupt as Python's default handler does."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame: object) -> None:
        self.received = True
        raise KeyboardInterrupt


_SIGINT = _SigintFlag()


def _watch_sigint() -> None:
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _SIGINT)


def report_error(e: ShardrecError, run_dir: Path | None) -> None:
    """Writes ``e`` where the launchers look: the run folder's error.txt and torchelastic's error
    file of this rank (torchrun's failure summary and torchx's status show that one).

    A RankLostError is the echo of another rank's failure: it does not replace that rank's error.txt.
    """
    get_error_handler().record_exception(e)
    if run_dir is None or not run_dir.is_dir():
        return
    error = run_dir / "error.txt"
    if not (isinstance(e, RankLostError) and error.exists()):
        error.write_text(f"{e}\n")


def exit_now(code: int) -> None:
    """Ends the rank with ``code`` once everything is written, without the interpreter's teardown.

    Now and then a rank whose run had completed (result.json written, process group destroyed)
    was killed by SIGABRT in that teardown ("terminate called without an active exception": a C++
    worker thread still joinable while the interpreter finalizes; seen once in ~100 2-rank runs in
    CI), which failed the job after the fact. Streams and logging are flushed first.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
