"""torchx's Slurm scheduler made to work on clusters without accounting, and to report what failed.

torchx 0.7 reads every job state from ``sacct``, which fails where accounting storage is off (many
small clusters run that way), so its ``describe`` raised and ``shardrec submit --wait``, ``status``,
``logs`` and ``cancel`` ended in a traceback. It also took the job's state from its last ``sacct``
row, asserted on states it did not list (``CANCELLED by 0``), and wrote logs relative to wherever
sbatch ran.

This scheduler, registered as ``slurm`` in shardrec's torchx runner:

* reads states from ``scontrol show job`` (live: pending, running and recently ended jobs, whatever
  the accounting), then from ``sacct`` for jobs the controller has forgotten (after MinJobAge);
* combines the states of a job's components (one per node) into one torchx state, every Slurm state
  mapped (``STATES``), unknown ones to UNKNOWN;
* writes each node's log (stdout and stderr, appended across requeues) and the batch script's own
  output into the run folder's ``slurm/`` folder, and remembers that folder per job id;
* names, for a failed job, the node whose log has an error first and that error line.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from torchx.schedulers.api import DescribeAppResponse, Stream, filter_regex, split_lines_iterator
from torchx.schedulers.slurm_scheduler import SlurmBatchRequest, SlurmScheduler
from torchx.specs import AppDef, AppDryRunInfo, AppState, ReplicaStatus, Role, RoleStatus, is_terminal, macros, runopts

from shardrec.errors import LaunchError

STATES: dict[str, AppState] = {
    # waiting
    "PENDING": AppState.PENDING, "CONFIGURING": AppState.PENDING, "REQUEUED": AppState.PENDING,
    "REQUEUE_FED": AppState.PENDING, "REQUEUE_HOLD": AppState.PENDING, "RESIZING": AppState.PENDING,
    "RESV_DEL_HOLD": AppState.PENDING, "SUSPENDED": AppState.PENDING, "STOPPED": AppState.PENDING,
    # running or finishing
    "RUNNING": AppState.RUNNING, "COMPLETING": AppState.RUNNING, "SIGNALING": AppState.RUNNING,
    "STAGE_OUT": AppState.RUNNING, "UPDATE_DB": AppState.RUNNING, "POWER_UP_NODE": AppState.PENDING,
    # ended
    "COMPLETED": AppState.SUCCEEDED,
    "CANCELLED": AppState.CANCELLED,
    "FAILED": AppState.FAILED, "BOOT_FAIL": AppState.FAILED, "DEADLINE": AppState.FAILED,
    "NODE_FAIL": AppState.FAILED, "OUT_OF_MEMORY": AppState.FAILED, "PREEMPTED": AppState.FAILED,
    "REVOKED": AppState.FAILED, "SPECIAL_EXIT": AppState.FAILED, "TIMEOUT": AppState.FAILED,
}
"""Slurm job states (``squeue``/``scontrol``/``sacct`` spell them alike) as torchx app states."""

REGISTRY_ENV = "SHARDREC_SLURM_JOBS"
"""Overrides the file that maps job ids to their log folders (default ~/.cache/shardrec/slurm-jobs.tsv)."""

LOG_DIR = "slurm"
"""The run folder's subfolder of a Slurm job's logs."""


def app_state(state: str) -> AppState:
    """One Slurm state (``CANCELLED by 0`` and ``RUNNING+`` too) as a torchx state."""
    word = state.strip().split(" ", 1)[0].rstrip("+")
    return STATES.get(word, AppState.UNKNOWN)


@dataclass(frozen=True)
class Component:
    """One component (node, torchx replica) of a job, as Slurm reports it."""

    offset: int
    """Its index in the heterogeneous job (0 for a job of one component)."""
    name: str
    """Its job name, ``<role>-<replica>``."""
    state: str
    """Slurm's state word, e.g. RUNNING, CANCELLED."""
    exit_code: str = "0:0"
    """``code:signal``."""
    reason: str = ""
    """Why it waits or ended (scontrol's Reason), when Slurm says."""
    node: str = ""
    """The node it runs on."""
    stdout: str = ""
    """Where the batch script's output goes (scontrol's StdOut)."""


