"""torchsnapshot against DCP on shardrec's checkpoint matrix (issue #5): restore, resume, reshard, crash.

Every case trains shardrec's own sharded DLRM (tests/helpers.tiny_job_dict: row-wise Adagrad fused
into the tables, Adam on the dense layers) on gloo ranks, saves it with one engine and restores it
into a fresh Trainer. Values are compared bit for bit as whole tensors (ShardedTensors gathered on
rank 0) against the state the saving run held when it saved; resumed losses against an uninterrupted
run. A restore that raises is ``error``; one that returns but holds other values is
``WRONG VALUES (silent)``. Engines: DCP (shardrec's Saver and checkpoint.load, the reference) and
torchsnapshot, if the running Python can import it (make one environment per version, see
docs/checkpointing.md). Usage, from the repository root:

    PYTHON bench/torchsnapshot_matrix.py [--json OUT.json] [--engines dcp torchsnapshot]
    PYTHON bench/torchsnapshot_matrix.py --merge A.json B.json    # one table of several runs
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint._nested_dict import flatten_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import tiny_job_dict  # noqa: E402 - the test suite's tiny job, not a copy of it

from shardrec.config import build  # noqa: E402
from shardrec.job import JobConfig  # noqa: E402
from shardrec.launch.spawn import _child, free_port, run_ranks  # noqa: E402
from shardrec.checkpoint.store import step_dir, table_of_key
from shardrec.checkpoint.config import WarmStartConfig
from shardrec.train.dist import init_distributed, shutdown  # noqa: E402
from shardrec.train.optim import init_optimizer_state  # noqa: E402
from shardrec.train.quiet import quiet_libraries  # noqa: E402
from shardrec.train.trainer import DataPaths, Trainer  # noqa: E402
from shardrec.checkpoint.warm_start import warm_start  # noqa: E402

SAVE_STEP, TOTAL_STEPS = 4, 8
CASE_TIMEOUT_S = 300
FORCED = {"t_C3": {"sharding_types": ["table_wise"]}}
OTHER_PLAN = {"t_C3": {"sharding_types": ["column_wise"], "min_partition": 4}}
CASES = {
    "weights": "1. weights after restore (2 ranks, same plan)",
    "sparse_optim": "2. fused optimizer state (row-wise Adagrad momentum1)",
    "dense_optim": "3. dense optimizer state (Adam)",
    "resume": f"4. losses of steps {SAVE_STEP + 1}..{TOTAL_STEPS} after resume = uninterrupted run",
    "world_1": "5a. restore onto 1 rank: weights",
    "world_3": "5b. restore onto 3 ranks: weights",
    "plan": "6. restore onto another plan (t_C3 table_wise -> column_wise): weights",
    "kill": "7. SIGKILL mid-save: partial save not restorable, previous one restores",
    "model_world_1": "8a. model alone (weights only, as a warm start) onto 1 rank: weights",
    "model_world_3": "8b. model alone onto 3 ranks: weights",
    "model_plan": "8c. model alone onto another plan: weights",
}
ELSEWHERE = {  # restores of the 2-rank save: case -> (world size, table constraints, model alone)
    "world_1": (1, FORCED, False), "world_3": (3, FORCED, False), "plan": (2, OTHER_PLAN, False),
    "model_world_1": (1, FORCED, True), "model_world_3": (3, FORCED, True), "model_plan": (2, OTHER_PLAN, True),
}
WRONG = "WRONG VALUES (silent)"


# --- engines -------------------------------------------------------------------------------------


class Dcp:
    """shardrec's own checkpoints: the Saver (written under .tmp, renamed when complete) and checkpoint.load."""

    def save(self, trainer: Trainer) -> Path:
        return Trainer.save(trainer)  # type: ignore[return-value]

    def restore(self, trainer: Trainer, path: Path) -> None:
        trainer.resume(path)

    def restore_model(self, trainer: Trainer, path: Path) -> None:
        cfg = WarmStartConfig(path=str(path), optimizer=False)
        warm_start(cfg, model=trainer.model, optimizer=trainer.optimizer, warn=False)

    def partial(self, path: Path) -> Path:
        return path.with_name(path.name + ".tmp")

    def arm_kill(self) -> None:
        from torch.distributed.checkpoint.filesystem import _FileSystemWriter

        _kill_after(_FileSystemWriter, "write_data")


