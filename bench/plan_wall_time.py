"""Wall time of ``shardrec plan`` on 1,000-table models: one that cannot fit, one that does.

Each case runs the real CLI in a fresh process (imports included, as a user waits for it):

- impossible: 1,000 tables of 20M x 128 (row-wise Adagrad, ~9.4 TiB) on 2x8xH100, rejected by
  the memory lower bound; its baseline is the same plan with the bound switched off (the search
  torchrec runs without it), stopped at ``--baseline-cap`` seconds.
- fitting: 1,000 tables of mixed scales (10^3 to 10^7 rows, dim 16 to 128) on 4x8xH100 with
  the default ``sharding.search_seconds``; its baseline is every candidate searched with its own
  estimates (torchrec's enumerator per candidate, as before the shared estimate cache), no budget.

Usage: ``python bench/plan_wall_time.py [--baseline-cap 300]``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NO_BOUND = (
    "import sys; from shardrec.sharding import objectives; objectives.check_memory_bound = lambda *a, **k: None; "
    "from shardrec.cli import main; sys.exit(main(sys.argv[1:]))"
)
UNSHARED = (
    "import sys; from shardrec.sharding import planner; "
    "planner.SharedEstimateEnumerator.populate_estimates = planner.EmbeddingEnumerator.populate_estimates; "
    "from shardrec.cli import main; sys.exit(main(sys.argv[1:]))"
)


def write_tables(path: Path, *, fitting: bool) -> Path:
    """A CSV table list of 1,000 tables."""
    rng = np.random.default_rng(0)
    lines = ["name,rows,dim,pooling_factor"]
    for i in range(1000):
        if fitting:
            rows, dim = int(10 ** rng.uniform(3, 7)), int(rng.choice([16, 32, 64, 128]))
        else:
            rows, dim = 20_000_000 + i, 128
        lines.append(f"t{i},{rows},{dim},{float(rng.choice([1, 1, 2, 8])):g}")
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(args: list[str], *, patch: str | None = None, cap: float | None = None) -> tuple[float, int | None, str]:
    """Seconds, exit code (None when stopped at ``cap``) and the last stderr line of one CLI run;
    ``patch``: a program that changes shardrec before running its CLI."""
    cmd = [sys.executable, "-c", patch, *args] if patch else [sys.executable, "-m", "shardrec.cli", *args]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=cap)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, None, f"stopped at {cap:g} s"
    last = (done.stderr.strip().splitlines() or [""])[-1] if done.returncode else (done.stdout.strip().splitlines() or [""])[-1]
    return time.perf_counter() - start, done.returncode, last[:120]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-cap", type=float, default=300.0, help="seconds after which a baseline run is stopped")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        impossible = write_tables(Path(tmp) / "impossible.csv", fitting=False)
        fitting = write_tables(Path(tmp) / "fitting.csv", fitting=True)
        runs = [
            ("impossible, 2x8xH100", ["plan", "--tables", str(impossible), "--topology", "2x8xH100"], True),
            ("fitting, 4x8xH100", ["plan", "--tables", str(fitting), "--topology", "4x8xH100"], False),
        ]
        print("| case | shardrec plan s (exit) | baseline s (exit) | baseline / now |")
        print("|---|---|---|---|")
        for name, cli_args, impossible_case in runs:
            now = timed(cli_args)
            base_args = cli_args if impossible_case else [*cli_args, "--search-seconds", "100000"]
            base = timed(base_args, patch=NO_BOUND if impossible_case else UNSHARED, cap=args.baseline_cap)
            exit_base = "stopped" if base[1] is None else base[1]
            ratio = f"{'>' if base[1] is None else ''}{base[0] / now[0]:.1f}x"
            print(f"| {name} | {now[0]:.1f} ({now[1]}) | {base[0]:.1f} ({exit_base}) | {ratio} |", flush=True)
            print(f"<!-- {name}: now: {now[2]} | baseline: {base[2]} -->", flush=True)


if __name__ == "__main__":
    main()
