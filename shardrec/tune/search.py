"""``shardrec tune``: a hyperparameter search over a job on Ray Tune.

Each trial is a real ``shardrec train`` run of the job with the trial's values (its own job file,
run folder and ranks; Ray reserves ``--nproc`` CPUs for it). The trial follows the run's
``metrics.jsonl`` and reports every evaluation to Tune; a trial a scheduler stops gets the
Ctrl-C of ``shardrec train`` (its ranks end, the run is marked interrupted). Ray is embedded by
default, or ``--address`` names a running cluster.

The sweep folder holds ``space.yaml`` (the space searched), ``ray/`` (Tune's experiment state,
which ``--resume`` continues), ``trials/<id>/`` (job.yaml, train.log, the run folder),
``results.csv`` and ``results.json`` (trial, parameters, metric, steps, status) and ``best.yaml``,
the best trial's resolved job, which ``shardrec train best.yaml`` runs as it is.
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from shardrec.config import build, load_yaml
from shardrec.errors import ConfigError, ShardrecError
from shardrec.job import JobConfig, dump_job
from shardrec.models import registry
from shardrec.output import text_table, write_atomic
from shardrec.tune.space import Dimension, check_against, read_space, with_params

Scheduler = Literal["fifo", "asha", "median"]
Search = Literal["random", "optuna"]
STOP_S = 60.0
"""Seconds a stopped trial's ``shardrec train`` gets to end its ranks after Ctrl-C before SIGKILL."""


class TuneError(ShardrecError):
    """A sweep that cannot start or continue."""


@dataclass(frozen=True)
class Sweep:
    """What a sweep needs, checked before Ray starts."""

    job_path: Path
    base: dict[str, Any]
    dims: list[Dimension]
    out: Path
    metric: str
    mode: Literal["min", "max"]
    scheduler: Scheduler
    search: Search
    samples: int
    nproc: int
    evals: int
    """Evaluations a full trial reports (the ASHA budget)."""
    cwd: Path
    omp_threads: str | None = None
    """The driver's OMP_NUM_THREADS (None: unset), which trials get instead of the one Ray sets."""


def default_metric(job: JobConfig) -> tuple[str, Literal["min", "max"]]:
    """The headline metric of the job's evaluations and its direction."""
    if registry.get(job.model_name).retrieval:
        return f"ndcg@{job.train.retrieval.ks[0]}", "max"
    first = job.features.tasks[0].type
    return {"binary": ("auc", "max"), "regression": ("rmse", "min"), "multiclass": ("accuracy", "max")}[first]