class Snapshot:
    """torchsnapshot: ``Snapshot.take`` / ``Snapshot.restore`` of model, optimizer and step.

    The model and torchrec's CombinedOptimizer are Stateful as they are; the step travels in a
    StateDict. ``replicated=["**"]`` marks what is not sharded (dense layers and their Adam state,
    the same on every rank under DistributedModelParallel) as replicated, as torchsnapshot infers
    for a DDP module but cannot for DistributedModelParallel. A second snapshot holds the model
    alone (``-model``) for the weights-only cases: restoring ``model`` from the full one, 0.1.0
    also reads the optimizer's ShardedTensors and fails, having no object to read them into.
    """

    def save(self, trainer: Trainer) -> Path:
        from torchsnapshot import Snapshot as TS, StateDict

        path = step_dir(trainer.run_dir / "checkpoints", trainer.step)
        state = {"model": trainer.model, "optim": trainer.optimizer, "progress": StateDict(step=trainer.step)}
        TS.take(str(path), state, replicated=["**"])  # type: ignore[dict-item]
        TS.take(str(_model_only(path)), {"model": trainer.model}, replicated=["**"])
        return path

    def restore(self, trainer: Trainer, path: Path) -> None:
        from torchsnapshot import Snapshot as TS, StateDict

        init_optimizer_state(trainer.optimizer)  # as shardrec does before DCP loads in place
        progress = StateDict(step=-1)
        state = {"model": trainer.model, "optim": trainer.optimizer, "progress": progress}
        TS(str(path)).restore(state)  # type: ignore[arg-type]
        trainer.step = int(progress["step"])

    def restore_model(self, trainer: Trainer, path: Path) -> None:
        from torchsnapshot import Snapshot as TS

        TS(str(_model_only(path))).restore({"model": trainer.model})

    def partial(self, path: Path) -> Path:
        return path

    def arm_kill(self) -> None:
        from torchsnapshot.storage_plugins.fs import FSStoragePlugin

        _kill_after(FSStoragePlugin, "write")


ENGINES: dict[str, Callable[[], Dcp | Snapshot]] = {"dcp": Dcp, "torchsnapshot": Snapshot}


def _model_only(path: Path) -> Path:
    return path.with_name(path.name + "-model")


