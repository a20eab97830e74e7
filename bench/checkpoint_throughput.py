"""Checkpoint write and restore GB/s against ``dd`` on the same disk, and step time while an async save drains.

A DLRM with a few big tables (default 4 x 8M rows x 32 = 4.1 GB of fp32 weights, plus row-wise
Adagrad state), two tables table-wise and two row-wise over 2 gloo ranks, built by shardrec's
Trainer. In one run, each repeat:

1. ``trainer.save()`` with a synchronous Saver (DCP, which fsyncs every file: ``sync_files``
   defaults to True) -> bytes of the checkpoint folder / wall time. Then ``checkpoint.load`` into
   the same trainer, first with the page cache dropped (cold), then again (warm).
2. ``dd if=/dev/zero of=F bs=64M conv=fdatasync`` of the same byte count (one stream, and two
   streams of half each, as the 2 ranks write), then ``dd if=F of=/dev/null bs=64M`` cold and warm.
3. Training (the trainer's pipeline over 32 in-memory batches): steps with no save before and
   after, an asynchronous ``trainer.save()``, and the steps while its write is in flight ->
   mean step time in flight / mean step time without a save. The time ``save()`` blocks
   (staging the state to host memory) is reported on its own.

Repeats interleave all three, and dd goes first in every other repeat, so drifts of the (shared)
machine hit both sides of each ratio alike. Dropping the page cache needs root (``/proc/sys/vm/drop_caches``); without it the "cold" rows are
warm and say so. Usage:

    python bench/checkpoint_throughput.py [--rows 8000000] [--dim 32] [--repeats 3] [--dir /tmp/shardrec-bench-ckpt]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from shardrec.config import build, to_dict
from shardrec.data.batch import Batch
from shardrec.data.schema import criteo_schema
from shardrec.data.synthetic_signal import generate
from shardrec.job import JobConfig
from shardrec.launch.spawn import run_ranks
from shardrec.checkpoint import store as checkpoint
from shardrec.train.dist import init_distributed, shutdown
from shardrec.train.pipeline import make_pipeline
from shardrec.train.quiet import quiet_libraries
from shardrec.checkpoint.async_saver import Saver
from shardrec.train.trainer import DataPaths, Trainer

GB = 1e9
BATCHES = 32
TABLES = 4


def job_dict(root: Path, *, rows: int, dim: int, batch_size: int) -> dict[str, Any]:
    """A DLRM over ``TABLES`` tables of ``rows`` x ``dim``: half table-wise, half row-wise."""
    schema = criteo_schema(num_dense=4, num_sparse=TABLES, rows=[rows] * TABLES, dim=dim)
    for f in schema.sparse:
        f.hash = False
    train = root / "train.parquet"
    if not train.exists():
        generate(schema, rows=2 * BATCHES * batch_size, path=train, seed=1, zipf_a=1.2, row_group_size=4096)
    kinds = ["table_wise", "row_wise"]
    return {
        "model": {"name": "dlrm", "dense_arch_layer_sizes": [64, dim]},
        "features": to_dict(schema),
        "data": {"train_path": str(train), "batch_size": batch_size, "prefetch": 0},
        "sharding": {"compute_device": "cpu", "memory_per_device_gb": 16,
                     "tables": {t.name: {"sharding_types": [kinds[i * 2 // TABLES]]} for i, t in enumerate(schema.tables)}},
        "train": {"steps": 1, "progress_bar": False, "seed": 0, "timeout_s": 900,
                  "dense_optimizer": {"name": "adam", "lr": 0.003}, "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.1}},
        "checkpoint": {"enabled": True, "keep_last_n": 1, "async_save": False},
        "run": {"root": str(root / "runs")},
    }


def drop_caches() -> bool:
    """Writes dirty pages and drops the page cache; False where that is not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def timed(cmd: list[str] | list[list[str]]) -> float:
    """Seconds until every command of ``cmd`` (one, or several run side by side) has exited."""
    cmds = cmd if isinstance(cmd[0], list) else [cmd]
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stderr=subprocess.DEVNULL) for c in cmds]  # type: ignore[arg-type]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"{p.args} exited {p.returncode}")
    return time.perf_counter() - start


def _dd_write(file: Path, n: int) -> list[str]:
    return ["dd", "if=/dev/zero", f"of={file}", "bs=64M", f"count={n}", "iflag=count_bytes", "conv=fdatasync"]


def _dd_read(file: Path) -> list[str]:
    return ["dd", f"if={file}", "of=/dev/null", "bs=64M"]


