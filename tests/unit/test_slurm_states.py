"""The Slurm scheduler's reading of scontrol and sacct, without a cluster: every state the issue
names maps to a torchx state, a job's components combine into one, a failure names its node and
error line, and status/logs/cancel never end in a traceback (Slurm's commands stubbed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from torchx.specs import AppState

from shardrec.errors import LaunchError
from shardrec.launch import cluster, slurm

# Two components of heterogeneous job 4 as Slurm 22.05's `scontrol -o show job 4` printed them (trimmed).
SCONTROL = (
    "JobId=4 HetJobId=4 HetJobOffset=0 JobName=trainer-0 HetJobIdSet=4-5 UserId=root(0) JobState={s0} Reason={r0} "
    "Requeue=1 Restarts=0 BatchFlag=1 ExitCode={e0} RunTime=00:00:01 AllocNode:Sid=localhost:1198 NodeList=n1 "
    "ReqB:S:C:T=0:0:*:* CPUs/Task=2 Command=/tmp/run dir/sbatch.sh WorkDir=/tmp/s1 StdErr={out}/slurm-4.out StdOut={out}/slurm-4.out Power=\n"
    "JobId=5 HetJobId=4 HetJobOffset=1 JobName=trainer-1 HetJobIdSet=4-5 UserId=root(0) JobState={s1} Reason=None "
    "ExitCode={e1} NodeList=n2 StdOut={out}/slurm-5.out Power=\n"
)

STATES = ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "REQUEUED"]


@pytest.mark.parametrize(("state", "expected"), [
    ("PENDING", AppState.PENDING), ("RUNNING", AppState.RUNNING), ("COMPLETED", AppState.SUCCEEDED),
    ("FAILED", AppState.FAILED), ("CANCELLED", AppState.CANCELLED), ("CANCELLED by 0", AppState.CANCELLED),
    ("TIMEOUT", AppState.FAILED), ("NODE_FAIL", AppState.FAILED), ("PREEMPTED", AppState.FAILED),
    ("REQUEUED", AppState.PENDING), ("COMPLETING", AppState.RUNNING), ("OUT_OF_MEMORY", AppState.FAILED),
    ("SOMETHING_NEW", AppState.UNKNOWN),
])
def test_every_slurm_state_maps(state: str, expected: AppState) -> None:
    assert slurm.app_state(state) == expected


@pytest.mark.parametrize(("states", "expected"), [
    (["COMPLETED", "COMPLETED"], AppState.SUCCEEDED),
    (["COMPLETED", "RUNNING"], AppState.RUNNING),  # torchx took the last row alone
    (["RUNNING", "FAILED"], AppState.FAILED),
    (["CANCELLED by 0", "FAILED"], AppState.FAILED),
    (["CANCELLED", "COMPLETED"], AppState.CANCELLED),
    (["PENDING", "PENDING"], AppState.PENDING),
    (["REQUEUED", "COMPLETED"], AppState.PENDING),
])
def test_components_combine_into_one_state(states: list[str], expected: AppState) -> None:
    parts = [slurm.Component(offset=i, name=f"trainer-{i}", state=s) for i, s in enumerate(states)]
    assert slurm.combined_state(parts) == expected


def test_scontrol_lines_parse_with_spaces_and_colons_in_values(tmp_path: Path) -> None:
    text = SCONTROL.format(s0="RUNNING", s1="RUNNING", r0="None", e0="0:0", e1="0:0", out=tmp_path)
    parts = slurm.parse_scontrol(text, "4")
    assert [(c.offset, c.name, c.state, c.node) for c in parts] == [(0, "trainer-0", "RUNNING", "n1"), (1, "trainer-1", "RUNNING", "n2")]
    assert parts[0].stdout == f"{tmp_path}/slurm-4.out" and parts[0].reason == ""
    assert slurm.parse_scontrol(text, "7") == []


def test_sacct_rows_leave_the_steps_out() -> None:
    text = "12+0|trainer-0|CANCELLED by 0|0:15|n1\n12+0.batch|batch|CANCELLED|0:15|n1\n12+0.0|bash|CANCELLED|0:15|n1\n" \
           "12+1|trainer-1|COMPLETED|0:0|n2\n120|other|FAILED|1:0|n1\n"
    parts = slurm.parse_sacct(text, "12")
    assert [(c.offset, c.name, c.state) for c in parts] == [(0, "trainer-0", "CANCELLED by 0"), (1, "trainer-1", "COMPLETED")]
    assert slurm.combined_state(parts) == AppState.CANCELLED
    (single,) = slurm.parse_sacct("13|trainer-0|COMPLETED|0:0|n1\n13.batch|batch|COMPLETED|0:0|n1\n", "13")
    assert single.offset == 0


def test_first_error_prefers_shardrecs_line_then_the_exception() -> None:
    assert slurm.first_error(["[trainer0]:loading\n", "[trainer0]:shardrec: error: unknown config key 'x'\n",
                              "Traceback (most recent call last):\n", "ValueError: later\n"]) == "shardrec: error: unknown config key 'x'"
    crash = ["[trainer1]:Traceback (most recent call last):\n", '[trainer1]:  File "x.py", line 1\n',
             "[trainer1]:RuntimeError: CUDA out of memory\n", "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"]
    assert slurm.first_error(crash) == "RuntimeError: CUDA out of memory"
    assert slurm.first_error(["all fine\n"]) is None


class _Slurm:
    """Stands in for scontrol, sacct, sbatch and scancel; ``live`` is scontrol's answer (None: forgotten)."""

    def __init__(self, live: str | None, acct: str | None = None) -> None:
        self.live, self.acct, self.calls = live, acct, []

    def __call__(self, cmd: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(cmd)
        if cmd[0] == "scontrol":
            if self.live is None:
                return subprocess.CompletedProcess(cmd, 1, "", "slurm_load_jobs error: Invalid job id specified")
            return subprocess.CompletedProcess(cmd, 0, self.live, "")
        if cmd[0] == "sacct":
            if self.acct is None:
                return subprocess.CompletedProcess(cmd, 1, "", "Slurm accounting storage is disabled")
            return subprocess.CompletedProcess(cmd, 0, self.acct, "")
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # noqa: ANN201
    monkeypatch.setenv(slurm.REGISTRY_ENV, str(tmp_path / "jobs.tsv"))
    monkeypatch.setattr(cluster, "_RUNNER", None)

    def install(live: str | None, acct: str | None = None) -> _Slurm:
        stub = _Slurm(live, acct)
        monkeypatch.setattr(slurm, "_run", stub)
        return stub

    return install


@pytest.mark.parametrize("state", STATES)
def test_status_logs_cancel_on_every_state_without_accounting(fake, tmp_path: Path, state: str) -> None:  # noqa: ANN001
    other = "FAILED" if state == "FAILED" else "RUNNING" if state == "RUNNING" else state
    stub = fake(SCONTROL.format(s0=state, s1=other, r0="Resources" if state == "PENDING" else "None",
                                e0="1:0" if state == "FAILED" else "0:0", e1="0:0", out=tmp_path))
    (tmp_path / "slurm-4-trainer-0.log").write_text("[trainer0]:step 1\n")
    handle = "slurm://torchx/4"
    st = cluster.status(handle)
    assert st.state == slurm.app_state(state)
    text = cluster.format_status(handle, st)
    assert text.startswith(f"{handle}: {st.state.name}")
    if state == "FAILED":
        assert "trainer-0 FAILED (exit 1:0)" in text
    if state == "PENDING":
        assert "Resources" in text
    assert cluster.replicas(handle) == 2
    assert "".join(cluster.logs(handle, replica=0)) == "[trainer0]:step 1\n"
    with pytest.raises(RuntimeError, match="wrote no log"):  # node 1 has not written one: _print_lines reports it
        list(cluster.logs(handle, replica=1))
    cluster.cancel(handle)
    assert (["scancel", "4"] in stub.calls) == (not st.is_terminal())


def test_failed_job_names_the_node_whose_log_has_the_error(fake, tmp_path: Path) -> None:  # noqa: ANN001
    fake(SCONTROL.format(s0="FAILED", s1="FAILED", r0="NonZeroExitCode", e0="143:0", e1="0:15", out=tmp_path))
    (tmp_path / "slurm-4-trainer-0.log").write_text("[trainer0]:sharding plan:\nslurmstepd: error: *** STEP 4.0 CANCELLED ***\n")
    (tmp_path / "slurm-4-trainer-1.log").write_text("[trainer0]:shardrec: error: data.train_path 'x' does not exist\n")
    st = cluster.status("slurm://torchx/4")
    assert st.msg == "trainer-1 FAILED (exit 0:15): shardrec: error: data.train_path 'x' does not exist"


def test_a_job_the_controller_forgot_is_read_from_accounting(fake, tmp_path: Path) -> None:  # noqa: ANN001
    fake(None, acct="4+0|trainer-0|COMPLETED|0:0|n1\n4+1|trainer-1|COMPLETED|0:0|n2\n")
    assert cluster.status("slurm://torchx/4").state == AppState.SUCCEEDED


def test_a_forgotten_job_without_accounting_is_a_clear_error(fake, tmp_path: Path) -> None:  # noqa: ANN001
    fake(None)
    slurm._remember("4", tmp_path)
    with pytest.raises(LaunchError, match=f"MinJobAge.*its logs are in {tmp_path}"):
        cluster.status("slurm://torchx/4")


def test_sbatch_refusal_is_a_launch_error(fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    fake("")

    def sbatch(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "sbatch: error: Batch job submission failed: Requested node configuration is not available")

    monkeypatch.setattr(slurm, "_run", sbatch)
    from torchx.specs import AppDryRunInfo
    from torchx.schedulers.slurm_scheduler import SlurmBatchRequest

    req = SlurmBatchRequest(cmd=["sbatch", "--parsable"], replicas={}, job_dir=str(tmp_path / "slurm"), max_retries=0)
    with pytest.raises(LaunchError, match="sbatch refused the job: .*Requested node configuration is not available"):
        slurm.Scheduler("t").schedule(AppDryRunInfo(req, repr))


def test_no_slurm_commands_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm, "_run", lambda cmd: None)
    with pytest.raises(LaunchError, match="not on PATH"):
        slurm.components("4")
