"""Reader throughput: Parquet -> Batch (KJT) rows/s against a raw pyarrow scan, and against training.

1. ``ParquetReader`` rows/s over a file divided by a raw ``pyarrow`` scan of the same columns of the
   same file (``ParquetFile.iter_batches``, threads off), both in batches of the same size and in
   the scan's favourite 65,536-row batches, in one run.
2. One rank's reader rows/s divided by the rows/s one rank's training step consumes (the default
   job's sharded DLRM on 2 gloo ranks, stepping over in-memory batches), in one run.
3. Rows/s delivered to a training loop by ``data.num_workers`` = 0, 1, 2, 4 workers, as processes
   and as threads (``data.worker_kind``), against the raw bulk scan, in one run, over a larger
   file of the same shape (``--worker-rows``, 2M: each pass then takes seconds, so starting the
   workers, which is counted, does not decide it).

Usage:

    python bench/reader_throughput.py [--repeats 3] [--train-steps 200] [--workers 0,1,2,4] [--only scan|workers]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from shardrec.config import build
from shardrec.data.prepare import resolve_data
from shardrec.data.reader import ParquetReader
from shardrec.data.schema import FeatureSchema
from shardrec.data.synthetic_signal import generate
from shardrec.job import load_job

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import bench_job, measure  # noqa: E402


def raw_scan(path: Path, columns: list[str], *, batch_size: int) -> float:
    """Rows/s of reading ``columns`` as Arrow record batches of ``batch_size`` rows and touching each column."""
    start, rows = time.perf_counter(), 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns, use_threads=False):
        rows += batch.num_rows
        for col in batch.columns:
            pa.compute.sum(col.is_valid())  # touch the data like a consumer would
    return rows / (time.perf_counter() - start)


def reader_rate(path: Path, schema: FeatureSchema, *, batch_size: int, rank: int = 0, world_size: int = 1) -> float:
    """Rows/s of ParquetReader turning ``path`` into Batches (prefetch off: the work itself)."""
    reader = ParquetReader(path, schema=schema, batch_size=batch_size, rank=rank, world_size=world_size, prefetch=0)
    start, rows = time.perf_counter(), 0
    for batch in reader:
        rows += batch.size
    return rows / (time.perf_counter() - start)


def delivered_rate(path: Path, schema: FeatureSchema, *, batch_size: int, workers: int, kind: str, prefetch: int = 2) -> float:
    """Rows/s a training loop receives from ParquetReader with ``workers`` workers of ``kind``
    (process or thread): the time from asking for the first batch to holding the last, worker
    start-up included."""
    reader = ParquetReader(path, schema=schema, batch_size=batch_size, prefetch=prefetch, num_workers=workers,
                           worker_kind=kind)  # type: ignore[arg-type]
    start, rows = time.perf_counter(), 0
    for batch in reader:
        rows += batch.size
    return rows / (time.perf_counter() - start)


def workers_table(path: Path, schema: FeatureSchema, *, batch_size: int, counts: list[int], repeats: int) -> None:
    """Rows/s delivered per worker count and kind, against the raw bulk scan, medians of interleaved repeats."""
    kinds = [(0, "none")] + [(n, k) for n in counts if n for k in ("process", "thread")]
    rates: dict[tuple[int, str], list[float]] = {k: [] for k in kinds}
    bulk = []
    for _ in range(repeats):
        bulk.append(raw_scan(path, columns_of(schema), batch_size=65_536))
        for n, kind in kinds:
            rates[(n, kind)].append(delivered_rate(path, schema, batch_size=batch_size, workers=n, kind=kind if n else "process"))
    scan = statistics.median(bulk)
    base = statistics.median(rates[(0, "none")])
    one = {k: statistics.median(rates[(1, k)]) for k in ("process", "thread") if (1, k) in rates}
    print(f"\nraw bulk scan (65,536-row batches): {scan:,.0f} rows/s; batch {batch_size}; load average before: "
          f"{os.getloadavg()[0]:.2f}")
    print("| workers | kind | rows/s delivered | vs raw scan | vs 0 workers | vs 1 worker of its kind |")
    print("|---|---|---|---|---|---|")
    for n, kind in kinds:
        r = statistics.median(rates[(n, kind)])
        vs_one = f"{r / one[kind]:.2f}" if n and kind in one else ""
        print(f"| {n} | {kind if n else 'prefetch thread'} | {r:,.0f} | {r / scan:.2f} | {r / base:.2f} | {vs_one} |", flush=True)


def columns_of(schema: FeatureSchema) -> list[str]:
    """Every column the schema reads."""
    cols = schema.labels + [f.name for f in schema.dense]
    for f in schema.sparse:
        cols += [c for c in f.columns if c not in cols]
    return cols


def sequence_schema() -> FeatureSchema:
    """A MovieLens-like schema: ids, multi-hot, weighted, a 50-long history, bucketized, combo, two labels."""
    return build(
        FeatureSchema,
        {
            "label": ["click", "buy"],
            "dense": [{"name": f"d{i}", "fill_missing": 0.0} for i in range(4)],
            "sparse": [
                {"name": "user", "table": "user"},
                {"name": "item", "table": "item"},
                {"name": "genres", "table": "genre"},
                {"name": "tags", "table": "tag", "weights": "tag_w"},
                {"name": "hist", "table": "item", "sequence": True, "max_len": 50},
                {"name": "d0_bucket", "source": "d0", "table": "bucket", "boundaries": [1, 2, 4, 8, 16]},
                {"name": "user_x_item", "table": "cross", "cross": ["user", "item"]},
            ],
            "tables": [
                {"name": "user", "num_embeddings": 100_000, "embedding_dim": 16},
                {"name": "item", "num_embeddings": 50_000, "embedding_dim": 16},
                {"name": "genre", "num_embeddings": 20, "embedding_dim": 16},
                {"name": "tag", "num_embeddings": 1_000, "embedding_dim": 16},
                {"name": "bucket", "num_embeddings": 8, "embedding_dim": 16},
                {"name": "cross", "num_embeddings": 1_000_000, "embedding_dim": 16},
            ],
        },
        key="features",
    )


def write_sequence_data(path: Path, rows: int, seed: int = 0) -> None:
    """Random rows for :func:`sequence_schema`, histories of 0-80 items."""
    rng = torch.Generator().manual_seed(seed)

    def lists(n_max: int, high: int, dtype: pa.DataType = pa.int64()) -> pa.Array:
        lengths = torch.randint(0, n_max + 1, (rows,), generator=rng)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).numpy().astype("int32")
        values = torch.randint(0, high, (int(lengths.sum()),), generator=rng).numpy()
        values = values.astype("float32") / high if dtype == pa.float32() else values
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, dtype))

    tags = lists(5, 1_000)
    weights = pa.ListArray.from_arrays(tags.offsets, pa.array(torch.rand(len(tags.values), generator=rng).numpy(), pa.float32()))
    table = pa.table(
        {
            "click": torch.randint(0, 2, (rows,), generator=rng).numpy().astype("int8"),
            "buy": torch.randint(0, 2, (rows,), generator=rng).numpy().astype("int8"),
            **{f"d{i}": (torch.rand(rows, generator=rng) * 20).numpy() for i in range(4)},
            "user": torch.randint(0, 100_000, (rows,), generator=rng).numpy(),
            "item": torch.randint(0, 50_000, (rows,), generator=rng).numpy(),
            "genres": lists(4, 20),
            "tags": tags,
            "tag_w": weights,
            "hist": lists(80, 50_000),
        }
    )
    pq.write_table(table, path, row_group_size=16_384)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--tmp", type=Path, default=Path("/tmp/shardrec-bench"))
    p.add_argument("--workers", default="0,1,2,4", help="worker counts of the delivered-rows table")
    p.add_argument("--worker-rows", type=int, default=2_000_000, help="rows of the delivered-rows table's file")
    p.add_argument("--only", choices=["scan", "workers"], help="run one part: the decode-vs-scan tables, or the workers table")
    args = p.parse_args()
    args.tmp.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    job = load_job(None, ["checkpoint.enabled=false"])
    job = dataclasses.replace(job, data=resolve_data(job.data, job.features))
    criteo = args.tmp / f"criteo_shaped_{args.rows}.parquet"
    if not criteo.exists():
        generate(job.features, rows=args.rows, path=criteo, seed=7, zipf_a=1.2, row_group_size=16_384)
    seq = args.tmp / f"sequence_{args.rows}.parquet"
    if not seq.exists():
        write_sequence_data(seq, args.rows)
    big = args.tmp / f"criteo_shaped_{args.worker_rows}.parquet"
    if args.only != "scan" and not big.exists():
        generate(job.features, rows=args.worker_rows, path=big, seed=7, zipf_a=1.2, row_group_size=16_384)
    if args.only == "workers":
        workers_table(big, job.features, batch_size=job.data.batch_size, repeats=args.repeats,
                      counts=[int(n) for n in args.workers.split(",")])
        return
    print("| data | batch rows | reader rows/s | raw scan, same batch rows | reader / raw | raw scan, 65,536-row batches | reader / raw |")
    print("|---|---|---|---|---|---|---|")
    for name, path, schema in (("criteo-shaped (13 dense, 26 ids)", criteo, job.features), ("sequence mix (7 kinds, 2 labels)", seq, sequence_schema())):
        for batch_size in (512, 8192):
            r = statistics.median(reader_rate(path, schema, batch_size=batch_size) for _ in range(args.repeats))
            same = statistics.median(raw_scan(path, columns_of(schema), batch_size=batch_size) for _ in range(args.repeats))
            bulk = statistics.median(raw_scan(path, columns_of(schema), batch_size=65_536) for _ in range(args.repeats))
            print(f"| {name} | {batch_size} | {r:,.0f} | {same:,.0f} | {r / same:.2f} | {bulk:,.0f} | {r / bulk:.2f} |", flush=True)
    if args.only == "scan":
        return
    workers_table(big, job.features, batch_size=job.data.batch_size, repeats=args.repeats,
                  counts=[int(n) for n in args.workers.split(",")])
    train = measure(bench_job(args.train_steps, "auto", args.tmp), "memory", args.tmp, nproc=2, repeats=1)
    per_rank = statistics.median(
        reader_rate(criteo, job.features, batch_size=512, rank=0, world_size=2) for _ in range(args.repeats)
    )
    print()
    print("| one rank's reader rows/s | one rank's training rows/s (2 ranks, in-memory batches) | reader / training |")
    print("|---|---|---|")
    print(f"| {per_rank:,.0f} | {train / 2:,.0f} | {per_rank / (train / 2):.1f} |")


if __name__ == "__main__":
    main()
