"""Peak resident memory of ``shardrec checkpoint export`` on a table bigger than a quarter of RAM.

Writes a DCP checkpoint holding one table (default 30M x 64 fp32 = 7.68 GB) from a single process,
without training, then runs ``python -m shardrec.cli checkpoint export`` on it as a subprocess
with the page cache dropped (where permitted) and reads its peak RSS from ``wait4``. Baselines
in the same run: the peak RSS of a process that only imports torch and the exporter, and ``cp``
of the checkpoint's data file (both timed with the ``sync`` that puts their output on disk). The
exported file is compared with the source values block by block. Usage:

    python bench/export_memory.py [--rows 30000000] [--dim 64] [--repeats 3] [--dir /tmp/shardrec-bench-export]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from checkpoint_throughput import drop_caches  # bench/ is on sys.path when a bench runs

GB = 1e9
BLOCK_ROWS = 1 << 16
KEY = "model.ebc.embedding_bags.big.weight"
"""The table's key inside the checkpoint's "model" entry, laid out as shardrec's trainer writes it."""


def block(index: int, *, rows: int, dim: int) -> torch.Tensor:
    """Rows ``[index * BLOCK_ROWS, ...)`` of the table: random values seeded by the block index."""
    n = min(BLOCK_ROWS, rows - index * BLOCK_ROWS)
    return torch.empty(n, dim).uniform_(-1, 1, generator=torch.Generator().manual_seed(index))


def write_checkpoint(path: Path, *, rows: int, dim: int) -> None:
    """A one-table DCP checkpoint with shardrec's meta.json, filled a block at a time (one copy in memory)."""
    table = torch.empty(rows, dim)
    for i in range((rows + BLOCK_ROWS - 1) // BLOCK_ROWS):
        table[i * BLOCK_ROWS : (i + 1) * BLOCK_ROWS] = block(i, rows=rows, dim=dim)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": {KEY: table}}, checkpoint_id=str(path), no_dist=True)
    (path / "meta.json").write_text(json.dumps({"format": 1, "step": 0, "model": "bench", "world_size": 1}) + "\n")


def run_measured(cmd: list[str], scratch: Path) -> tuple[float, float]:
    """(peak RSS in bytes, wall seconds including a ``sync`` of what it wrote) of running ``cmd``.

    The peak comes from GNU time: a child spawned straight from this (large) process would inherit
    this process's high-water mark in its own ru_maxrss."""
    report = scratch / "time.txt"
    start = time.perf_counter()
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *cmd], check=True)
    os.sync()
    seconds = time.perf_counter() - start
    return int(report.read_text().split()[-1]) * 1024, seconds  # %M is in KiB


def verify(out: Path, *, rows: int, dim: int, blocks: int = 16) -> None:
    """Compares ``blocks`` blocks of the exported table (first, last, spread between) with the source."""
    manifest = json.loads((out / "manifest.json").read_text())
    table = torch.load(out / manifest["tables"]["big"]["file"], mmap=True, weights_only=True)
    assert tuple(table.shape) == (rows, dim) and table.dtype == torch.float32, (table.shape, table.dtype)
    last = (rows - 1) // BLOCK_ROWS
    for i in sorted({round(k * last / (blocks - 1)) for k in range(blocks)}):
        if not torch.equal(table[i * BLOCK_ROWS : (i + 1) * BLOCK_ROWS], block(i, rows=rows, dim=dim)):
            raise AssertionError(f"exported rows of block {i} differ from the checkpoint's")


def measure(ckpt: Path, out: Path, *, rows: int, dim: int) -> dict[str, float]:
    """One repeat: import-only RSS, cold export (RSS, time), cold cp of the data file (time)."""
    cold = drop_caches()
    # Also brings torch's libraries back into the page cache, so the export's time is its reading.
    base_rss, import_s = run_measured([sys.executable, "-c", "import torch, shardrec.cli, shardrec.checkpoint.export_tables"], out.parent)
    rss, export_s = run_measured([sys.executable, "-m", "shardrec.cli", "checkpoint", "export", str(ckpt), "--out", str(out)], out.parent)
    verify(out, rows=rows, dim=dim)
    shutil.rmtree(out)
    (data,) = ckpt.glob("*.distcp")
    drop_caches()
    _, cp_s = run_measured(["cp", str(data), str(out.with_name("copy.distcp"))], out.parent)
    out.with_name("copy.distcp").unlink()
    return {"import_rss": base_rss, "import_s": import_s, "export_rss": rss, "export_s": export_s, "cp_s": cp_s, "cold": float(cold)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=30_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=Path("/tmp/shardrec-bench-export"))
    args = p.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    ckpt, out = args.dir / "step-00000000", args.dir / "export"
    table_bytes = args.rows * args.dim * 4
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        start = time.perf_counter()
        write_checkpoint(ckpt, rows=args.rows, dim=args.dim)
        print(f"table {table_bytes / GB:.2f} GB = {table_bytes / ram:.2f} of RAM ({ram / 2**30:.1f} GiB); "
              f"checkpoint written in {time.perf_counter() - start:.0f} s", flush=True)
        runs = [measure(ckpt, out, rows=args.rows, dim=args.dim) for _ in range(args.repeats)]
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    for r in runs:
        print("repeat:", {k: round(v / 2**20, 1) if k.endswith("rss") else round(v, 2) for k, v in r.items()})
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    cache = "cold" if all(r["cold"] for r in runs) else "page cache NOT dropped"
    print(f"\nmedian of {args.repeats} repeats, reads {cache}; the import alone takes {med['import_s']:.1f} s\n")
    print("| table GB | export peak RSS MiB | import-only RSS MiB | peak RSS / table | (peak - import) / table "
          "| export GB/s | export GB/s less the import time | cp GB/s | export / cp |")
    print("|---|---|---|---|---|---|---|---|---|")
    rate, cp = table_bytes / med["export_s"] / GB, table_bytes / med["cp_s"] / GB
    print(f"| {table_bytes / GB:.2f} | {med['export_rss'] / 2**20:.0f} | {med['import_rss'] / 2**20:.0f} "
          f"| {med['export_rss'] / table_bytes:.4f} | {(med['export_rss'] - med['import_rss']) / table_bytes:.4f} "
          f"| {rate:.2f} | {table_bytes / (med['export_s'] - med['import_s']) / GB:.2f} | {cp:.2f} | {rate / cp:.2f} |")


if __name__ == "__main__":
    main()
