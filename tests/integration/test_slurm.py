"""A real Slurm (slurm-wlm, munge): submit, wait, status, logs, cancel, a killed rank restarted and
resumed, a job failing on bad config; each with accounting off and on (slurmdbd over MariaDB,
where the controller forgets ended jobs after 10 s, so their states come from sacct). Marked
``slurm``.

The cluster is the one SLURM_CONF names when its controller answers (the tests of its accounting
mode run, the others skip), else one that scripts/slurm_local.sh starts for these tests (needs
root and the packages; .ci/run installs them where it can); otherwise the tests are skipped with
the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from helpers import checkpoint_weights as _weights, restartable_job, train_losses as _losses
from shardrec.checkpoint import store as checkpoint
from shardrec.launch import cluster
from shardrec.launch.spawn import free_port, worker_pid

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
STEPS, INTERVAL = 40, 10
TIMEOUT_S = 400


def _answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=20).stdout.count("UP") > 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def _has_accounting(env: dict[str, str]) -> bool:
    config = subprocess.run(["scontrol", "show", "config"], env=env, capture_output=True, text=True, timeout=20).stdout
    return "accounting_storage/slurmdbd" in config


@pytest.fixture(scope="module", params=[False, True], ids=["no-accounting", "accounting"])
def slurm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment that reaches a running Slurm (SLURM_CONF set), started here if need be;
    with accounting (slurmdbd) or without, as the parameter says."""
    accounting: bool = request.param
    mode = "with accounting" if accounting else "without accounting"
    if os.environ.get("SLURM_CONF") and _answers(dict(os.environ)):
        if _has_accounting(dict(os.environ)) != accounting:
            pytest.skip(f"the cluster SLURM_CONF names runs {'without' if accounting else 'with'} accounting; these tests need one {mode}")
        yield {}
        return
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        pytest.skip("Slurm is not installed (sudo scripts/slurm_local.sh install: the slurm-wlm and munge packages)")
    if accounting and (shutil.which("slurmdbd") is None or shutil.which("mariadbd") is None):
        pytest.skip("Slurm accounting is not installed (sudo scripts/slurm_local.sh install: the slurmdbd and mariadb-server packages)")
    if os.geteuid() != 0:
        pytest.skip("starting a Slurm here needs root (its daemons run as root): run scripts/slurm_local.sh start with sudo")
    state = tmp_path_factory.mktemp("slurm-acct" if accounting else "slurm")
    env = {**os.environ, "SHARDREC_SLURM_DIR": str(state), "SHARDREC_SLURM_PORT": str(free_port())}
    started = subprocess.run([str(SCRIPT), "start", *(["--accounting"] if accounting else [])], env=env, capture_output=True,
                             text=True, timeout=180)
    if started.returncode != 0:
        pytest.fail(f"scripts/slurm_local.sh start failed:\n{started.stdout}\n{started.stderr}")
    extra = {"SLURM_CONF": str(state / "etc" / "slurm.conf"), "SHARDREC_SLURM_JOBS": str(state / "jobs.tsv")}
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)  # the in-process cluster API (and the CLI runs below) reach this cluster
    try:
        yield extra
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return restartable_job(tmp_path_factory.mktemp("slurm-job"), steps=STEPS, interval=INTERVAL)


