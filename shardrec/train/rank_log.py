"""Each rank's full output in the run folder, and the one line the launching process reports.

``shardrec train`` starts its ranks with ``SHARDREC_RANK_LOGS=1``: each rank then writes everything it
prints to stderr (warnings, tracebacks) into ``<run>/logs/rank-R.log`` (rank 0 also still shows it,
so its progress bar and notes stay on the terminal; the other ranks write only the file), and a
rank that fails leaves ``rank-R.error.json`` with the one line worth showing. The launcher prints
the first failure's line and the log's path instead of torchrun's dump of every rank.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Literal, TextIO

ENV = "SHARDREC_RANK_LOGS"

Kind = Literal["input", "crash", "lost"]
"""input: a ShardrecError (bad config or data); crash: any other exception; lost: the echo of
another rank's failure (a collective lost its peer)."""


def enabled() -> bool:
    """Whether the launcher asked for per-rank logs (and reports failures itself)."""
    return os.environ.get(ENV) == "1"


def log_dir(run_dir: Path) -> Path:
    """The folder of the rank logs of a run."""
    return run_dir / "logs"


def log_file(run_dir: Path, rank: int) -> Path:
    """Rank ``rank``'s full log."""
    return log_dir(run_dir) / f"rank-{rank}.log"


class _Tee:
    """A text stream writing to a terminal stream and to a log file."""

    def __init__(self, terminal: TextIO, file: TextIO) -> None:
        self.terminal, self.file = terminal, file

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.terminal.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.terminal.flush()

    def isatty(self) -> bool:
        return self.terminal.isatty()

    def fileno(self) -> int:
        return self.terminal.fileno()


@contextmanager
def captured(run_dir: Path, rank: int) -> Iterator[None]:
    """Sends this rank's stderr into its log file while the block runs (rank 0: also to the
    terminal; other ranks, which run in processes of their own: their stdout too, at the
    file-descriptor level, so native libraries' lines land there as well)."""
    path = log_file(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1, encoding="utf-8") as file:
        if rank != 0:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(file.fileno(), 1)
            os.dup2(file.fileno(), 2)
            yield
            return
        terminal = sys.stderr
        sys.stderr = _Tee(terminal, file)  # type: ignore[assignment]
        try:
            yield
        finally:
            sys.stderr = terminal


def log_only(stream: object) -> object:
    """The log-file half of rank 0's tee (a traceback stays off the terminal), or ``stream`` itself."""
    return stream.file if isinstance(stream, _Tee) else stream


def write_error(run_dir: Path, rank: int, *, line: str, kind: Kind) -> None:
    """Leaves rank ``rank``'s failure for the launcher: its line, kind and time."""
    path = log_dir(run_dir) / f"rank-{rank}.error.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": rank, "kind": kind, "line": line, "time": time.time()}) + "\n")


def errors(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The errors the ranks of a run left: rank -> {rank, kind, line, time}."""
    found: dict[int, dict[str, Any]] = {}
    for path in log_dir(run_dir).glob("rank-*.error.json"):
        try:
            error = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found[int(error["rank"])] = error
    return found


def first_error(errors: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The failure to report: the earliest of the ranks' own errors, before errors that only echo
    another rank's loss; None if there are none."""
    if not errors:
        return None
    return min(errors.values(), key=lambda e: (e.get("kind") == "lost", float(e.get("time", 0))))