def combined_state(components: list[Component]) -> AppState:
    """The job's state from its components': a failure anywhere fails it, then a cancel, then
    anything still running or waiting; it succeeds when every component completed."""
    states = [app_state(c.state) for c in components]
    if not states:
        return AppState.UNKNOWN
    for decisive in (AppState.FAILED, AppState.CANCELLED, AppState.RUNNING, AppState.PENDING, AppState.UNKNOWN):
        if decisive in states:
            return decisive
    return AppState.SUCCEEDED


_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w/:]*)=")


def parse_scontrol(text: str, job_id: str) -> list[Component]:
    """``scontrol -o show job ID`` (a line per component, ``Key=Value`` fields) -> the components of ``job_id``."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        marks = list(_KEY.finditer(line))
        fields = {m.group(1): line[m.end():marks[i + 1].start() if i + 1 < len(marks) else len(line)].strip()
                  for i, m in enumerate(marks)}
        if job_id not in (fields.get("HetJobId"), fields.get("JobId")):
            continue
        offset = fields.get("HetJobOffset")
        out.append(Component(
            offset=int(offset) if offset and offset.isdigit() else 0, name=fields.get("JobName", ""),
            state=fields.get("JobState", ""), exit_code=fields.get("ExitCode", "0:0"),
            reason="" if fields.get("Reason") in (None, "None", "(null)") else fields["Reason"],
            node=fields.get("NodeList", ""), stdout=fields.get("StdOut", ""),
        ))
    return sorted(out, key=lambda c: c.offset)


SACCT_FIELDS = "JobID,JobName,State,ExitCode,NodeList"


def parse_sacct(text: str, job_id: str) -> list[Component]:
    """``sacct --parsable2 --noheader -o SACCT_FIELDS -j ID`` -> the components of ``job_id``
    (its steps, ``ID+K.batch`` and ``ID+K.0``, left out)."""
    out = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 4:
            continue
        jid, name, state, code = parts[:4]
        base, _, offset = jid.partition("+")
        if base != job_id or "." in jid:
            continue
        out.append(Component(offset=int(offset) if offset.isdigit() else 0, name=name, state=state, exit_code=code,
                             node=parts[4] if len(parts) > 4 else ""))
    return sorted(out, key=lambda c: c.offset)


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str] | None:
    """Runs a Slurm command; None where it is not installed."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"'{' '.join(cmd)}' did not answer in 60 s: is slurmctld up? (scontrol ping)") from None


def components(job_id: str) -> list[Component]:
    """The job's components, from the controller (scontrol), else from accounting (sacct);
    empty when neither knows the job."""
    live = _run(["scontrol", "-o", "show", "job", job_id])
    if live is None:
        raise LaunchError("Slurm's commands are not on PATH (scontrol): run shardrec where sbatch and scontrol work")
    if live.returncode == 0:
        found = parse_scontrol(live.stdout, job_id)
        if found:
            return found
    acct = _run(["sacct", "--parsable2", "--noheader", "-o", SACCT_FIELDS, "-j", job_id])
    if acct is not None and acct.returncode == 0:  # fails where accounting storage is off
        return parse_sacct(acct.stdout, job_id)
    return []


# ---------------------------------------------------------------- where a job's logs are


def registry() -> Path:
    """The file mapping job ids to log folders (a job's logs stay findable after Slurm forgets it)."""
    given = os.environ.get(REGISTRY_ENV)
    return Path(given) if given else Path.home() / ".cache" / "shardrec" / "slurm-jobs.tsv"


def _remember(job_id: str, log_dir: Path) -> None:
    path = registry()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(f"{job_id}\t{log_dir}\n")
    except OSError:  # a read-only home: the controller still says where the logs are while it knows the job
        pass


def remembered_log_dir(job_id: str) -> Path | None:
    """The log folder this machine submitted ``job_id`` with (the newest, as a restarted cluster reuses ids)."""
    try:
        lines = registry().read_text().splitlines()
    except OSError:
        return None
    found = [d for j, _, d in (line.partition("\t") for line in lines) if j == job_id and d]
    return Path(found[-1]) if found else None


