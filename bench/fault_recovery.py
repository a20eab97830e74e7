"""What a dead rank costs: run a job on local_cwd uninterrupted, then again with ``--max-restarts 1``
killing rank 1 with SIGKILL a few steps past a checkpoint; report the steps lost, the seconds to
recover, the wall times of both runs, and whether the two final checkpoints are equal bit for bit.

    python bench/fault_recovery.py [CONFIG] [--nproc 2] [--kill-after-step 130] [--section.key=value ...]

Steps lost: steps trained before the kill that the restart trains again (kill step - checkpoint
step). Seconds to recover: from the kill to the restarted ranks' first training step, and until
they are back at the step where the kill struck. The figures come from metrics.jsonl (one record
per step: ``--train.log_interval=1``, which this script sets).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from shardrec.launch import cluster
from shardrec.launch.spawn import worker_pid
from shardrec.checkpoint import store as checkpoint


def records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl so far."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def last_step(run_dir: Path) -> int:
    """The latest training step logged."""
    return max((r["step"] for r in records(run_dir) if r["kind"] == "train"), default=0)


def run_job(config: Path | None, overrides: list[str], *, nproc: int, kill_after_step: int | None) -> tuple[Path, float, float]:
    """Runs the job to its end; with ``kill_after_step``, kills rank 1 once that step is logged.
    Returns the run folder, the wall time and the time of the kill (0 without one)."""
    sub = cluster.prepare(config, overrides, cluster.LaunchConfig(j=f"1x{nproc}", max_restarts=1))
    start, kill_time = time.time(), 0.0
    handle = cluster.submit(sub)
    while kill_after_step is not None and not kill_time:
        assert not cluster.status(handle).is_terminal(), "the job ended before the kill"
        if last_step(sub.run_dir) >= kill_after_step:
            kill_time = time.time()
            os.kill(worker_pid(sub.run_dir, rank=1), signal.SIGKILL)
        time.sleep(0.02)
    final = cluster.runner().wait(handle, wait_interval=0.2)
    assert final is not None and cluster.succeeded(final), final
    return sub.run_dir, time.time() - start, kill_time


def weights(run_dir: Path) -> dict[str, Any]:
    """Model and optimizer state of the run's latest checkpoint, in one process."""
    final = checkpoint.latest(run_dir / "checkpoints")
    assert final is not None
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(final), f"{tmp}/state.pt")
        return torch.load(f"{tmp}/state.pt", weights_only=False)


def same(a: Any, b: Any) -> bool:
    """True when two nested state dicts hold equal tensors and values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", type=Path, help="job YAML; default: the embedded default job")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--kill-after-step", type=int, default=130)
    args, rest = p.parse_known_args()
    overrides = [a[2:] for a in rest] + ["train.log_interval=1"]
    baseline, baseline_s, _ = run_job(args.config, overrides, nproc=args.nproc, kill_after_step=None)
    faulted, faulted_s, kill_time = run_job(args.config, overrides, nproc=args.nproc, kill_after_step=args.kill_after_step)
    log = records(faulted)
    at = next(i for i, r in enumerate(log) if r["kind"] == "resume")
    resume, steps = log[at], [r for r in log[at:] if r["kind"] == "train"]  # the restarted ranks' steps
    killed_at = max(r["step"] for r in log[:at] if r["kind"] == "train" and r["time"] < kill_time)
    back = next(r for r in steps if r["step"] >= killed_at)
    print(f"killed rank 1 at step {killed_at}; resumed from step {resume['step']} (restart {resume['restarts']})")
    print(f"steps lost: {killed_at - resume['step']}")
    print(f"seconds from the kill to the restarted ranks' first step: {steps[0]['time'] - kill_time:.1f}")
    print(f"seconds from the kill until back at step {killed_at}: {back['time'] - kill_time:.1f}")
    print(f"wall time: uninterrupted {baseline_s:.1f} s, with the kill {faulted_s:.1f} s ({faulted_s / baseline_s:.2f}x)")
    print(f"final checkpoints equal bit for bit: {same(weights(baseline), weights(faulted))}")
    print(f"runs: {baseline} (uninterrupted), {faulted} (killed)")


if __name__ == "__main__":
    main()
