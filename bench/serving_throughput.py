"""Exported-model artifact size and predict rows/s, fp32 and int8 tables, against the eager model.

In one run, for DLRM and DeepFM on a synthetic Criteo-shaped data set (13 dense, 26 sparse
features, ``--table-rows`` rows of dim 16 per table): train ``--steps`` steps on 2 gloo ranks with
a checkpoint (reused when the run folder already has one), ``shardrec export`` it with
``--quantize none`` and ``int8``, then on the same ``--rows`` rows:

* artifact size: bytes of the export folder;
* model rows/s: the batches are read once by ParquetReader (the training reader, as
  ``shardrec predict`` reads them) and held in memory; each timed pass runs every batch through
  the eager model (built from the job and loaded from the checkpoint, eval mode, under
  ``torch.no_grad``, sigmoid applied as the artifact does) or the ``torch.jit.load``ed artifact
  (under ``torch.inference_mode``). Passes interleave eager, fp32 and int8 and repeat; the median
  is reported;
* predict rows/s: ``shardrec predict`` end to end (Parquet read and decode, forward, Parquet
  write) on the same file, once per artifact.

The weights are barely trained: this measures speed and size, not quality. Usage:

    nice python bench/serving_throughput.py [--rows 200000] [--table-rows 100000] [--steps 30] [--repeats 3] [--dir /tmp/shardrec-bench-serving]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from shardrec.config import build, to_dict
from shardrec.data.batch import Batch
from shardrec.data.reader import ParquetReader
from shardrec.data.schema import criteo_schema
from shardrec.data.synthetic_signal import generate
from shardrec.job import JobConfig
from shardrec.launch.spawn import run_ranks
from shardrec.serving.export_model import build_unsharded, export_model
from shardrec.serving.config import ExportConfig
from shardrec.serving.predict import predict
from shardrec.serving.config import PredictConfig
from shardrec.train.worker import run

MODELS = ("dlrm", "deepfm")
BATCH = 4096
MB = 1e6


def job_for(root: Path, model: str, *, data: Path, table_rows: int, steps: int) -> JobConfig:
    """A 2-rank CPU job training ``model`` on ``data`` with a checkpoint at the last step."""
    schema = criteo_schema(rows=[table_rows] * 26, dim=16)
    return build(JobConfig, {
        "model": {"name": model},
        "features": to_dict(schema),
        "data": {"train_path": str(data), "batch_size": 1024, "prefetch": 1},
        "sharding": {"compute_device": "cpu"},
        "train": {"steps": steps, "progress_bar": False, "seed": 0, "timeout_s": 600,
                  "dense_optimizer": {"name": "adam", "lr": 0.001}, "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05}},
        "checkpoint": {"enabled": True},
        "run": {"root": str(root / "runs")},
    }, key="")


def _train(job: JobConfig, run_dir: Path) -> None:
    run(job, run_dir=run_dir, resume=None)


def checkpoint_of(root: Path, model: str, job: JobConfig, steps: int) -> Path:
    """The run's last checkpoint, training first if there is none."""
    path = root / model / "checkpoints" / f"step-{steps:08d}"
    if not path.exists():
        shutil.rmtree(root / model, ignore_errors=True)
        run_ranks(_train, job, root / model, timeout=3600)
    return path


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MB


def rows_per_s(forward: Any, batches: list[Batch]) -> float:
    """Rows/s of one pass of ``forward`` over ``batches``."""
    start = time.perf_counter()
    for b in batches:
        forward(b)
    return sum(b.size for b in batches) / (time.perf_counter() - start)


def measure(root: Path, model: str, *, data: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Size (MB), model rows/s and predict rows/s of eager, fp32 and int8."""
    job = job_for(root, model, data=data, table_rows=args.table_rows, steps=args.steps)
    ckpt = checkpoint_of(root, model, job, args.steps)
    exports = {q: root / f"{model}-export-{q}" for q in ("none", "int8")}
    for q, out in exports.items():
        shutil.rmtree(out, ignore_errors=True)
        export_model(ExportConfig(checkpoint=ckpt, out=out, quantize=q))
    eager = build_unsharded(job, ckpt)
    fp32, int8 = (torch.jit.load(str(exports[q] / "model.pt")) for q in ("none", "int8"))
    batches = list(ParquetReader(data, schema=job.features, batch_size=BATCH))

    def scripted(module: torch.jit.ScriptModule) -> Any:
        def forward(b: Batch) -> torch.Tensor:
            with torch.inference_mode():
                return module(b.dense_features, b.sparse_features.values(), b.sparse_features.lengths())
        return forward

    def eager_forward(b: Batch) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(eager(b.dense_features, b.sparse_features))

    forwards = {"eager": eager_forward, "fp32": scripted(fp32), "int8": scripted(int8)}
    for f in forwards.values():  # warm-up: first-call compilation and allocation
        f(batches[0])
    speeds: dict[str, list[float]] = {k: [] for k in forwards}
    for _ in range(args.repeats):
        for name, f in forwards.items():
            speeds[name].append(rows_per_s(f, batches))
    ckpt_tensors = sum(t.numel() * t.element_size() for t in eager.state_dict().values()) / MB
    out: dict[str, dict[str, float]] = {"eager": {"mb": ckpt_tensors, "model": statistics.median(speeds["eager"])}}
    for name, q in (("fp32", "none"), ("int8", "int8")):
        result = predict(PredictConfig(model=exports[q], data=str(data), out=root / f"{model}-{q}-scores.parquet", id_column="C1",
                                       batch_size=BATCH, progress_bar=False))
        out[name] = {"mb": folder_mb(exports[q]), "model": statistics.median(speeds[name]), "predict": result.rows / result.seconds}
    return out


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| model | variant | size (MB) | size vs eager | model rows/s | vs eager | `shardrec predict` rows/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model, r in results.items():
        base = r["eager"]
        for name, v in r.items():
            label = "eager (weights in memory)" if name == "eager" else f"artifact {name}"
            predict_rate = f"{v['predict']:,.0f}" if "predict" in v else "-"
            lines.append(f"| {model} | {label} | {v['mb']:.1f} | {v['mb'] / base['mb']:.2f}x | {v['model']:,.0f} | "
                         f"{v['model'] / base['model']:.2f}x | {predict_rate} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="rows of the data set, trained on and scored")
    p.add_argument("--table-rows", type=int, default=100_000, help="rows of each of the 26 tables")
    p.add_argument("--steps", type=int, default=30, help="training steps (batch 1024 per rank)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per variant")
    p.add_argument("--dir", type=Path, default=Path("/tmp/shardrec-bench-serving"))
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    data = args.dir / f"criteo-{args.rows}-{args.table_rows}.parquet"
    if not data.exists():
        generate(criteo_schema(rows=[args.table_rows] * 26, dim=16), rows=args.rows, path=data, seed=1)
    results = {m: measure(args.dir, m, data=data, args=args) for m in MODELS}
    print(f"`{' '.join(['python', *sys.argv])}`; torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, "
          f"{args.rows:,} rows, 26 tables of {args.table_rows:,} x 16\n")
    print(table(results))
    print("\nsize: eager = the model's fp32 tensors in memory; artifact = the export folder on disk. model rows/s: forward only, "
          f"batches pre-read, median of {args.repeats} interleaved passes. predict rows/s: read + forward + write, one run.")


if __name__ == "__main__":
    main()