def _cli(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardrec.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _handle(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("app handle: ")]
    return line.removeprefix("app handle: ")


def _run_dir(out: str) -> Path:
    (line,) = [line for line in out.splitlines() if line.startswith("run folder: ")]
    return Path(line.removeprefix("run folder: "))


def _no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


@pytest.fixture(scope="module")
def two_nodes(slurm: dict[str, str], job: Path) -> tuple[subprocess.CompletedProcess[str], str, Path]:
    """The job on two Slurm nodes of one rank each, through the CLI, followed to its end."""
    done = _cli("submit", str(job), "-s", "slurm", "-j", "2x1", "--wait", "--rdzv-port", str(free_port()))
    assert "app handle: slurm://" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    return done, _handle(done.stdout), _run_dir(done.stdout)


def test_two_nodes_train_to_success_with_status_and_logs(two_nodes: tuple[subprocess.CompletedProcess[str], str, Path]) -> None:
    done, handle, run = two_nodes
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _no_traceback(done)
    assert f"{handle}: SUCCEEDED" in done.stdout and "eval auc" in done.stdout
    # Both nodes followed, each line prefixed with its node (rank 0 is on either: torchrun's rendezvous picks).
    assert "trainer/0 " in done.stdout or "trainer/1 " in done.stdout
    topology = json.loads((run / "plan.json").read_text())["topology"]
    assert (topology["world_size"], topology["local_world_size"]) == (2, 1)
    final = run / "checkpoints" / f"step-{STEPS:08d}"
    assert {p.name for p in final.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}  # a shard from each node
    status = _cli("status", handle)
    assert status.returncode == 0 and f"{handle}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    logs = _cli("logs", handle)
    assert logs.returncode == 0, logs.stderr
    assert "sharding plan:" in logs.stdout and "eval auc" in logs.stdout
    job_id = handle.rsplit("/", 1)[1]
    assert {p.name for p in (run / "slurm").glob("*.log")} == {f"slurm-{job_id}-trainer-0.log", f"slurm-{job_id}-trainer-1.log"}
    node1 = _cli("logs", handle, "--node", "1")
    assert node1.returncode == 0 and node1.stdout == (run / "slurm" / f"slurm-{job_id}-trainer-1.log").read_text()


def test_running_job_shows_running_then_cancelled(slurm: dict[str, str], job: Path) -> None:
    done = _cli("submit", str(job), "-s", "slurm", "-j", "1x2", "--train.steps=1000000", "--checkpoint.enabled=false")
    assert done.returncode == 0, done.stderr[-3000:]
    handle = _handle(done.stdout)
    try:
        running = _poll(lambda: (s := _cli("status", handle)).returncode == 0 and ": RUNNING" in s.stdout and s, 120)
        _no_traceback(running)
        _poll(lambda: "sharding plan:" in _cli("logs", handle).stdout, 240)  # the ranks started: their log shows it
    finally:
        cancelled = _cli("cancel", handle)
    assert cancelled.returncode == 0 and "cancel requested" in cancelled.stdout, cancelled.stderr
    final = _poll(lambda: (s := _cli("status", handle)).returncode == 0 and ": CANCELLED" in s.stdout and s, 120)
    _no_traceback(final)
    again = _cli("cancel", handle)  # an ended job: nothing to do, no error
    assert again.returncode == 0, again.stderr


def test_killed_rank_restarts_and_resumes_to_the_uninterrupted_model(
    slurm: dict[str, str], job: Path, two_nodes: tuple[subprocess.CompletedProcess[str], str, Path]
) -> None:
    uninterrupted_run = two_nodes[2]
    plan = uninterrupted_run / "plan.json"  # the same plan on 1x2: the same model, bit for bit
    sub = cluster.prepare(job, [f"sharding.plan={plan}"], cluster.LaunchConfig(scheduler="slurm", j="1x2", max_restarts=1))
    handle = cluster.submit(sub)
    try:
        ckpt = _wait_for(lambda: checkpoint.latest(sub.run_dir / "checkpoints"), handle)
        step = int(ckpt.name.split("-")[1])
        _wait_for(lambda: max(_losses(sub.run_dir), default=0) >= step + 3 or None, handle)
        killed_at = max(_losses(sub.run_dir))
        os.kill(worker_pid(sub.run_dir, rank=1), signal.SIGKILL)
        status = _wait_for(lambda: (s := cluster.status(handle)).is_terminal() and s or None, handle, timeout=TIMEOUT_S)
    finally:
        if not cluster.status(handle).is_terminal():
            cluster.cancel(handle)
    assert status.state.name == "SUCCEEDED", cluster.format_status(handle, status)
    logs = "".join(cluster.logs(handle))
    assert "resumed from" in logs
    records = [json.loads(line) for line in (sub.run_dir / "metrics.jsonl").read_text().splitlines()]
    (resume,) = [r for r in records if r["kind"] == "resume"]
    assert resume["restarts"] == 1 and resume["step"] % INTERVAL == 0 and resume["step"] < killed_at
    final = f"checkpoints/step-{STEPS:08d}"
    mine = _weights(sub.run_dir / final, sub.run_dir / "final.pt")
    theirs = _weights(uninterrupted_run / final, sub.run_dir / "uninterrupted.pt")
    assert mine.keys() == theirs.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0, msg=key)


