"""Cluster jobs through torchx: submit a job to local_cwd, local_docker, slurm or kubernetes, then
follow it (status, logs, cancel).

torchx is the engine and the job is its AppDef (shardrec/launch/components.py); this module is the
glue: it checks the job and the launch against what the scheduler can do before anything is
submitted, writes the resolved job into a run folder the ranks can read, and passes them that
folder so that a restarted job resumes from its latest checkpoint (``--resume auto``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import yaml
from torchx import specs
from torchx.runner import Runner
from torchx.schedulers import get_scheduler_factories
from torchx.specs import AppDef, AppState, AppStatus, BindMount, CfgVal, VolumeMount

from shardrec.data.prepare import resolve_data
from shardrec.errors import ConfigError, LaunchError, ShardrecError
from shardrec.job import JobConfig, dump_job, load_job
from shardrec.launch import components, slurm
from shardrec.launch.preflight import Launch, check_job
from shardrec.sharding.planner import resolve_compute_device
from shardrec.output import write_atomic
from shardrec.train import run_dir as run_dirs


@dataclass(frozen=True)
class SchedulerTraits:
    """What shardrec must know of a torchx scheduler to check a launch before submitting it."""

    in_process: bool
    """torchx keeps the job in the submitting process (its ranks are that process's children)."""
    host_files: bool
    """The ranks see this machine's files at the same paths (same host, or a shared file system)."""
    mounts: bool
    """The scheduler can mount volumes into the job."""
    limits: bool
    """The scheduler can reserve or cap CPUs and memory."""
    image: bool
    """The job runs in a container image, which must have shardrec installed."""


SchedulerName = Literal["local_cwd", "local_docker", "slurm", "kubernetes"]
SCHEDULERS: dict[str, SchedulerTraits] = {
    "local_cwd": SchedulerTraits(in_process=True, host_files=True, mounts=False, limits=False, image=False),
    "local_docker": SchedulerTraits(in_process=False, host_files=False, mounts=True, limits=True, image=True),
    "slurm": SchedulerTraits(in_process=False, host_files=True, mounts=False, limits=True, image=False),
    "kubernetes": SchedulerTraits(in_process=False, host_files=False, mounts=True, limits=True, image=True),
}


@dataclass(kw_only=True)
class LaunchConfig:
    """Where and on how many ranks a job runs (``shardrec submit`` options)."""

    scheduler: SchedulerName = "local_cwd"
    """The torchx scheduler (checked: the CLI passes what the user typed)."""
    j: str = "1x2"
    """NODESxPROCS: nodes and ranks per node."""
    cpu: int | None = None
    """CPUs per node; unset: the component's default (where the scheduler reserves CPUs)."""
    gpu: int = 0
    """GPUs per node; each rank takes one."""
    mem_mb: int | None = None
    """Memory per node in MB; unset: the component's default."""
    image: str | None = None
    """Container image with shardrec installed (local_docker, kubernetes)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment of every rank."""
    mounts: list[str] = field(default_factory=list)
    """Mounts, each ``type=bind,src=HOST,dst=CONTAINER[,readonly]`` or ``type=volume,src=NAME,dst=PATH``."""
    max_restarts: int = 0
    """Times torchrun restarts the ranks after one fails (each restart resumes)."""
    rdzv_port: int = 29500
    """Port of the rendezvous store on the first node (multi-node jobs)."""
    scheduler_args: list[str] = field(default_factory=list)
    """Scheduler options, each ``key=value`` (torchx's ``-cfg``), e.g. ``queue=default``."""

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler '{self.scheduler}'; choose one of {', '.join(SCHEDULERS)}")
        try:
            components.parse_nodes(self.j)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if min(self.gpu, self.max_restarts, self.cpu or 0, self.mem_mb or 0) < 0:
            raise ConfigError("--gpu, --cpu, --mem-mb and --max-restarts must be >= 0")
        self._check_traits(SCHEDULERS[self.scheduler])

    def _check_traits(self, traits: SchedulerTraits) -> None:
        name = self.scheduler
        if not traits.limits and (self.cpu is not None or self.mem_mb is not None):
            raise ConfigError(f"{name} cannot reserve or cap CPUs or memory: drop --cpu/--mem-mb, or use local_docker")
        if self.mounts and not traits.mounts:
            raise ConfigError(f"{name} cannot mount volumes (its ranks see the host's or the cluster's shared files): drop --mount")
        if traits.image and not self.image:
            raise ConfigError(f"{name} runs a container: give --image, an image with shardrec installed (docs/launch.md)")
        if self.image and not traits.image:
            raise ConfigError(f"{name} runs this machine's Python, not an image: drop --image")

    @property
    def nodes(self) -> int:
        """Nodes (torchx replicas)."""
        return components.parse_nodes(self.j)[0]


def parse_env(items: list[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> ``{KEY: VALUE}``."""
    bad = [i for i in items if "=" not in i or i.startswith("=")]
    if bad:
        raise ConfigError(f"--env takes KEY=VALUE, got {bad[0]!r}")
    return dict(i.split("=", 1) for i in items)


@dataclass(frozen=True)
class Submission:
    """A job ready for torchx: its AppDef, the scheduler options and the run folder (this machine's path)."""

    app: AppDef
    scheduler: SchedulerName
    cfg: dict[str, CfgVal]
    run_dir: Path


_RUNNER: Runner | None = None


def runner() -> Runner:
    """This process's torchx runner; local_cwd jobs live as long as it does."""
    global _RUNNER
    if _RUNNER is None:
        # torchx's schedulers, with Slurm's replaced by one that works without accounting (launch/slurm.py).
        _RUNNER = Runner("torchx", {**get_scheduler_factories(), "slurm": slurm.create_scheduler})
    return _RUNNER


def prepare(config: Path | None, overrides: list[str], launch: LaunchConfig, *, dryrun: bool = False) -> Submission:
    """Checks the job and the launch and builds the AppDef; unless ``dryrun``, creates the run folder
    and writes the job the ranks read into it. Raises a ShardrecError before anything is submitted."""
    traits = SCHEDULERS[launch.scheduler]
    job = load_job(config, overrides)
    if traits.host_files:  # the data are where the ranks read them: check them (or make them) here
        job = dataclasses.replace(job, data=resolve_data(job.data, job.features))
    _check_devices(job, launch)
    _preflight(job, launch, traits)
    run_dir = run_dirs.new_run(job).resolve()
    target = _Target(launch, traits)
    target_run = target.path(run_dir, what="the run folder (config, checkpoints, metrics)")
    target_job = target.job(job)
    cfg = _scheduler_cfg(launch, run_dir)
    if not dryrun:
        run_dir.mkdir(parents=True)
        write_atomic(run_dir / "config.yaml", dump_job(target_job))
    app = _appdef(launch, traits, run_dir=target_run, name=job.run.name or job.model_name)
    return Submission(app=app, scheduler=launch.scheduler, cfg=cfg, run_dir=run_dir)


def _appdef(launch: LaunchConfig, traits: SchedulerTraits, *, run_dir: Path, name: str) -> AppDef:
    """The component's AppDef for ``launch``, with the run folder as the ranks see it."""
    given = {"image": launch.image, "cpu": launch.cpu, "memMB": launch.mem_mb}  # unset: the component's defaults
    env = launch.env
    if launch.scheduler == "local_cwd":
        # Every node's ranks share this machine: one thread each, as `shardrec train` runs them
        # (torchrun sets it only for agents of several ranks; -j 2x1 ran 6x slower here without it).
        env = {"OMP_NUM_THREADS": "1", **env}
    return components.train(
        config=str(run_dir / "config.yaml"), j=launch.j, run_dir=str(run_dir), resume="auto", gpu=launch.gpu, env=env,
        mounts=_mount_args(launch.mounts), max_restarts=launch.max_restarts, rdzv_port=launch.rdzv_port,
        python=sys.executable if traits.host_files else "python", name=name,
        **{k: v for k, v in given.items() if v is not None},
    )


def _preflight(job: JobConfig, launch: LaunchConfig, traits: SchedulerTraits) -> None:
    """The whole job checked here, before submitting: the model against the schema, a plan file
    against the world size (where its path is on this machine), the memory bound."""
    nodes, nproc = components.parse_nodes(launch.j)
    if not traits.host_files:  # paths name the ranks' file system, not this one
        job = dataclasses.replace(job, sharding=dataclasses.replace(job.sharding, plan=None),
                                  checkpoint=dataclasses.replace(job.checkpoint, warm_start=None))
    device = "cuda" if launch.gpu else resolve_compute_device(job.sharding)
    check_job(job, Launch(world_size=nodes * nproc, local_world_size=nproc, compute_device=device))


def _check_devices(job: JobConfig, launch: LaunchConfig) -> None:
    nproc = components.parse_nodes(launch.j)[1]
    if launch.gpu and nproc > launch.gpu:
        raise ConfigError(f"-j {launch.j} puts {nproc} ranks on each node but --gpu {launch.gpu}: each rank needs a GPU of its own")
    if job.sharding.compute_device == "cuda" and not launch.gpu:
        raise ConfigError("the job computes on cuda (sharding.compute_device) but the launch asks for no GPU: give --gpu")
    if launch.scheduler == "local_cwd" and launch.gpu * launch.nodes > torch.cuda.device_count():
        raise ConfigError(
            f"-j {launch.j} --gpu {launch.gpu} needs {launch.gpu * launch.nodes} GPUs; this machine has {torch.cuda.device_count()}"
        )


def _mount_args(mounts: list[str]) -> list[str]:
    """``--mount`` values as the component's flat ``key=value`` list."""
    return [part for m in mounts for part in m.split(",") if part]


class _Target:
    """Paths as the ranks see them: the same on host-file schedulers, through bind mounts in containers."""

    def __init__(self, launch: LaunchConfig, traits: SchedulerTraits) -> None:
        self.host_files = traits.host_files
        try:
            mounts = specs.parse_mounts(_mount_args(launch.mounts)) if launch.mounts else []
        except (ValueError, KeyError) as e:
            raise ConfigError(f"bad --mount: {e}; write type=bind,src=HOST,dst=CONTAINER[,readonly]") from None
        self.binds = [m for m in mounts if isinstance(m, BindMount)]
        self.volumes = [Path(m.dst_path) for m in mounts if isinstance(m, VolumeMount)]

    def path(self, path: Path, *, what: str) -> Path:
        """``path`` (on this machine) as the ranks see it; a ConfigError when they cannot."""
        path = path.expanduser().resolve()
        if self.host_files:
            return path
        for m in self.binds:
            src = Path(m.src_path).expanduser().resolve()
            if path.is_relative_to(src):
                return Path(m.dst_path) / path.relative_to(src)
        # A shared volume (NFS, a PVC) that this machine mounts at the same path as the containers.
        if any(path.is_relative_to(dst) for dst in self.volumes):
            return path
        raise ConfigError(
            f"{what} '{path}' would be missing in the container: it sees only its image and its mounts; add "
            "--mount type=bind,src=HOST_DIR,dst=DIR for a folder holding it, or keep it on a shared volume that "
            "this machine mounts at the path the containers do (--mount type=volume,src=CLAIM,dst=THAT_PATH)"
        )

    def job(self, job: JobConfig) -> JobConfig:
        """``job`` with its local file paths as the ranks see them (URLs and unset paths stay)."""
        if self.host_files:
            return job
        data = dataclasses.replace(job.data, **self._paths(job.data, "data", ["train_path", "eval_path"]))
        sharding = dataclasses.replace(job.sharding, **self._paths(job.sharding, "sharding", ["plan"]))
        ckpt = job.checkpoint
        if ckpt.warm_start is not None:
            warm = dataclasses.replace(ckpt.warm_start, **self._paths(ckpt.warm_start, "checkpoint.warm_start", ["path"]))
            ckpt = dataclasses.replace(ckpt, warm_start=warm)
        return dataclasses.replace(job, data=data, sharding=sharding, checkpoint=ckpt)

    def _paths(self, section: Any, name: str, keys: list[str]) -> dict[str, str]:
        out = {}
        for key in keys:
            value = getattr(section, key)
            if value is not None and "://" not in value:
                out[key] = str(self.path(Path(value), what=f"{name}.{key}"))
        return out


def _scheduler_cfg(launch: LaunchConfig, run_dir: Path) -> dict[str, CfgVal]:
    """The scheduler options, checked against the scheduler's own list; local_cwd logs into the run folder."""
    opts = runner().scheduler_run_opts(launch.scheduler)
    known = dict(opts)
    bad = [a for a in launch.scheduler_args if "=" not in a]
    unknown = [a.split("=", 1)[0] for a in launch.scheduler_args if "=" in a and a.split("=", 1)[0] not in known]
    if bad or unknown:
        raise ConfigError(
            f"unknown {launch.scheduler} option {(unknown or bad)[0]!r} (give --cfg KEY=VALUE); its options:\n{opts}"
        )
    cfg = opts.cfg_from_str(",".join(launch.scheduler_args))
    if launch.scheduler == "local_cwd":
        cfg.setdefault("log_dir", str(run_dir / "torchx"))
    elif launch.scheduler == "slurm":
        cfg.setdefault("log_dir", str(run_dir / slurm.LOG_DIR))
    try:
        return opts.resolve(cfg)
    except specs.InvalidRunConfigException as e:
        raise ConfigError(f"{launch.scheduler}: {e}; its options:\n{opts}") from None


def dryrun_text(sub: Submission) -> str:
    """The AppDef and the scheduler's request (sbatch script, Kubernetes manifest, ...), not submitted."""
    info = runner().dryrun(sub.app, sub.scheduler, cfg=sub.cfg)
    appdef = json.loads(json.dumps(dataclasses.asdict(sub.app), default=str))
    return f"# AppDef\n{yaml.safe_dump(appdef, sort_keys=False)}---\n# {sub.scheduler} request\n{info}\n"


def submit(sub: Submission) -> str:
    """Submits the job; returns its torchx app handle (``scheduler://session/app_id``)."""
    try:
        return runner().run(sub.app, sub.scheduler, cfg=sub.cfg)
    except ShardrecError:
        raise
    except Exception as e:  # noqa: BLE001 - schedulers fail in their own ways (no sbatch, no kube config ...)
        raise LaunchError(f"submitting to {sub.scheduler} failed: {type(e).__name__}: {e}") from e


def status(handle: str) -> AppStatus:
    """The job's torchx status; a LaunchError when the scheduler does not know it."""
    try:
        found = runner().status(handle)
    except (specs.MalformedAppHandleException, KeyError) as e:
        raise LaunchError(f"bad app handle {handle!r}: {e}; handles look like slurm://shardrec/1234") from None
    if found is None:
        raise LaunchError(_unknown(handle))
    return found


def _unknown(handle: str) -> str:
    message = f"{handle}: the scheduler does not know this job"
    if handle.startswith("local_cwd://"):
        message += (" (local_cwd jobs are known only to the process that submitted them, and end with it: "
                    "follow them in that `shardrec submit`; their logs stay in the run folder's torchx/)")
    elif handle.startswith("slurm://"):
        job_id = handle.rsplit("/", 1)[-1]
        folder = slurm.remembered_log_dir(job_id)
        message += (" (without accounting, Slurm forgets a job MinJobAge seconds after it ends, 300 by default; "
                    "with it, sacct finds it" + (f"; its logs are in {folder}" if folder else "") + ")")
    return message


def replicas(handle: str) -> int:
    """Nodes of the job (1 when the scheduler cannot say)."""
    status(handle)
    app = runner().describe(handle)
    return app.roles[0].num_replicas if app is not None and app.roles else 1


def logs(handle: str, *, replica: int = 0, tail: bool = False) -> Iterator[str]:
    """Log lines of one node of the job (stdout and stderr); with ``tail``, follows it until it ends."""
    status(handle)
    return iter(runner().log_lines(handle, components.ROLE, replica, should_tail=tail))


def cancel(handle: str) -> None:
    """Asks the scheduler to stop the job."""
    status(handle)
    runner().cancel(handle)


def follow(handle: str, *, nodes: int, poll_s: float = 1.0) -> AppStatus:
    """Prints every node's log lines as they come (prefixed ``trainer/N`` when several) until the
    job ends; returns its final status."""
    threads = [threading.Thread(target=_print_lines, args=(handle, k, nodes > 1), daemon=True) for k in range(nodes)]
    for t in threads:
        t.start()
    final = runner().wait(handle, wait_interval=poll_s)
    for t in threads:
        t.join(timeout=10)
    if final is None:
        raise LaunchError(_unknown(handle))
    return final


def _print_lines(handle: str, replica: int, prefix: bool) -> None:
    try:
        for line in runner().log_lines(handle, components.ROLE, replica, should_tail=True):
            print(f"{components.ROLE}/{replica} {line}" if prefix else line, end="", flush=True)
    except RuntimeError as e:  # the node ended without writing a log
        print(f"{components.ROLE}/{replica}: no log: {e}", file=sys.stderr)


def format_status(handle: str, st: AppStatus) -> str:
    """The status in a few lines, with the root cause of a failure (torchelastic's error file)."""
    lines = [f"{handle}: {st.state.name}"]
    if st.ui_url:
        lines.append(f"  ui: {st.ui_url}")
    if st.msg and st.msg != specs.NONE:
        lines.append(f"  {st.msg}")
    cause = root_cause(st.structured_error_msg)
    if cause:
        lines.append("  root cause: " + cause.replace("\n", "\n    "))
    return "\n".join(lines)


def root_cause(structured: str) -> str | None:
    """The message of torchelastic's error file as torchx reports it (None when there is none)."""
    if not structured or structured == specs.NONE:
        return None
    try:
        data = json.loads(structured)
    except json.JSONDecodeError:
        return structured
    message = data.get("message", data)
    if isinstance(message, dict):
        text = str(message.get("message", ""))
        code = message.get("errorCode")
        return f"{text} (exit code {code})" if code else text
    return str(message)


def succeeded(st: AppStatus) -> bool:
    """True when the job finished successfully."""
    return st.state == AppState.SUCCEEDED
