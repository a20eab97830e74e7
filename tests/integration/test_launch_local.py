"""torchx local_cwd end to end: two "nodes" (torchrun agents) on loopback, and a 2-rank job that is
submitted, loses a rank mid-run, restarts, resumes and finishes with the uninterrupted model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from helpers import checkpoint_weights as _weights, restartable_job, train_losses as _losses
from shardrec.launch import cluster
from shardrec.launch.spawn import free_port, worker_pid
from shardrec.checkpoint import store as checkpoint

STEPS, INTERVAL = 40, 10


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return restartable_job(tmp_path_factory.mktemp("launch"), steps=STEPS, interval=INTERVAL)


@pytest.fixture(scope="module")
def two_nodes(job: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The job as two torchrun agents of one rank each, through the real CLI."""
    done = subprocess.run(
        [sys.executable, "-m", "shardrec.cli", "submit", str(job), "-j", "2x1", "--rdzv-port", str(free_port())],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    (run,) = (job.parent / "runs" / "dlrm").iterdir()
    return done, run


def test_two_nodes_on_loopback_train_and_checkpoint(two_nodes: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    done, run = two_nodes
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "app handle: local_cwd://" in done.stdout and ": SUCCEEDED" in done.stdout
    assert "trainer/0 " in done.stdout  # node 0's log, prefixed as there are several
    topology = json.loads((run / "plan.json").read_text())["topology"]
    assert (topology["world_size"], topology["local_world_size"]) == (2, 1)  # the planner saw 2 nodes x 1
    final = run / "checkpoints" / f"step-{STEPS:08d}"
    assert json.loads((final / "meta.json").read_text())["world_size"] == 2
    assert {p.name for p in final.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}  # a shard from each node
    assert json.loads((run / "result.json").read_text())["step"] == STEPS
    losses = _losses(run)
    assert sum(losses[s] for s in range(31, 41)) < sum(losses[s] for s in range(1, 11))


def test_stock_torchx_cli_takes_the_component(job: Path) -> None:
    torchx = Path(sys.executable).parent / "torchx"
    component = f"{Path(cluster.__file__).parent / 'components.py'}:train"
    done = subprocess.run([str(torchx), "run", "--dryrun", "-s", "local_cwd", component, "--config", str(job), "-j", "2x1",
                           "--max_restarts", "2", "--", "--train.steps=5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = re.sub(r"""['"]\n\s+['"]""", "", done.stdout)  # pprint splits long strings over lines
    for part in ("--nnodes=2 --nproc-per-node=1", "--max-restarts=2", f"-m shardrec.train.worker --config {job}",
                 "--resume auto --train.steps=5", "TORCHX_RANK0_HOST"):
        assert part in printed, part


@dataclass
class Killed:
    """A 1x2 job whose rank 1 was killed after its first checkpoint, followed to the end."""

    handle: str
    status: Any
    logs: str
    run: Path
    killed_at_step: int


@pytest.fixture(scope="module")
def killed(job: Path, two_nodes: tuple[subprocess.CompletedProcess[str], Path]) -> Killed:
    plan = two_nodes[1] / "plan.json"  # the same plan on 1x2: the same model, bit for bit
    launch = cluster.LaunchConfig(scheduler="local_cwd", j="1x2", max_restarts=1)
    sub = cluster.prepare(job, [f"sharding.plan={plan}"], launch)
    handle = cluster.submit(sub)
    try:
        ckpt = _wait_for(lambda: checkpoint.latest(sub.run_dir / "checkpoints"), handle)
        step = int(ckpt.name.split("-")[1])
        # Lose a few steps past the checkpoint, so that the restart recomputes them.
        _wait_for(lambda: max(_losses(sub.run_dir), default=0) >= step + 3 or None, handle)
        killed_at = max(_losses(sub.run_dir))
        os.kill(worker_pid(sub.run_dir, rank=1), signal.SIGKILL)
        status = _wait_for(lambda: (s := cluster.status(handle)).is_terminal() and s or None, handle, timeout=400)
    finally:
        if not cluster.status(handle).is_terminal():
            cluster.cancel(handle)
    return Killed(handle, status, "".join(cluster.logs(handle)), sub.run_dir, killed_at)


def test_submitted_job_is_polled_to_succeeded_with_its_logs(killed: Killed) -> None:
    assert killed.handle.startswith("local_cwd://")
    assert killed.status.state.name == "SUCCEEDED", cluster.format_status(killed.handle, killed.status)
    assert cluster.root_cause(killed.status.structured_error_msg) is None
    assert "sharding plan:" in killed.logs and "resumed from" in killed.logs and "eval auc" in killed.logs
    assert (killed.run / "torchx").is_dir()  # the logs stay in the run folder


def test_killed_rank_restarts_and_resumes_to_the_uninterrupted_model(killed: Killed, two_nodes: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    records = [json.loads(line) for line in (killed.run / "metrics.jsonl").read_text().splitlines()]
    (resume,) = [r for r in records if r["kind"] == "resume"]
    assert resume["restarts"] == 1 and resume["step"] % INTERVAL == 0 and resume["step"] < killed.killed_at_step
    uninterrupted = _losses(two_nodes[1])
    # Steps past the checkpoint ran twice, before and after the kill: each time with the same loss.
    for r in records:
        if r["kind"] == "train":
            assert r["loss"] == uninterrupted[r["step"]], r
    assert sorted(_losses(killed.run)) == list(range(1, STEPS + 1))
    final = f"checkpoints/step-{STEPS:08d}"
    mine = _weights(killed.run / final, killed.run / "final.pt")
    theirs = _weights(two_nodes[1] / final, killed.run / "uninterrupted.pt")
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0, msg=key)


def _wait_for(probe: Callable[[], Any], handle: str, *, timeout: float = 300) -> Any:
    """Polls ``probe`` until it returns a value; fails when the job ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        status = cluster.status(handle)
        assert not status.is_terminal(), f"the job ended first: {cluster.format_status(handle, status)}"
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {probe}")