def test_job_failing_on_bad_config_names_the_node_and_the_error(slurm: dict[str, str], job: Path) -> None:
    sub = cluster.prepare(job, [], cluster.LaunchConfig(scheduler="slurm", j="2x1", rdzv_port=free_port()))
    config = sub.run_dir / "config.yaml"  # what the ranks read: broken after the submit-time checks passed
    config.write_text(config.read_text().replace("train:\n", "train:\n  stepz: 3\n", 1))
    handle = cluster.submit(sub)
    status = _wait_for(lambda: (s := cluster.status(handle)).is_terminal() and s or None, handle, timeout=TIMEOUT_S,
                       ended_ok=True)
    assert status.state.name == "FAILED"
    shown = _cli("status", handle)
    assert shown.returncode == 0, shown.stderr
    _no_traceback(shown)
    assert f"{handle}: FAILED" in shown.stdout
    assert "trainer-" in shown.stdout and "shardrec: error: unknown config key 'train.stepz'" in shown.stdout, shown.stdout
    for node in ("0", "1"):  # both ranks' logs, each with the error line
        logs = _cli("logs", handle, "--node", node)
        assert logs.returncode == 0 and "unknown config key 'train.stepz'" in logs.stdout, logs.stdout[-2000:] + logs.stderr
    if _has_accounting(dict(os.environ)):  # once the controller forgets it, sacct gives the same answer
        job_id = handle.rsplit("/", 1)[1]
        _poll(lambda: subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).returncode != 0, 180)
        later = _cli("status", handle)
        assert later.returncode == 0 and f"{handle}: FAILED" in later.stdout, later.stdout + later.stderr
        assert "shardrec: error: unknown config key 'train.stepz'" in later.stdout and "trainer-" in later.stdout, later.stdout
        _no_traceback(later)


def test_accounting_reports_a_job_the_controller_forgot(
    slurm: dict[str, str], two_nodes: tuple[subprocess.CompletedProcess[str], str, Path]
) -> None:
    if not _has_accounting(dict(os.environ)):
        pytest.skip("needs accounting: without it a forgotten job is an error (test_forgotten_job_is_a_clear_error)")
    _, handle, run = two_nodes
    job_id = handle.rsplit("/", 1)[1]
    # MinJobAge=10 on the accounting cluster: the controller drops the ended job within a purge cycle.
    _poll(lambda: subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).returncode != 0, 180)
    acct = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job_id], capture_output=True, text=True)
    assert acct.returncode == 0 and "COMPLETED" in acct.stdout, acct.stdout + acct.stderr
    status = _cli("status", handle)
    assert status.returncode == 0 and f"{handle}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    _no_traceback(status)
    logs = _cli("logs", handle, "--node", "1")  # the log folder from the registry of submitted jobs
    assert logs.returncode == 0 and logs.stdout == (run / "slurm" / f"slurm-{job_id}-trainer-1.log").read_text()


def test_forgotten_job_is_a_clear_error(slurm: dict[str, str]) -> None:
    done = _cli("status", "slurm://torchx/987654")
    assert done.returncode == 2 and "the scheduler does not know this job" in done.stderr and "MinJobAge" in done.stderr
    _no_traceback(done)


def _poll(probe: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(1)
    pytest.fail(f"timed out after {timeout} s waiting for {probe}")


def _wait_for(probe: Callable[[], Any], handle: str, *, timeout: float = 300, ended_ok: bool = False) -> Any:
    """Polls ``probe`` until it returns a value; fails when the job ends first or time runs out."""
    deadline, checked = time.monotonic() + timeout, 0.0
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        if time.monotonic() - checked > 1:  # scontrol once a second; the probe (files) more often, as steps are fast
            checked = time.monotonic()
            status = cluster.status(handle)
            assert ended_ok or not status.is_terminal(), f"the job ended first: {cluster.format_status(handle, status)}"
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {probe}")