def log_dir(job_id: str, parts: list[Component] | None = None) -> Path | None:
    """The folder of the job's logs: where its batch output goes (scontrol), else where this
    machine submitted it to."""
    for c in parts if parts is not None else components(job_id):
        if c.stdout and c.offset == 0:
            return Path(c.stdout).parent
    return remembered_log_dir(job_id)


def node_log(folder: Path, job_id: str, name: str) -> Path:
    """The log of one node (component ``name``, e.g. trainer-1): its ranks' stdout and stderr."""
    return folder / f"slurm-{job_id}-{name}.log"


_PREFIX = re.compile(r"^\[[\w-]*\d+\]:")  # torchrun's --tee prefix, [trainer0]:
_ERROR = re.compile(r"^(?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception|Interrupt)\b(?::|$)")


def first_error(lines: Iterable[str]) -> str | None:
    """The error line of a node's log: shardrec's one-line error if a rank printed one, else the
    first exception line of a traceback (its last line, the exception itself), else None."""
    exceptions = []
    in_traceback = False
    for raw in lines:
        line = _PREFIX.sub("", raw.rstrip("\n")).strip()
        if line.startswith("shardrec: error:"):
            return line
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and _ERROR.match(line):
            exceptions.append(line)
            in_traceback = False
    return exceptions[0] if exceptions else None


def failure_line(job_id: str, parts: list[Component], folder: Path | None) -> str:
    """Which node failed and its first error line, e.g. ``trainer-1 FAILED (exit 1:0): shardrec: error: ...``."""
    failed = [c for c in parts if app_state(c.state) == AppState.FAILED] or parts
    blamed, error = failed[0], None
    if folder is not None:
        for c in sorted(parts, key=lambda c: (c not in failed, c.offset)):
            path = node_log(folder, job_id, c.name)
            if path.is_file():
                with path.open(errors="replace") as f:
                    error = first_error(f)
                if error:
                    blamed = c
                    break
    line = f"{blamed.name} {blamed.state} (exit {blamed.exit_code})"
    if blamed.reason:
        line += f", {blamed.reason}"
    if error:
        line += f": {error}"
    elif folder is not None:
        line += f"; logs in {folder}"
    return line


# ---------------------------------------------------------------- the scheduler


