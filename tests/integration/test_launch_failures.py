"""What ``shardrec train`` prints when ranks fail at run time, and what Ctrl-C does, on 2 real ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import tiny_job_dict
from shardrec.checkpoint.store import latest

TIMEOUT_S = 300  # a hang guard, not a timing


def _start(tmp: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # As from a terminal: SIGINT's default action, even if this test process inherited it ignored
    # (a process started with SIGINT ignored keeps ignoring it, as POSIX background jobs do).
    return subprocess.Popen([sys.executable, "-m", "shardrec.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _job(tmp: Path, **sections: dict) -> Path:
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job_dict(tmp, **sections)))
    return path


def _only_run(tmp: Path) -> Path:
    (run,) = (tmp / "runs" / "dlrm").iterdir()
    return run


def _workers_of(run: Path) -> list[int]:
    """Live processes whose command line names ``run`` (the agent and its ranks)."""
    name = f"{run.parent.name}/{run.name}"
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (proc / "stat").read_text().split()[2]
            except OSError:
                continue
            if name in cmd and state != "Z":
                found.append(int(proc.name))
    return found


def test_rank_that_reads_bad_data_is_reported_in_one_line(tmp_path: Path) -> None:
    job = _job(tmp_path, steps=40)
    table = pq.read_table(tmp_path / "train.parquet")
    labels = table.column("label").to_pylist()
    labels[3000] = 3.0  # in rank 1's half of the file, read after a few steps
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.float32())), bad,
                   row_group_size=512)
    proc = _start(tmp_path, str(job), "--nproc", "2", f"--data.train_path={bad}")
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 2, err[-3000:]
    run = _only_run(tmp_path)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("shardrec: error: training failed: rank ") and f"'{bad}'" in lines[0]
    assert "0 or 1" in lines[0] and f"(full log: {run / 'logs'}/rank-" in lines[0]
    for noise in ("Traceback", "ChildFailedError", "torch/distributed/elastic", "SIGTERM"):
        assert noise not in err + out
    rank = int(lines[0].split("rank ")[1].split(":")[0])
    log = run / "logs" / f"rank-{rank}.log"
    assert "labels must be 0 or 1" in log.read_text()
    assert "Root Cause" in (run / "logs" / "launcher.log").read_text()  # torchrun's dump is kept, off the terminal


def test_rank_killed_is_named_with_its_log(tmp_path: Path) -> None:
    job = _job(tmp_path, steps=100000, checkpoint={"enabled": True, "interval": 5})
    proc = _start(tmp_path, str(job), "--nproc", "2")
    run = _wait_for_checkpoint(tmp_path, proc)
    (victim,) = [p for p in _workers_of(run) if _rank_of(p) == 1]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "rank 1 was killed by SIGKILL" in lines[0] and "rank-1.log" in lines[0]
    assert "Traceback" not in err and "ChildFailedError" not in err


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _wait_for_checkpoint(tmp: Path, proc: subprocess.Popen[str]) -> Path:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        found = list((tmp / "runs").glob("dlrm/*/checkpoints/step-*/meta.json"))
        if found:
            return found[0].parents[2]
        time.sleep(0.2)
    raise AssertionError("no checkpoint was committed")


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_stops_every_rank_and_resume_continues(tmp_path: Path, nproc: int) -> None:
    steps = 300
    job = _job(tmp_path, steps=steps, checkpoint={"enabled": True, "interval": 10})
    proc = _start(tmp_path, str(job), "--nproc", str(nproc))
    run = _wait_for_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the foreground process
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"shardrec train --resume {run}" in err
    assert _workers_of(run) == []
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "interrupted" and 0 < result["step"] < steps
    assert Path(result["checkpoint"]).name == f"step-{result['step']:08d}"
    assert latest(run / "checkpoints").name == Path(result["checkpoint"]).name  # an unfinished save is not the latest
    resumed = _start(tmp_path, str(job), "--nproc", str(nproc), "--resume", str(run))
    out, err = resumed.communicate(timeout=TIMEOUT_S)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from {result['checkpoint']}" in out
    final = json.loads((run / "result.json").read_text())
    assert final["status"] == "completed" and final["step"] == steps


def test_sigterm_stops_every_rank_as_ctrl_c_does(tmp_path: Path) -> None:
    # A scheduler or Ray Tune ends `shardrec train` with SIGTERM: its agent and ranks, in a session of
    # their own, must stop with it instead of running on.
    job = _job(tmp_path, steps=300, checkpoint={"enabled": True, "interval": 10})
    proc = _start(tmp_path, str(job), "--nproc", "2")
    run = _wait_for_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert _workers_of(run) == []
    assert json.loads((run / "result.json").read_text())["status"] == "interrupted"
