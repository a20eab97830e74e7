"""torchrun, quiet: ``python -m shardrec.launch.agent LOG_DIR TORCHRUN_ARGS...``.

Runs torchrun's elastic agent in this process with its log lines and its failure dump (the
ChildFailedError table of every rank's traceback) written to ``LOG_DIR/launcher.log`` instead of
the terminal, and the first failure's rank, exit code and signal in ``LOG_DIR/failure.json``, for
``shardrec train`` to report in one line. Exit codes: 0 success, 1 a rank failed, 130 SIGINT.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

AGENT_LOG = "launcher.log"
FAILURE_FILE = "failure.json"


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("torch.distributed")
    for old in list(logger.handlers):  # torch's own stderr handler
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


def main(argv: list[str]) -> int:
    """Runs torchrun with ``argv[1:]``, logging under ``argv[0]``; returns the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    log_dir = Path(argv[0])
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = _log_to(log_dir / AGENT_LOG)
    try:
        run(parse_args(argv[1:]))
    except ChildFailedError as e:
        handler.stream.write(e.format_msg() + "\n")
        rank, failure = e.get_first_failure()
        every = [{"rank": r, "exitcode": f.exitcode, "signal": f.signal_name() if f.exitcode < 0 else None}
                 for r, f in sorted(e.failures.items())]
        signame = failure.signal_name() if failure.exitcode < 0 else None
        (log_dir / FAILURE_FILE).write_text(
            json.dumps({"rank": rank, "exitcode": failure.exitcode, "signal": signame, "all": every}) + "\n")
        return 1
    except SignalException as e:
        return 128 + int(e.sigval)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    finally:
        handler.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
