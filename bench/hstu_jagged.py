"""HSTU's jagged attention against its padded one: time and peak memory of one training step
(forward and backward of the whole model, lookups included) on histories of heavy-tailed lengths.

History lengths are drawn from a Zipf (power-law) distribution over 1..``--max-len`` whose exponent
is solved so the mean is ``--mean`` (50 and 2,000 by default: a few users with thousands of events,
most with a few dozen). The padded model pads every row to ``max_len``, as it pads in training.
Both models have the same weights and see the same batches.

- Time: the median over ``--repeats`` of a step's wall time, the two kinds interleaved in this
  process (one thread each), a warm-up step first.
- Peak memory: each kind in a fresh process: its peak resident set (``VmHWM``) minus its
  resident set just before its first step, over ``--repeats`` steps.

Usage:

    python bench/hstu_jagged.py [--batch 32] [--mean 50] [--max-len 2000] [--repeats 5] [--block 32,64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import DenseFeature, FeatureSchema, NegativeSampling, SparseFeature, TableConfig
from shardrec.models import registry

ITEMS = 100_000
DIM = 64


def zipf_exponent(mean: float, max_len: int) -> float:
    """The exponent ``a`` of ``p(k) ~ k^-a`` over ``1..max_len`` whose mean is ``mean`` (bisection)."""
    k = np.arange(1, max_len + 1, dtype=np.float64)
    lo, hi = 0.0, 4.0
    for _ in range(100):
        a = (lo + hi) / 2
        p = k ** -a
        if (k * p).sum() / p.sum() > mean:
            lo = a
        else:
            hi = a
    return (lo + hi) / 2


def draw_lengths(rng: np.random.Generator, *, batch: int, mean: float, max_len: int) -> np.ndarray:
    """``batch`` history lengths from the truncated Zipf of :func:`zipf_exponent`."""
    k = np.arange(1, max_len + 1)
    p = k ** -zipf_exponent(mean, max_len)
    return rng.choice(k, size=batch, p=p / p.sum())


def schema(max_len: int) -> FeatureSchema:
    sparse = [
        SparseFeature(name="item_id", table="item"),
        SparseFeature(name="history", table="item", sequence=True, max_len=max_len),
        SparseFeature(name="hist_ts", raw=True, sequence=True, max_len=max_len),
        SparseFeature(name="ts", raw=True),
        SparseFeature(name="neg_item_ids", table="item", negatives=NegativeSampling(num=128, of="item_id")),
    ]
    return FeatureSchema(dense=[DenseFeature(name="d0", fill_missing=0.0)], sparse=sparse,
                         tables=[TableConfig(name="item", num_embeddings=ITEMS, embedding_dim=DIM)])


def batch(lengths: np.ndarray, rng: np.random.Generator) -> KeyedJaggedTensor:
    """A KJT of histories of ``lengths`` with random items, increasing timestamps and 128 negatives."""
    b, total = len(lengths), int(lengths.sum())
    gaps = rng.integers(1, 100_000, total + b)
    times = [np.cumsum(g) for g in np.split(gaps, np.cumsum(lengths + 1)[:-1])]
    parts = [
        (rng.integers(1, ITEMS, b), np.ones(b)),
        (rng.integers(1, ITEMS, total), lengths),
        (np.concatenate([t[:-1] for t in times]), lengths),
        (np.array([t[-1] for t in times]), np.ones(b)),
        (rng.integers(1, ITEMS, 128), np.r_[128, np.zeros(b - 1)]),
    ]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "history", "hist_ts", "ts", "neg_item_ids"],
        values=torch.from_numpy(np.concatenate([v for v, _ in parts]).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate([n for _, n in parts]).astype(np.int32)),
    )


def build(kind: str, *, max_len: int, block: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {"num_heads": 2, "num_blocks": 2, "dropout": 0.0, "attention": kind, "block_size": block}
    return registry.build_model("hstu", config, schema=schema(max_len), device=torch.device("cpu")).train()


def step(model: torch.nn.Module, kjt: KeyedJaggedTensor, rows: int) -> float:
    """One forward and backward; its wall time in seconds."""
    start = time.perf_counter()
    out = model(torch.zeros(rows, 1), kjt)
    logits = out.user @ torch.cat([out.item, out.negatives]).T
    torch.nn.functional.cross_entropy(logits / 0.05, torch.arange(logits.size(0))).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def batches(args: argparse.Namespace) -> list[tuple[KeyedJaggedTensor, np.ndarray]]:
    rng = np.random.default_rng(args.seed)
    out = []
    for _ in range(args.repeats + 1):
        lengths = draw_lengths(rng, batch=args.batch, mean=args.mean, max_len=args.max_len)
        out.append((batch(lengths, rng), lengths))
    return out


def memory_child(args: argparse.Namespace, kind: str, block: int) -> dict[str, Any]:
    """In a fresh process: peak RSS growth over the steps of ``kind``."""
    torch.set_num_threads(1)
    model = build(kind, max_len=args.max_len, block=block)
    data = batches(args)
    before = status_kib("VmRSS")
    for kjt, lengths in data:
        step(model, kjt, len(lengths))
    return {"peak_mib": (status_kib("VmHWM") - before) / 1024}


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` size in KiB (``VmHWM``, the peak resident set, is this program's own:
    ``ru_maxrss`` would carry the forking parent's peak across ``exec``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def peak_memory(args: argparse.Namespace, kind: str, block: int) -> float:
    cmd = [sys.executable, __file__, "--child", kind, "--child-block", str(block), "--batch", str(args.batch),
           "--mean", str(args.mean), "--max-len", str(args.max_len), "--repeats", str(args.repeats), "--seed", str(args.seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mean", type=float, default=50.0)
    parser.add_argument("--max-len", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block", default="32,64", help="jagged block sizes to measure, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-block", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(memory_child(args, args.child, args.child_block)))
        return
    torch.set_num_threads(1)
    blocks = [int(b) for b in args.block.split(",")]
    data = batches(args)
    all_lengths = np.concatenate([n for _, n in data[1:]])
    print(f"lengths: Zipf exponent {zipf_exponent(args.mean, args.max_len):.3f} over 1..{args.max_len}; the "
          f"{len(all_lengths)} timed rows have mean {all_lengths.mean():.1f}, median {np.median(all_lengths):.0f}, "
          f"max {all_lengths.max()}; batch {args.batch}; sum L_i^2 / (B x max_len^2) = "
          f"{(all_lengths.astype(float) ** 2).sum() / (len(all_lengths) * args.max_len ** 2):.4f}")
    kinds = [("padded", 32)] + [("jagged", b) for b in blocks]
    models = {k: build(k[0], max_len=args.max_len, block=k[1]) for k in kinds}
    times: dict[tuple[str, int], list[float]] = {k: [] for k in kinds}
    for i, (kjt, lengths) in enumerate(data):
        for k in kinds:
            t = step(models[k], kjt, len(lengths))
            if i:
                times[k].append(t)
    padded_s = statistics.median(times[("padded", 32)])
    padded_mib = peak_memory(args, "padded", 32)
    print("\n| attention | step s (median) | step vs padded | peak memory MiB | memory vs padded |")
    print("|---|---|---|---|---|")
    print(f"| padded to {args.max_len} | {padded_s:.3f} | 1 | {padded_mib:,.0f} | 1 |")
    for k in kinds[1:]:
        s, mib = statistics.median(times[k]), peak_memory(args, *k)
        print(f"| jagged, block {k[1]} | {s:.4f} | {s / padded_s:.4f} ({padded_s / s:.0f}x faster) | {mib:,.0f} | "
              f"{mib / padded_mib:.4f} |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