def dd_write(folder: Path, nbytes: int) -> dict[str, float]:
    """GB/s of dd writing ``nbytes`` (fdatasync'ed, as DCP fsyncs) in one stream, and in two streams
    of half each (as the 2 ranks write)."""
    out = {"dd_write": nbytes / timed(_dd_write(folder / "dd", nbytes)) / GB}
    out["dd_write_2"] = nbytes / timed([_dd_write(folder / f"dd-{i}", nbytes // 2) for i in range(2)]) / GB
    return out


def dd_read(folder: Path, nbytes: int) -> dict[str, float]:
    """GB/s of dd reading back the files of :func:`dd_write`: cold and warm, and the halves cold side by side."""
    drop_caches()
    out = {"dd_read_cold": nbytes / timed(_dd_read(folder / "dd")) / GB}
    out["dd_read_warm"] = nbytes / timed(_dd_read(folder / "dd")) / GB
    drop_caches()
    out["dd_read_cold_2"] = nbytes / timed([_dd_read(folder / f"dd-{i}") for i in range(2)]) / GB
    for f in folder.glob("dd*"):
        f.unlink()
    return out


def folder_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _barrier_time(fn: Any) -> float:
    """Wall seconds of collective ``fn()`` from a barrier before to a barrier after."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def measure_io(trainer: Trainer, scratch: Path, *, dd_first: bool, nbytes: int) -> dict[str, float]:
    """One repeat of parts 1 and 2: the synchronous save, then the restores, each next to its dd
    (before it when ``dd_first``, of ``nbytes`` from the previous repeat; else after it). dd runs on
    rank 0 while rank 1 waits at a barrier."""
    main = dist.get_rank() == 0
    trainer.step += 1
    path = checkpoint.step_dir(trainer.saver.root, trainer.step)
    load = lambda: checkpoint.load(path, model=trainer.model, optimizer=trainer.optimizer, warn=False)  # noqa: E731
    out: dict[str, float] = {}

    def ours_write() -> None:
        save_s = _barrier_time(trainer.save)
        out.update(bytes=folder_bytes(path) if main else 0, save_s=save_s)

    def ours_read() -> None:
        out["caches_dropped"] = float(drop_caches() if main else True)
        out.update(load_cold_s=_barrier_time(load), load_warm_s=_barrier_time(load))

    def theirs(fn: Any) -> Any:
        return lambda: out.update(fn(scratch, nbytes or int(out["bytes"])) if main else {})

    for step in ([theirs(dd_write), ours_write, theirs(dd_read), ours_read] if dd_first
                 else [ours_write, theirs(dd_write), ours_read, theirs(dd_read)]):
        step()
        dist.barrier()
    for key in ("save", "load_cold", "load_warm"):
        out[key] = out["bytes"] / out[f"{key}_s"] / GB
    return out


def _steps(pipeline: Any, data: Iterator[Batch], n: int) -> list[tuple[float, float, float, float]]:
    """(start, wall s, main-thread CPU s, process CPU s) of each of ``n`` training steps."""
    out = []
    for _ in range(n):
        start, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
        pipeline.progress(data)
        out.append((start, time.perf_counter() - start, time.thread_time() - thread, time.process_time() - process))
    return out


def _mean_ms(steps: list[tuple[float, float, float, float]], i: int) -> float:
    return 1e3 * statistics.mean(s[i] for s in steps)


def measure_drain(trainer: Trainer, pipeline: Any, data: Iterator[Batch], *, base_steps: int) -> dict[str, float]:
    """One repeat of part 3: step times before, during and after one asynchronous save."""
    before = _steps(pipeline, data, base_steps)
    trainer.step += 1
    start = time.perf_counter()
    trainer.save()
    stall = time.perf_counter() - start
    done: list[float] = []
    trainer.saver._pending.future.add_done_callback(lambda _: done.append(time.perf_counter()))  # noqa: SLF001
    during: list[tuple[float, float, float, float]] = []
    while True:  # in chunks, so that the ranks agree when to stop without a collective in every step
        during += _steps(pipeline, data, 20)
        pending = torch.tensor([0 if done else 1])
        dist.all_reduce(pending)
        if int(pending) == 0:
            break
    ends = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(ends, torch.tensor([done[0]], dtype=torch.float64))
    last_done = max(float(e) for e in ends)  # perf_counter is CLOCK_MONOTONIC: one clock for every process
    after = _steps(pipeline, data, base_steps)
    trainer.saver.wait()
    in_flight = [s for s in during if s[0] < last_done]
    return {"stall_s": stall, "drain_s": last_done - start - stall, "steps_in_flight": len(in_flight),
            "step_ms": _mean_ms(before + after, 1), "step_ms_in_flight": _mean_ms(in_flight, 1),
            "ratio": _mean_ms(in_flight, 1) / _mean_ms(before + after, 1),
            "main_cpu_ms": _mean_ms(before + after, 2), "main_cpu_ms_in_flight": _mean_ms(in_flight, 2),
            "proc_cpu_ms": _mean_ms(before + after, 3), "proc_cpu_ms_in_flight": _mean_ms(in_flight, 3)}


def _rank(job: JobConfig, scratch: Path, repeats: int, base_steps: int) -> dict[str, list[dict[str, float]]]:
    quiet_libraries()
    ctx = init_distributed(compute_device="cpu", timeout_s=900)
    try:
        run_dir = Path(job.run.root) / "bench"
        run_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(io.StringIO()):  # the plan
            trainer = Trainer(job, ctx=ctx, run_dir=run_dir, data=DataPaths(job.data.train_path or "", None))
        data = itertools.cycle(list(itertools.islice(trainer.batches(0), BATCHES)))
        pipeline = make_pipeline(job.train.pipeline, model=trainer.model, optimizer=trainer.optimizer, device=ctx.device)
        _steps(pipeline, data, 20)  # warm-up; creates the dense optimizer's state
        savers = {"sync": trainer.saver, "async": Saver(trainer.saver.root, is_main=ctx.is_main, keep_last_n=1, asynchronous=True)}
        results: dict[str, list[dict[str, float]]] = {"io": [], "drain": []}
        for r in range(repeats):  # interleaved, and dd before ours in every other repeat, so drifts hit both alike
            trainer.saver = savers["sync"]
            nbytes = int(results["io"][-1]["bytes"]) if results["io"] else 0
            results["io"].append(measure_io(trainer, scratch, dd_first=r % 2 == 1, nbytes=nbytes))
            trainer.saver = savers["async"]
            results["drain"].append(measure_drain(trainer, pipeline, data, base_steps=base_steps))
        trainer.saver.close()
        return results
    finally:
        shutdown()


def median_of(rows: list[dict[str, float]], key: str | tuple[str, str]) -> float:
    """Median over repeats of ``rows[key]``, or of the ratio ``rows[a] / rows[b]`` for ``key=(a, b)``."""
    if isinstance(key, tuple):
        return statistics.median(r[key[0]] / r[key[1]] for r in rows)
    return statistics.median(r[key] for r in rows)


def report(io_rows: list[dict[str, float]], drain_rows: list[dict[str, float]], drain_other: list[dict[str, float]]) -> None:
    """Prints every repeat, then the medians (of per-repeat ratios for the ratios) as markdown tables."""
    for r in io_rows:
        print("io repeat:", {k: round(v, 3) for k, v in r.items()})
    for r, o in zip(drain_rows, drain_other):
        print("drain repeat (rank 0 | rank 1):", {k: round(v, 3) for k, v in r.items()}, {k: round(v, 3) for k, v in o.items()})
    cold = "cold" if all(r["caches_dropped"] for r in io_rows) else "cache NOT dropped"
    print(f"\ncheckpoint {median_of(io_rows, 'bytes') / GB:.2f} GB, median of {len(io_rows)} repeats\n")
    print("| operation | shardrec GB/s | dd GB/s | shardrec / dd | dd 2 streams GB/s | shardrec / dd 2 streams |")
    print("|---|---|---|---|---|---|")
    for name, ours, dd, dd2 in (("write (fsync)", "save", "dd_write", "dd_write_2"),
                                (f"restore ({cold})", "load_cold", "dd_read_cold", "dd_read_cold_2"),
                                ("restore (warm)", "load_warm", "dd_read_warm", None)):
        two = f"{median_of(io_rows, dd2):.2f} | {median_of(io_rows, (ours, dd2)):.2f}" if dd2 else "- | -"
        print(f"| {name} | {median_of(io_rows, ours):.2f} | {median_of(io_rows, dd):.2f} | {median_of(io_rows, (ours, dd)):.2f} | {two} |")
    print("\n| step ms, no save | step ms, async save in flight | in flight / no save | save() blocks s | write in flight s "
          "| steps in flight | main-thread CPU ms/step, no save / in flight | process CPU ms/step, no save / in flight |")
    print("|---|---|---|---|---|---|---|---|")
    cells = [f"{median_of(drain_rows, k):.2f}" for k in ("step_ms", "step_ms_in_flight", "ratio", "stall_s", "drain_s")]
    cells.append(f"{median_of(drain_rows, 'steps_in_flight'):.0f}")
    for k in ("main_cpu_ms", "proc_cpu_ms"):
        cells.append(f"{median_of(drain_rows, k):.1f} / {median_of(drain_rows, k + '_in_flight'):.1f}")
    print("| " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8_000_000, help="rows of each of the 4 tables")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--base-steps", type=int, default=100, help="steps without a save before and after each async save")
    p.add_argument("--dir", type=Path, default=Path("/tmp/shardrec-bench-ckpt"))
    args = p.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    try:
        job = build(JobConfig, job_dict(args.dir, rows=args.rows, dim=args.dim, batch_size=args.batch_size), key="")
        ranks = run_ranks(_rank, job, args.dir, args.repeats, args.base_steps, world_size=2, timeout=1800)
        report(ranks[0]["io"], ranks[0]["drain"], ranks[1]["drain"])
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
