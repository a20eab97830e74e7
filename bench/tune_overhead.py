"""Overhead of a ``shardrec tune`` trial against the same job run by ``shardrec train``, same run.

The job: DLRM on 16,384 synthetic rows with a planted signal, 2 ranks, ``--steps`` steps with an
evaluation every tenth of them. The tune side is a one-trial sweep (a one-value ``choice``, FIFO,
an embedded local Ray), so its trial trains exactly the job ``shardrec train`` trains. Both are
timed as a user waits for them, fresh processes and imports included (Ray's start and stop on
the tune side), alternating, medians over ``--repeats``.

    python bench/tune_overhead.py [--steps 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import tiny_job_dict  # noqa: E402
from shardrec.config import build  # noqa: E402
from shardrec.data.schema import FeatureSchema  # noqa: E402
from shardrec.data.synthetic_signal import generate  # noqa: E402


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        job = tiny_job_dict(tmp, steps=args.steps, train={"eval_interval": args.steps // 10, "log_interval": 50, "progress_bar": False},
                            checkpoint={"enabled": False}, run={"root": str(tmp / "runs")})
        schema = build(FeatureSchema, job["features"], key="features")
        for split, rows, seed in (("train", 16384, 1), ("eval", 4096, 2)):
            generate(schema, rows=rows, path=tmp / f"{split}.parquet", seed=seed, signal_seed=7, row_group_size=1024)
        job["data"].update(train_path=str(tmp / "train.parquet"), eval_path=str(tmp / "eval.parquet"))
        (tmp / "job.yaml").write_text(yaml.safe_dump(job))
        (tmp / "space.yaml").write_text(yaml.safe_dump({"train.dense_optimizer.lr": {"choice": [job["train"]["dense_optimizer"]["lr"]]}}))
        py = [sys.executable, "-m", "shardrec.cli"]
        train_s, tune_s = [], []
        for k in range(args.repeats):
            train_s.append(timed([*py, "train", "job.yaml", "--nproc", "2"], tmp))
            tune_s.append(timed([*py, "tune", "job.yaml", "--space", "space.yaml", "--samples", "1", "--scheduler", "fifo",
                                 "--out", f"sweep{k}"], tmp))
            rows = json.loads((tmp / f"sweep{k}" / "results.json").read_text())["trials"]
            assert rows[0]["status"] == "completed", rows
        train, tune = statistics.median(train_s), statistics.median(tune_s)
        print("| steps | shardrec train s | shardrec tune (1 trial) s | tune / train |")
        print("|---|---|---|---|")
        print(f"| {args.steps} | {train:.1f} ({', '.join(f'{t:.1f}' for t in train_s)}) | "
              f"{tune:.1f} ({', '.join(f'{t:.1f}' for t in tune_s)}) | {tune / train:.2f}x |")


if __name__ == "__main__":
    main()