def _kill_after(cls: type, method: str) -> None:
    """Makes this process SIGKILL itself right after its first call of ``cls.method`` (sync or async)."""
    original = getattr(cls, method)

    def die(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        if hasattr(out, "__await__"):
            async def after() -> None:
                await out
                os.kill(os.getpid(), signal.SIGKILL)
            return after()
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(cls, method, die)


def engine_label(name: str) -> str:
    """The engine with the version that ran, e.g. ``torchsnapshot-nightly 2024.7.26``."""
    if name == "dcp":
        return f"DCP (torch {torch.__version__.split('+')[0]})"
    for dist_name in ("torchsnapshot-nightly", "torchsnapshot"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{dist_name} {importlib.metadata.version(dist_name)}"
    return "torchsnapshot (not installed)"


# --- what the ranks run --------------------------------------------------------------------------


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor of model and optimizer state, whole, on rank 0 ({} elsewhere).

    Each rank sends its local shards to rank 0, which assembles them: a collective gather per
    ShardedTensor would not do, since a rank holds optimizer state only for the tables it has shards of.
    """
    flat, _ = flatten_state_dict({"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict()})
    mine: dict[str, tuple[list[int] | None, Any]] = {}
    for key, value in flat.items():
        if isinstance(value, ShardedTensor):
            shards = [(s.metadata.shard_offsets, s.tensor.detach().clone()) for s in value.local_shards()]
            mine[key] = (list(value.size()), shards)
        elif isinstance(value, torch.Tensor):
            mine[key] = (None, value.detach().clone())
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return _assemble(parts) if parts is not None else {}


def _assemble(parts: list[dict[str, tuple[list[int] | None, Any]]]) -> dict[str, torch.Tensor]:
    """Whole tensors from every rank's shards; a plain tensor is taken from the first rank that has it."""
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, (size, value) in part.items():
            if size is None:
                out.setdefault(key, value)
                continue
            for offsets, shard in value:
                whole = out.setdefault(key, torch.zeros(size, dtype=shard.dtype))
                whole[tuple(slice(o, o + n) for o, n in zip(offsets, shard.shape))] = shard
    return out


class _SavingTrainer(Trainer):
    """Saves with engine ``engine_name`` and, first, records the whole state it saves (expected-STEP.pt);
    the save of step ``kill_step`` kills the process once it has written its first file."""

    engine_name: str
    kill_step: int | None

    def save(self) -> Path | None:
        expected = full_state(self)
        _keep(expected, self.run_dir / f"expected-{self.step}.pt")
        engine = ENGINES[self.engine_name]()
        if self.step == self.kill_step:
            engine.arm_kill()
        return engine.save(self)


def _trainer(job: JobConfig, run_dir: Path, cls: type[Trainer] = Trainer) -> Trainer:
    quiet_libraries()
    ctx = init_distributed(compute_device="cpu", timeout_s=job.train.timeout_s)
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the plan, printed by every build
        return cls(job, ctx=ctx, run_dir=run_dir, data=DataPaths(job.data.train_path or "", None))


def _train(job: JobConfig, run_dir: Path, engine: str | None, kill_step: int | None = None) -> list[float]:
    """Trains ``job``, saving with ``engine`` on its schedule; returns this rank's losses."""
    trainer = _trainer(job, run_dir, _SavingTrainer if engine else Trainer)
    trainer.engine_name, trainer.kill_step = engine, kill_step  # type: ignore[attr-defined]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return trainer.fit().losses
    finally:
        shutdown()


def _restore(job: JobConfig, run_dir: Path, engine: str, path: Path, mode: str) -> list[float]:
    """Restores ``path`` into a fresh Trainer (``mode`` model: the model alone; full; resume: full,
    then training on, returning this rank's losses); rank 0 writes its whole state to restored.pt."""
    trainer = _trainer(job, run_dir)
    impl = ENGINES[engine]()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            (impl.restore_model if mode == "model" else impl.restore)(trainer, path)
        _keep(full_state(trainer), run_dir / "restored.pt")
        if mode != "resume":
            return []
        with contextlib.redirect_stdout(io.StringIO()):
            return trainer.fit().losses
    finally:
        shutdown()


def _restore_after_kill(job: JobConfig, run_dir: Path, engine: str, previous: Path, partial: Path) -> str | None:
    """Restores the save before the killed one (restored.pt), then tries the killed one (last: it may
    raise): its state goes to partial.pt, or its error is returned."""
    trainer = _trainer(job, run_dir)
    impl = ENGINES[engine]()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            impl.restore(trainer, previous)
        _keep(full_state(trainer), run_dir / "restored.pt")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                impl.restore(trainer, partial)
        except Exception as e:  # noqa: BLE001 - refusing the partial save is the wanted outcome
            return _one_line(e)
        _keep(full_state(trainer), run_dir / "partial.pt")
        return None
    finally:
        shutdown()


def _keep(state: dict[str, torch.Tensor], path: Path) -> None:
    """Writes rank 0's gathered state: tensors cannot travel back through run_ranks' queue once the rank exits."""
    if dist.get_rank() == 0:
        torch.save(state, path)


# --- cases ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One cell of the table."""

    status: str
    reason: str = ""

    def cell(self) -> str:
        return self.status + (f": {self.reason}" if self.reason else "")


def _one_line(e: BaseException) -> str:
    """Exception type and the start of its message, from a rank's error when run_ranks wrapped it."""
    text = str(e)
    if text.startswith("rank ") and " failed: " in text:  # run_ranks' wrapper: keep the rank's own error
        text = text.split(" failed: ", 1)[1]
    else:
        text = f"{type(e).__name__}: {text}"
    text = re.sub(r"'/[^']*/([^'/]+)'", r"'\1'", text)  # a path by its last part: the table stays narrow
    return text.splitlines()[0][:160] if text else type(e).__name__


def compare(
    expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], keys: Callable[[str], bool], what: str
) -> Outcome:
    """pass, or WRONG VALUES naming how many ``what`` tensors differ (or are missing) and by how much."""
    names = sorted(k for k in expected if keys(k))
    if not names:
        return Outcome("fail", f"the saved state has no {what}")
    bad, worst = [], 0.0
    for k in names:
        a, e = actual.get(k), expected[k]
        if a is None or a.shape != e.shape:
            bad.append(k)
            worst = float("inf")
        elif not torch.equal(a, e):
            bad.append(k)
            worst = max(worst, float((a.double() - e.double()).abs().max()))
    if not bad:
        return Outcome("pass")
    shown = ", ".join(sorted({table_of_key(k) or k.removeprefix("optim.state.").removeprefix("model.") for k in bad})[:3])
    return Outcome(WRONG, f"{len(bad)} of {len(names)} {what} tensors differ ({shown}), max abs diff {worst:.3g}")


def is_weight(key: str) -> bool:
    return key.startswith("model.")


def is_sparse_optim(key: str) -> bool:
    return key.startswith("optim.state.") and table_of_key(key) is not None


def is_dense_optim(key: str) -> bool:
    return key.startswith("optim.state.") and table_of_key(key) is None


def compare_losses(reference: list[list[float]], resumed: list[list[float]]) -> Outcome:
    """Each rank's losses after the resume against the same steps of the uninterrupted run."""
    diffs = [abs(a - b) for ref, got in zip(reference, resumed) for a, b in zip(ref[SAVE_STEP:], got) if a != b]
    lengths = [len(got) for got in resumed]
    if lengths != [TOTAL_STEPS - SAVE_STEP] * len(reference):
        return Outcome(WRONG, f"resumed {lengths} steps per rank, expected {TOTAL_STEPS - SAVE_STEP}")
    if diffs:
        return Outcome(WRONG, f"{len(diffs)} of {sum(lengths)} losses differ, max abs diff {max(diffs):.3g}")
    return Outcome("pass")


def job(work: Path, *, steps: int, tables: dict[str, Any], checkpoint_on: bool = False, interval: int = 0) -> JobConfig:
    """The tiny test job, without evaluation, with per-table constraints ``tables``."""
    d = tiny_job_dict(work, steps=steps, data={"eval_path": None}, sharding={"tables": tables},
                      checkpoint={"enabled": checkpoint_on, "interval": interval}, train={"timeout_s": 60})
    return build(JobConfig, d, key="")


class Matrix:
    """Runs every case for one engine, each with a timeout, the first error not stopping the rest."""

    def __init__(self, work: Path, engine: str, reference: list[list[float]]) -> None:
        self.work, self.engine, self.reference = work / engine, engine, reference
        self.results: dict[str, Outcome] = {}

    def run(self) -> dict[str, Outcome]:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        saved = self.save()
        if saved is not None:
            path, expected = saved
            self.same_plan(path, expected)
            for case in ELSEWHERE:
                self.elsewhere(case, path, expected)
        self.killed_save()
        return self.results

    def _guard(self, cases: list[str], fn: Callable[[], Any], context: str = "") -> Any:
        """``fn()``, or None with ``error`` (``context`` first) for ``cases`` if it raised or timed out."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one line per case in the table, the whole error in errors.log
            with (self.work / "errors.log").open("a") as log:
                log.write(f"== {', '.join(cases)}\n{type(e).__name__}: {e}\n")
            for case in cases:
                self.results[case] = Outcome("error", context + _one_line(e))
            return None

    def save(self) -> tuple[Path, dict[str, torch.Tensor]] | None:
        run = self.work / "save"
        saving = job(self.work.parent, steps=SAVE_STEP, tables=FORCED, checkpoint_on=True)
        cases = [c for c in CASES if c != "kill"]
        done = self._guard(cases, lambda: run_ranks(_train, saving, run, self.engine, timeout=CASE_TIMEOUT_S))
        if done is None:
            return None
        return step_dir(run / "checkpoints", SAVE_STEP), torch.load(run / f"expected-{SAVE_STEP}.pt")

    def same_plan(self, path: Path, expected: dict[str, torch.Tensor]) -> None:
        resuming = job(self.work.parent, steps=TOTAL_STEPS, tables=FORCED)
        cases = ["weights", "sparse_optim", "dense_optim", "resume"]
        out = self._guard(cases, lambda: run_ranks(_restore, resuming, self.work / "restore", self.engine, path, "resume",
                                                   timeout=CASE_TIMEOUT_S))
        if out is None:
            return
        state = torch.load(self.work / "restore" / "restored.pt")
        self.results["weights"] = compare(expected, state, is_weight, "weight")
        self.results["sparse_optim"] = compare(expected, state, is_sparse_optim, "sparse optimizer")
        self.results["dense_optim"] = compare(expected, state, is_dense_optim, "dense optimizer")
        self.results["resume"] = compare_losses(self.reference, out)

    def elsewhere(self, case: str, path: Path, expected: dict[str, torch.Tensor]) -> None:
        world, tables, model_alone = ELSEWHERE[case]
        restoring = job(self.work.parent, steps=SAVE_STEP, tables=tables)
        mode = "model" if model_alone else "full"
        out = self._guard([case], lambda: run_ranks(_restore, restoring, self.work / case, self.engine, path, mode,
                                                    world_size=world, timeout=CASE_TIMEOUT_S))
        if out is not None:
            self.results[case] = compare(expected, torch.load(self.work / case / "restored.pt"), is_weight, "weight")

    def killed_save(self) -> None:
        run = self.work / "kill"
        training = job(self.work.parent, steps=SAVE_STEP + 1, tables=FORCED, checkpoint_on=True, interval=SAVE_STEP)
        codes = self._guard(["kill"], lambda: run_until_killed(_train, training, run, self.engine, SAVE_STEP + 1))
        if codes is None:
            return
        if codes != [-signal.SIGKILL] * 2:
            self.results["kill"] = Outcome("fail", f"the ranks exited with {codes}, not killed mid-save")
            return
        previous = step_dir(run / "checkpoints", SAVE_STEP)
        partial = ENGINES[self.engine]().partial(step_dir(run / "checkpoints", SAVE_STEP + 1))
        restoring = job(self.work.parent, steps=SAVE_STEP, tables=FORCED)
        out = self._guard(["kill"], lambda: run_ranks(_restore_after_kill, restoring, self.work / "kill-restore", self.engine,
                                                      previous, partial, timeout=CASE_TIMEOUT_S), "previous save: ")
        if out is not None:
            self.results["kill"] = kill_outcome(self.work / "kill-restore", out[0], run)


def kill_outcome(restored: Path, partial_error: str | None, saved: Path) -> Outcome:
    """pass if the partial save is refused and the previous one restores every weight."""
    previous = torch.load(saved / f"expected-{SAVE_STEP}.pt")
    before = compare(previous, torch.load(restored / "restored.pt"), is_weight, "weight")
    if before.status != "pass":
        return Outcome(before.status, f"previous save: {before.reason}")
    if partial_error is None:
        killed = torch.load(saved / f"expected-{SAVE_STEP + 1}.pt")
        after = compare(killed, torch.load(restored / "partial.pt"), is_weight, "weight")
        return Outcome(after.status if after.status != "pass" else "fail",
                       f"the save killed mid-write restored without error: {after.reason or 'complete'}")
    return Outcome("pass", f"partial save refused ({partial_error[:90]})")


def run_until_killed(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> list[int | None]:
    """Runs ``fn(*args)`` on ``world_size`` spawned ranks that are expected to die; returns their exit codes.

    run_ranks would wait out its timeout for results that killed ranks never send.
    """
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, queue, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + CASE_TIMEOUT_S
    for p in procs:
        p.join(max(deadline - time.monotonic(), 1))
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


# --- table ---------------------------------------------------------------------------------------


def table(columns: dict[str, dict[str, dict[str, str]]]) -> str:
    """A markdown table: one row per case, one column per engine."""
    lines = ["| case | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for case, label in CASES.items():
        cells = [Outcome(**col[case]).cell() if case in col else "not run" for col in columns.values()]
        lines.append(f"| {label} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def merge(paths: list[Path]) -> dict[str, dict[str, dict[str, str]]]:
    """The columns of several --json files, the first file's DCP column first, other DCP columns dropped."""
    columns: dict[str, dict[str, dict[str, str]]] = {}
    for i, path in enumerate(paths):
        for name, col in json.loads(path.read_text())["engines"].items():
            if i == 0 or not name.startswith("DCP"):
                columns[name] = col
    return columns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/shardrec-torchsnapshot-matrix"))
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--merge", type=Path, nargs="+", help="print one table of these --json files and exit")
    args = p.parse_args()
    if args.merge:
        print(table(merge(args.merge)))
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    uninterrupted = job(args.work_dir, steps=TOTAL_STEPS, tables=FORCED)
    reference = run_ranks(_train, uninterrupted, args.work_dir / "uninterrupted", None, timeout=CASE_TIMEOUT_S)
    columns, seconds = {}, {}
    for name in args.engines:
        start = time.perf_counter()
        if name == "torchsnapshot" and engine_label(name).endswith("(not installed)"):
            results = {case: Outcome("not run", "torchsnapshot is not importable here") for case in CASES}
        else:
            results = Matrix(args.work_dir, name, reference).run()
        columns[engine_label(name)] = {case: vars(o) for case, o in results.items()}
        seconds[engine_label(name)] = round(time.perf_counter() - start, 1)
        print(f"{engine_label(name)}: {seconds[engine_label(name)]} s", file=sys.stderr, flush=True)
    print(table(columns))
    if args.json:
        args.json.write_text(json.dumps({"engines": columns, "seconds": seconds, "python": sys.executable,
                                         "save_step": SAVE_STEP, "total_steps": TOTAL_STEPS}, indent=2) + "\n")


if __name__ == "__main__":
    main()
