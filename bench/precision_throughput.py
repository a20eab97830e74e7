"""Training samples/s in fp32 and bf16: shardrec from Parquet against torchrec driven by hand.

The Criteo-shaped DLRM of issue #22: 13 dense features, 26 tables of 100,000 x 64, bottom MLP
[512, 256, 64], top MLP [512, 256, 1], batch 2,048 per rank, 2 gloo ranks on this CPU. Five ways,
interleaved ``--repeats`` times (medians), each a fresh pair of ranks:

* ``shardrec fp32`` / ``shardrec bf16``: ``shardrec train``'s Trainer with ``train.precision``,
  batches streamed from the Parquet file by its reader (prefetch thread), its plan and pipeline;
  ``shardrec bf16, fp16 tables`` also sets ``features.table_precision: fp16``;
* ``torchrec fp32``: torchrec's own ``DLRM`` and ``DLRMTrain`` in ``DistributedModelParallel`` with
  its default planner, the sparse optimizer fused (row-wise Adagrad), Adam on the rest through a
  ``CombinedOptimizer``, ``TrainPipelineSparseDist`` over 32 batches built in memory before the
  first step, cycled: the way torchrec's DLRM example drives it;
* ``torchrec bf16 by hand``: the same with ``DLRMTrain``'s forward under ``torch.autocast`` and
  the loss in fp32, as a TorchRec user would add it.

Samples/s count every rank's rows over the steps after ``--warmup``. Usage:

    python bench/precision_throughput.py [--steps 60] [--warmup 10] [--repeats 2] [--work /tmp/shardrec-precision]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from shardrec.config import build, to_dict
from shardrec.data.reader import ParquetReader
from shardrec.data.schema import FeatureSchema, criteo_schema
from shardrec.data.synthetic_signal import generate
from shardrec.job import JobConfig
from shardrec.launch.spawn import run_ranks
from shardrec.train.dist import init_distributed, shutdown
from shardrec.train.quiet import quiet_libraries
from shardrec.train.trainer import DataPaths, Trainer

TABLES, ROWS, DIM, DENSE, BATCH = 26, 100_000, 64, 13, 2048
BOTTOM, TOP = [512, 256, 64], [512, 256, 1]


def schema() -> FeatureSchema:
    s = criteo_schema(num_dense=DENSE, num_sparse=TABLES, rows=[ROWS] * TABLES, dim=DIM)
    for f in s.sparse:
        f.hash = False
    return s


def job(path: Path, work: Path, *, steps: int, precision: str, tables: str = "fp32") -> JobConfig:
    return build(JobConfig, {
        "model": {"name": "dlrm", "dense_arch_layer_sizes": BOTTOM, "over_arch_layer_sizes": TOP},
        "features": {**to_dict(schema()), "table_precision": tables},
        "data": {"train_path": str(path), "batch_size": BATCH, "prefetch": 2},
        "sharding": {"compute_device": "cpu"},
        "train": {"steps": steps, "progress_bar": False, "tensorboard": False, "log_interval": 1000, "precision": precision,
                  "dense_optimizer": {"name": "adam", "lr": 0.001}, "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05}},
        "checkpoint": {"enabled": False},
        "run": {"root": str(work / "runs")},
    }, key="")


def _shardrec(job: JobConfig, run_dir: Path) -> float:
    quiet_libraries()
    ctx = init_distributed(compute_device="cpu")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return Trainer(job, ctx=ctx, run_dir=run_dir, data=DataPaths(job.data.train_path or "", None)).fit().samples_per_s
    finally:
        shutdown()


def _torchrec(path: str, steps: int, warmup: int, autocast: bool) -> float:
    """One rank of torchrec's DLRM driven the way its example does; global samples/s after warm-up."""
    from torchrec.datasets.utils import Batch as TorchrecBatch
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.models.dlrm import DLRM, DLRMTrain
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    class AutocastDLRMTrain(DLRMTrain):
        def forward(self, batch: Any) -> Any:  # what a user adds by hand: autocast, the loss in fp32
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = self.model(batch.dense_features, batch.sparse_features).squeeze(-1)
            logits = logits.float()
            loss = self.loss_fn(logits, batch.labels.float())
            return loss, (loss.detach(), logits.detach(), batch.labels.detach())

    quiet_libraries()
    ctx = init_distributed(compute_device="cpu")
    try:
        s = schema()
        configs = [EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[f.name])
                   for f in s.sparse]
        ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
        dlrm = DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE, dense_arch_layer_sizes=BOTTOM,
                    over_arch_layer_sizes=TOP, dense_device=torch.device("cpu"))
        train = (AutocastDLRMTrain if autocast else DLRMTrain)(dlrm)
        apply_optimizer_in_backward(RowWiseAdagrad, train.model.sparse_arch.parameters(), {"lr": 0.05})
        with contextlib.redirect_stdout(io.StringIO()):
            model = DistributedModelParallel(module=train, device=torch.device("cpu"))
        dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                      lambda params: torch.optim.Adam(params, lr=0.001))
        optimizer = CombinedOptimizer([model.fused_optimizer, dense])
        pipeline = TrainPipelineSparseDist(model, optimizer, torch.device("cpu"))
        reader = ParquetReader(path, schema=s, batch_size=BATCH, rank=ctx.rank, world_size=ctx.world_size)
        ready = [TorchrecBatch(dense_features=b.dense_features, sparse_features=b.sparse_features, labels=b.labels)
                 for b in itertools.islice(reader, 32)]
        data = itertools.cycle(ready)
        for _ in range(warmup):
            pipeline.progress(data)
        torch.distributed.barrier()
        start = time.perf_counter()
        for _ in range(steps - warmup):
            pipeline.progress(data)
        torch.distributed.barrier()
        return (steps - warmup) * BATCH * ctx.world_size / (time.perf_counter() - start)
    finally:
        shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="torchrec side; shardrec's Trainer leaves out its first 10 steps")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/shardrec-precision"))
    args = p.parse_args()
    (args.work / "r").mkdir(parents=True, exist_ok=True)
    path = args.work / f"criteo_{TABLES}x{ROWS}_{args.steps}.parquet"
    if not path.exists():
        generate(schema(), rows=args.steps * BATCH * 2, path=path, seed=7, zipf_a=1.2, row_group_size=16_384)
    runs = {
        "shardrec fp32": lambda: run_ranks(_shardrec, job(path, args.work, steps=args.steps, precision="fp32"), args.work / "r", timeout=1800)[0],
        "shardrec bf16": lambda: run_ranks(_shardrec, job(path, args.work, steps=args.steps, precision="bf16"), args.work / "r", timeout=1800)[0],
        "shardrec bf16, fp16 tables": lambda: run_ranks(
            _shardrec, job(path, args.work, steps=args.steps, precision="bf16", tables="fp16"), args.work / "r", timeout=1800)[0],
        "torchrec fp32": lambda: run_ranks(_torchrec, str(path), args.steps, args.warmup, False, timeout=1800)[0],
        "torchrec bf16 by hand": lambda: run_ranks(_torchrec, str(path), args.steps, args.warmup, True, timeout=1800)[0],
    }
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, go in runs.items():
            rates[name].append(go())
            print(f"{name}: {rates[name][-1]:,.0f} samples/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; {args.steps} steps, batch {BATCH} per rank, 2 ranks")
    print("| run | samples/s (median) | each repeat | vs shardrec fp32 | vs torchrec fp32 |")
    print("|---|---|---|---|---|")
    for name, v in med.items():
        print(f"| {name} | {v:,.0f} | {', '.join(f'{x:,.0f}' for x in rates[name])} | {v / med['shardrec fp32']:.2f} | "
              f"{v / med['torchrec fp32']:.2f} |")


if __name__ == "__main__":
    main()