def prepare(job_path: Path, space_path: Path, *, out: Path, scheduler: Scheduler, search: Search, samples: int, nproc: int,
            metric: str | None, mode: str | None, overrides: list[str]) -> Sweep:
    """Reads and checks the job and the space: every problem is a ConfigError naming the key."""
    from shardrec.config import apply_overrides

    base = apply_overrides(load_yaml(job_path), overrides)
    job = build(JobConfig, base, key="")
    dims = read_space(space_path)
    check_against(dims, base, space=space_path)
    if samples <= 0:
        raise ConfigError(f"--samples must be > 0, got {samples}")
    if search == "optuna" and any(d.kind == "grid" for d in dims):
        grids = ", ".join(d.key for d in dims if d.kind == "grid")
        raise ConfigError(f"search space file '{space_path}': optuna samples its values and cannot take 'grid' ({grids}); "
                          "use 'choice' there, or --search random")
    if mode is not None and mode not in ("min", "max"):
        raise ConfigError(f"--mode must be min or max, got '{mode}'")
    name, direction = default_metric(job)
    if metric is not None and mode is None:
        raise ConfigError(f"--metric {metric} needs --mode min or max")
    if job.data.eval_path is None and job.data.train_path is not None:
        raise ConfigError("the job has no evaluation data (data.eval_path): a trial has nothing to report to Tune; set it")
    steps = job.train.steps or 0
    evals = max(1, steps // job.train.eval_interval) if job.train.eval_interval else 1
    if scheduler != "fifo" and job.train.eval_interval == 0:
        raise ConfigError(f"--scheduler {scheduler} stops trials between evaluations, and train.eval_interval is 0 (one "
                          "evaluation, at the end); set train.eval_interval, e.g. --train.eval_interval="
                          f"{max(1, steps // 8) if steps else 100}")
    return Sweep(job_path=job_path, base=base, dims=dims, out=out.resolve(), metric=metric or name, mode=mode or direction,  # type: ignore[arg-type]
                 scheduler=scheduler, search=search, samples=samples, nproc=nproc, evals=evals, cwd=Path.cwd(),
                 omp_threads=os.environ.get("OMP_NUM_THREADS"))


# ------------------------------------------------------------------------------ the trial


def _param_space(dims: list[Dimension]) -> dict[str, Any]:
    from ray import tune

    make = {
        "loguniform": lambda a: tune.loguniform(*a),
        "uniform": lambda a: tune.uniform(*a),
        "randint": lambda a: tune.randint(a[0], a[1] + 1),  # Tune's upper end is excluded, ours included
        "choice": lambda a: tune.choice(list(a)),
        "grid": lambda a: tune.grid_search(list(a)),
    }
    return {d.key: make[d.kind](d.args) for d in dims}


def _die_with_parent() -> None:
    """In the child: SIGINT acts again (Ray's workers ignore it, and an ignored signal stays ignored
    across exec), and comes when the trial's thread or process dies, so a trial Ray kills still
    ends its ranks (``shardrec train`` stops every rank on SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # Ray's threads block them
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_trial(config: dict[str, Any], *, sweep: Sweep) -> None:
    """One trial: ``shardrec train`` of the job with ``config``'s values, every evaluation reported."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    folder = sweep.out / "trials" / trial_id
    folder.mkdir(parents=True, exist_ok=True)
    data = with_params(sweep.base, config)
    data.setdefault("run", {})["root"] = str(folder / "runs")
    job_file = folder / "job.yaml"
    write_atomic(job_file, dump_job(build(JobConfig, data, key="")))
    cmd = [sys.executable, "-m", "shardrec.cli", "train", str(job_file), "--nproc", str(sweep.nproc)]
    if any(folder.glob("runs/*/*/checkpoints/step-*")):
        cmd.append("--resume")  # a resumed sweep: this trial goes on from its last checkpoint
    log = folder / "train.log"
    with log.open("a") as out:
        # A session of its own: when Ray ends the trial's worker it kills the worker's process group,
        # which would take `shardrec train` before it stopped its ranks.
        proc = subprocess.Popen(cmd, cwd=sweep.cwd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                start_new_session=True, env=_trial_env(sweep))
    # Tune's report blocks while the driver holds back (a trial it is about to stop): a watcher of
    # its own stops the run as soon as Tune asks, whatever the reporting thread is doing.
    watcher = threading.Thread(target=_stop_when_asked, args=(proc,), daemon=True)
    watcher.start()
    outcome = "stopped"  # unless the run ends on its own below: Tune stopped the trial (report exits)
    try:
        if _follow(proc, folder):
            outcome = "completed" if proc.returncode == 0 else "failed"
    finally:
        _stop(proc)
        write_atomic(folder / "outcome.json", json.dumps({"status": outcome, "exit_code": proc.returncode}) + "\n")
    if outcome == "failed":
        raise RuntimeError(f"shardrec train exited {proc.returncode}: {_last_error(log)} (log: {log})")


def _trial_env(sweep: Sweep) -> dict[str, str]:
    """The trial's environment: the driver's, not the one Ray gives its workers. Ray sets
    OMP_NUM_THREADS to the trial's CPUs, which `shardrec train` would hand to every rank (2 ranks x 2
    threads on 2 cores: 2.6x slower in bench/tune_overhead.py); unset, each rank gets 1 as in a plain run."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)
    if sweep.omp_threads is not None:
        env["OMP_NUM_THREADS"] = sweep.omp_threads
    return env


def _stop_when_asked(proc: subprocess.Popen[bytes]) -> None:
    while proc.poll() is None:
        if _stop_requested():
            proc.send_signal(signal.SIGINT)
            return
        time.sleep(0.2)


def _stop_requested() -> bool:
    """Whether Tune has asked this trial to stop (its scheduler decided, or the sweep ends)."""
    try:
        from ray.train._internal.session import get_session
    except ImportError:
        return False
    session = get_session()
    event = getattr(session, "stop_event", None)
    return bool(event is not None and event.is_set())


def _follow(proc: subprocess.Popen[bytes], folder: Path) -> bool:
    """Reports each new evaluation of the run to Tune until it ends (True) or Tune stops the trial
    (False; a report may also exit the thread then)."""
    from ray import tune

    seen = 0
    while True:
        ended = proc.poll() is not None
        records = _eval_records(folder)
        for record in records[seen:]:
            step = record.pop("step")
            tune.report({**{k: v for k, v in record.items() if isinstance(v, (int, float))}, "step": step})
        seen = len(records)
        if ended:
            return True
        if _stop_requested():
            return False
        time.sleep(0.5)


def _eval_records(folder: Path) -> list[dict[str, Any]]:
    runs = sorted(folder.glob("runs/*/*/metrics.jsonl"))
    if not runs:
        return []
    out = []
    for line in runs[-1].read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line being written
        if record.get("kind") == "eval":
            record.pop("kind", None)
            record.pop("time", None)
            out.append(record)
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    errors = [line for line in lines if line.startswith("shardrec: error:")]
    return (errors or lines or ["no output"])[-1]


# ------------------------------------------------------------------------------ the sweep


def _scheduler(sweep: Sweep) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    if sweep.scheduler == "asha":
        # max_t past the last evaluation: ASHA stops a trial at max_t, and one that reached its last
        # evaluation should end on its own (a stop then would interrupt its final checkpoint).
        return ASHAScheduler(time_attr="training_iteration", max_t=sweep.evals + 1, grace_period=1, reduction_factor=2)
    if sweep.scheduler == "median":
        return MedianStoppingRule(time_attr="training_iteration", grace_period=1, min_samples_required=2)
    return FIFOScheduler()


def _search_alg(sweep: Sweep) -> Any:
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=0)
    return None  # Tune's random/grid generator


def run(sweep: Sweep, *, address: str | None, resume: bool, max_concurrent: int | None) -> list[dict[str, Any]]:
    """Runs (or continues) the sweep; writes the results files and best.yaml; returns the rows."""
    import ray
    from ray import tune

    experiment = sweep.out / "ray"
    if resume and not tune.Tuner.can_restore(str(experiment / "tune")):
        raise TuneError(f"--resume: '{sweep.out}' holds no sweep to continue (no {experiment / 'tune'}); start one without --resume")
    if not resume and experiment.exists():
        raise TuneError(f"'{sweep.out}' already holds a sweep; continue it with --resume, or pick another --out")
    sweep.out.mkdir(parents=True, exist_ok=True)
    write_atomic(sweep.out / "space.yaml", yaml.safe_dump({d.key: {d.kind: list(d.args)} for d in sweep.dims}, sort_keys=False))
    # Ray kills a worker's child processes when the worker exits, SIGKILL after SIGTERM: the trial's
    # `shardrec train` would die before it could stop its agent and ranks (their own session), which
    # would run on. Left alive instead, it gets SIGINT when the trial dies (PR_SET_PDEATHSIG) and
    # stops them as Ctrl-C does.
    env_vars = {var: "0" for var in ("RAY_kill_child_processes_on_worker_exit",
                                     "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper")}
    os.environ.update(env_vars)  # the embedded Ray's raylet; runtime_env reaches a cluster's workers
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": env_vars}, **({} if address else {"num_cpus": max(os.cpu_count() or 1, sweep.nproc)}))
    try:
        trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"cpu": sweep.nproc})
        if resume:
            tuner = tune.Tuner.restore(str(experiment / "tune"), trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=_param_space(sweep.dims),
                tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=_scheduler(sweep),
                                            search_alg=_search_alg(sweep), num_samples=sweep.samples,
                                            max_concurrent_trials=max_concurrent),
                run_config=tune.RunConfig(name="tune", storage_path=str(experiment.resolve()), verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    rows = _rows(grid, sweep)
    _write_results(rows, sweep)
    return rows


def _rows(grid: Any, sweep: Sweep) -> list[dict[str, Any]]:
    """One row per trial, as Tune saw it: the evaluations it was given, the best of them, and how
    the trial ended (completed: every evaluation; stopped early: the scheduler stopped it)."""
    rows = []
    for result in grid:
        trial_id = str(result.metrics.get("trial_id") or Path(result.path).name)
        frame = result.metrics_dataframe
        values = [] if frame is None or sweep.metric not in frame else [float(v) for v in frame[sweep.metric].dropna()]
        evals = int(result.metrics.get("training_iteration") or 0)
        marker = sweep.out / "trials" / trial_id / "outcome.json"
        ended = json.loads(marker.read_text())["status"] if marker.is_file() else None
        if result.error is not None or ended == "failed":
            outcome = "failed"
        else:  # a stopped trial's thread may not live to write its outcome: Tune's count of evaluations tells
            outcome = "completed" if ended == "completed" or evals >= sweep.evals else "stopped early"
        rows.append({
            "trial": trial_id,
            **{f"param:{d.key}": result.config.get(d.key) for d in sweep.dims},
            sweep.metric: (max if sweep.mode == "max" else min)(values) if values else None,
            f"last_{sweep.metric}": values[-1] if values else None,
            "evals": evals,
            "steps": int(result.metrics.get("step") or 0),
            "status": outcome,
            "error": _error_line(result.error),
            "run": str(next(iter(sorted((sweep.out / "trials" / trial_id).glob("runs/*/*"))), "")),
        })
    scored = sorted((r for r in rows if r[sweep.metric] is not None), key=lambda r: r[sweep.metric], reverse=sweep.mode == "max")
    return scored + [r for r in rows if r[sweep.metric] is None]


def _error_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    text = str(error).strip().splitlines()
    found = [line for line in text if "shardrec train exited" in line]
    return (found or text or [type(error).__name__])[-1].strip()


def _write_results(rows: list[dict[str, Any]], sweep: Sweep) -> None:
    write_atomic(sweep.out / "results.json", json.dumps({"metric": sweep.metric, "mode": sweep.mode, "trials": rows}, indent=2) + "\n")
    tmp = sweep.out / "results.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(sweep.out / "results.csv")
    best = next((r for r in rows if r[sweep.metric] is not None), None)
    if best is not None:
        data = yaml.safe_load((sweep.out / "trials" / best["trial"] / "job.yaml").read_text())
        data.setdefault("run", {})["root"] = build(JobConfig, sweep.base, key="").run.root  # runs where the job's own runs go
        write_atomic(sweep.out / "best.yaml", yaml.safe_dump(data, sort_keys=False))


def results_table(rows: list[dict[str, Any]], sweep: Sweep) -> str:
    """The results as a fixed-width table, best first."""
    params = [d.key for d in sweep.dims]
    header = ("trial", *params, sweep.metric, "evals", "steps", "status")
    lines = [(r["trial"], *(_fmt(r[f"param:{k}"]) for k in params), _fmt(r[sweep.metric]), str(r["evals"]), str(r["steps"]),
              r["status"]) for r in rows]
    return text_table(header, lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