class Scheduler(SlurmScheduler):
    """torchx's SlurmScheduler with states from scontrol or sacct, logs in the run folder, and the
    options ``log_dir``, ``account`` and ``qos``."""

    def _run_opts(self) -> runopts:
        base = super()._run_opts()
        opts = runopts()
        for name, opt in base:
            if name != "job_dir":  # a copy of the workspace to run in: shardrec's ranks run this checkout
                opts.add(name, type_=opt.opt_type, default=opt.default, help=opt.help, required=opt.is_required)
        opts.add("account", type_=str, default=None, help="The account to charge the job to (sbatch --account).")
        opts.add("qos", type_=str, default=None, help="The quality of service of the job (sbatch --qos).")
        opts.add("log_dir", type_=str, default=None,
                 help="The folder of the job's logs and batch script; shardrec submit uses the run folder's slurm/.")
        return opts

    def _submit_dryrun(self, app: AppDef, cfg: Any) -> AppDryRunInfo[SlurmBatchRequest]:
        info = super()._submit_dryrun(app, {k: v for k, v in cfg.items() if k not in ("account", "qos", "log_dir")})
        req = info.request
        folder = Path(cfg.get("log_dir") or Path.cwd() / LOG_DIR).expanduser().absolute()
        for name, replica in req.replicas.items():
            # stdout and stderr of a node in one file, appended to by each requeue of the job.
            replica.srun_opts.pop("error", None)
            replica.srun_opts["output"] = str(node_log(folder, macros.app_id, name))
            replica.srun_opts["open-mode"] = "append"
        req.cmd += [f"--{k}={cfg[k]}" for k in ("account", "qos") if cfg.get(k)]
        req.cmd += [f"--output={folder}/slurm-%j.out", "--open-mode=append"]
        req.job_dir = str(folder)
        return AppDryRunInfo(req, repr)

    def schedule(self, dryrun_info: AppDryRunInfo[SlurmBatchRequest]) -> str:
        req = dryrun_info.request
        folder = Path(req.job_dir) if req.job_dir else Path(tempfile.mkdtemp())
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / f"sbatch-{time.strftime('%Y%m%d-%H%M%S')}.sh"
        req.cmd.append(str(script))
        script.write_text(req.materialize())
        done = _run(req.cmd)
        if done is None:
            raise LaunchError("sbatch is not on PATH: submit from a machine where Slurm's commands work")
        if done.returncode != 0:
            raise LaunchError(f"sbatch refused the job: {done.stderr.strip() or done.stdout.strip()} "
                              f"(the script: {script}; the command: {shlex.join(req.cmd)})")
        job_id = done.stdout.strip().split(";")[0]
        _remember(job_id, folder)
        return job_id

    def _cancel_existing(self, app_id: str) -> None:
        done = _run(["scancel", app_id])
        if done is None:
            raise LaunchError("scancel is not on PATH: cancel from a machine where Slurm's commands work")
        if done.returncode != 0:
            raise LaunchError(f"scancel {app_id} failed: {done.stderr.strip() or done.stdout.strip()}")

    def describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        parts = components(app_id)
        if not parts:
            return None
        state = combined_state(parts)
        roles: dict[str, Role] = {}
        statuses: dict[str, RoleStatus] = {}
        for c in parts:
            role, _, replica = c.name.rpartition("-")
            role, replica = (role, int(replica)) if replica.isdigit() else (c.name, c.offset)
            roles.setdefault(role, Role(name=role, num_replicas=0, image=""))
            roles[role].num_replicas += 1
            statuses.setdefault(role, RoleStatus(role, []))
            statuses[role].replicas.append(ReplicaStatus(id=replica, role=role, state=app_state(c.state), hostname=c.node))
        if state == AppState.FAILED:
            msg = failure_line(app_id, parts, log_dir(app_id, parts))
        elif state == AppState.PENDING:
            msg = " ".join(sorted({f"{c.state}" + (f" ({c.reason})" if c.reason else "") for c in parts}))
        else:
            msg = " ".join(sorted({c.state for c in parts}))
        return DescribeAppResponse(app_id=app_id, roles=list(roles.values()), roles_statuses=list(statuses.values()),
                                   state=state, msg=msg)

    def log_iter(self, app_id: str, role_name: str, k: int = 0, regex: Optional[str] = None,
                 since: Optional[datetime] = None, until: Optional[datetime] = None, should_tail: bool = False,
                 streams: Optional[Stream] = None) -> Iterable[str]:
        folder = log_dir(app_id)
        if folder is None:
            raise LaunchError(f"no log folder known for Slurm job {app_id}: it was not submitted from this machine "
                              "by shardrec, and the controller no longer knows it")
        lines: Iterator[str] = split_lines_iterator(_follow(app_id, node_log(folder, app_id, f"{role_name}-{k}"), should_tail))
        return filter_regex(regex, lines) if regex else lines


def _follow(app_id: str, path: Path, tail: bool, poll_s: float = 0.5) -> Iterator[str]:
    """The lines of ``path``; with ``tail``, waits for it and for more until the job ends."""

    def ended() -> bool:  # the state alone: describe would also read the logs of a failed job on every poll
        parts = components(app_id)
        return not parts or is_terminal(combined_state(parts))

    while not path.is_file():
        if not tail or ended():
            if path.is_file():
                break
            raise RuntimeError(f"Slurm job {app_id} wrote no log {path}")
        time.sleep(poll_s)
    with path.open(errors="replace", newline="\n") as f:
        last_check = 0.0
        finished = not tail
        while True:
            chunk = f.read(64000)
            if chunk:
                yield chunk
                continue
            if finished:
                return
            if time.monotonic() - last_check > 2:
                last_check = time.monotonic()
                finished = ended()  # one more read after the end: the lines written last
                continue
            time.sleep(poll_s)


def create_scheduler(session_name: str, **kwargs: Any) -> Scheduler:
    """torchx's factory signature."""
    return Scheduler(session_name=session_name)
