"""Runs a resolved job as N local processes through torchrun, or in this process when N is 1.

The ranks write their stderr into ``<run>/logs/rank-R.log`` (rank 0 also shows it) and torchrun's
agent writes its own lines to ``<run>/logs/launcher.log`` (shardrec/launch/agent.py), so a failure
is reported by :func:`failure_line` in one line with the path of the failing rank's log. Ctrl-C
stops every rank (SIGINT, then SIGKILL after ``SHUTDOWN_S``) and returns 130.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from shardrec.launch.agent import FAILURE_FILE
from shardrec.train import rank_log

INTERRUPTED = 130
SHUTDOWN_S = 30.0
"""Seconds the ranks get to end after Ctrl-C before they are killed."""


def worker_args(*, config: Path, run_dir: Path, resume: Path | None) -> list[str]:
    """The arguments of every rank's ``shardrec.train.worker``."""
    return ["--config", str(config), "--run-dir", str(run_dir)] + (["--resume", str(resume)] if resume else [])


def torchrun_command(*, nproc: int, config: Path, run_dir: Path, resume: Path | None) -> list[str]:
    """The command that starts ``nproc`` ranks of the worker on this machine under the quiet agent."""
    return [
        sys.executable, "-m", "shardrec.launch.agent", str(rank_log.log_dir(run_dir)), "--standalone",
        f"--nproc_per_node={nproc}", "-m", "shardrec.train.worker", *worker_args(config=config, run_dir=run_dir, resume=resume),
    ]


@contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def launch(*, nproc: int, config: Path, run_dir: Path, resume: Path | None) -> int:
    """Starts the ranks and waits for them; returns the exit code (0 success, 130 interrupted)."""
    logs = rank_log.log_dir(run_dir)
    for stale in [*logs.glob("rank-*.error.json"), logs / FAILURE_FILE]:  # of an earlier launch of this run
        stale.unlink(missing_ok=True)
    if nproc == 1:
        from shardrec.train.worker import main

        with _env(rank_log.ENV, "1"):
            try:
                return main(worker_args(config=config, run_dir=run_dir, resume=resume))
            except KeyboardInterrupt:
                return INTERRUPTED
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1", rank_log.ENV: "1"}
    # A session of its own: Ctrl-C reaches this process only, which stops the agent once, in order.
    proc = subprocess.Popen(torchrun_command(nproc=nproc, config=config, run_dir=run_dir, resume=resume), env=env,
                            start_new_session=True)
    try:
        with _terminate_as_interrupt():
            return proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        return INTERRUPTED


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler, Ray Tune stopping a trial, ``kill``) stops the ranks as Ctrl-C does:
    the agent is in a session of its own, so a SIGTERM that ended this process alone would leave
    it and its ranks running."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave SIGTERM as it is
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(proc: subprocess.Popen) -> None:
    """Asks the agent to stop its ranks (SIGINT); kills the whole group if that takes too long."""
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=SHUTDOWN_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    if proc.poll() is None:
        _kill_group(proc.pid)
        proc.wait()
    # Ranks the agent left behind (it was killed, or exited before them) go with their group.
    deadline = time.monotonic() + SHUTDOWN_S
    while _group_alive(proc.pid):
        if time.monotonic() > deadline:
            _kill_group(proc.pid)
            deadline = time.monotonic() + SHUTDOWN_S
        time.sleep(0.1)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies aside)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@dataclass(frozen=True)
class Failure:
    """Why a local run failed, as the launcher reports it."""

    line: str
    """One line: the failing rank, its error, and the path of its full log."""
    bad_input: bool
    """The rank stopped on a ShardrecError (bad config or data): the CLI exits 2."""


def failure(run_dir: Path) -> Failure:
    """The first failure of a local run: the rank torchrun saw fail first (``failure.json``), with
    its own error line if it left one, else how it ended (exit code, signal)."""
    agent = rank_log.log_dir(run_dir) / FAILURE_FILE
    first = json.loads(agent.read_text()) if agent.is_file() else None
    errors = rank_log.errors(run_dir)
    if first is not None:
        rank = int(first["rank"])
        own = errors.get(rank)
        if own is None or own["kind"] == "lost":
            # The first rank torchrun saw end may only echo another's failure (it lost its peer):
            # a rank's own error, else a rank killed by a signal, is the one to report.
            real = rank_log.first_error(errors)
            own = real if real is not None and real["kind"] != "lost" else None
            killed = [f for f in first.get("all", []) if f.get("signal")]
            if own is None and killed and errors.get(rank, {}).get("kind") == "lost":
                first = killed[0]
                rank = int(first["rank"])
        if own is None:
            how = f"was killed by {first['signal']}" if first.get("signal") else f"exited with code {first['exitcode']}"
            hint = " (out of memory? see the kernel log)" if first.get("signal") == "SIGKILL" else ""
            return Failure(f"rank {rank} {how}{hint} (full log: {rank_log.log_file(run_dir, rank)})", bad_input=False)
    else:
        own = rank_log.first_error(errors)
    if own is not None:
        rank = int(own["rank"])
        return Failure(f"rank {rank}: {' '.join(str(own['line']).split())} (full log: {rank_log.log_file(run_dir, rank)})",
                       bad_input=own["kind"] == "input")
    return Failure(f"the ranks left no error; see {rank_log.log_dir(run_dir)}", bad_input=False)
