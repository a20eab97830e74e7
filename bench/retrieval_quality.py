"""HR@10, NDCG@10 (and Recall@50, MRR) of every retrieval model on MovieLens-100k, full ranking.

One protocol for all models (docs/models.md): leave-last-out per user (each user's last rating is
the test item, ranked against all 1,682 movies of the catalogue; nothing excluded), embedding dim
16, the same epochs, optimizers and learning rates, 2 gloo ranks. Two layouts of the same training
ratings:

* sequential models (sasrec, gru4rec, hstu, hllm) read one row per user (``--rows user``, the last
  200 movies) and learn every next movie of it, as their papers train;
* the others read one row per rating (the last 50 movies as history): with as many (history, next
  movie) pairs per epoch as the per-user rows give.

Each model reads only the features its item and user sides need: the rated movie's genres and
title tokens describe the item, so only item towers (DSSM's genres, HLLM's titles) read them
(YouTubeDNN and MIND list genres in ``ignored_features``); a user tower that saw them would see
the answer. A job file per model is written to ``<work>/jobs/``;
``shardrec train <work>/jobs/<model>.yaml --nproc 2`` trains the same job through the CLI. Usage:

    python bench/retrieval_quality.py [--models sasrec,hstu] [--epochs 10] [--work /tmp/shardrec-retrieval]
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

from model_quality import CONFIGS, parse_args, save_job, train_job  # bench/ is on sys.path when a bench runs
from shardrec.cli import main as cli_main

SEQUENTIAL = ["sasrec", "gru4rec", "hstu", "hllm"]
OTHERS = ["youtubednn", "dssm", "mind", "comirec_dr", "comirec_sa"]
MODELS = SEQUENTIAL + OTHERS
NEGATIVES = 128
# Features each model reads besides the item id and the history: item-side attributes only where
# an item tower reads them.
ITEM_SIDE = {"dssm": ["genres"], "hllm": ["title_tokens", "hist_title_tokens"]}
USER_SIDE = ["user_id", "age_bucket", "gender", "occupation", "zip3"]
# Rows per rank: a user row holds ~100 next-movie pairs, a rating row one; an epoch is the same
# training ratings either way.
USER_BATCH, RATING_BATCH = 16, 256
# HLLM's item transformer, trained from scratch, collapses every item onto one vector with the
# others' 0.05 on its token table (its config uses 0.01).
SPARSE_LR = {"hllm": 0.01}


def prepare(src: Path, out: Path, *, sequential: bool) -> Path:
    """The converted folder's schema.yaml, converting once."""
    schema = out / "schema.yaml"
    if not schema.is_file():
        layout = ["--rows", "user", "--max-history", "200", "--title-tokens", "8"] if sequential else []
        argv = ["data", "prepare", "movielens", "--input", str(src), "--output", str(out), "--split", "leave_last_out",
                "--sampled-negatives", str(NEGATIVES), *layout]
        with contextlib.redirect_stdout(io.StringIO()):
            if cli_main(argv) != 0:
                raise SystemExit(f"data prepare movielens failed on {src}")
    return schema


def features(name: str, schema: Path, model: dict[str, Any]) -> dict[str, Any]:
    """The schema's features cut to what model ``name`` (config section ``model``) reads."""
    full = yaml.safe_load(schema.read_text())["features"]
    keep = {"movie_id", "hist_movie_ids", "hist_timestamps", "timestamp", *ITEM_SIDE.get(name, [])}
    if model.get("loss", {}).get("kind", "in_batch") in ("sampled", "bpr"):
        keep.add("neg_movie_ids")
    if name not in SEQUENTIAL:
        # genres stays: DSSM's item tower reads it, YouTubeDNN and MIND list it in ignored_features.
        keep |= {*USER_SIDE, "genres"}
    sparse = [f for f in full["sparse"] if f["name"] in keep]
    used = {f.get("table") for f in sparse}
    return {**full, "sparse": sparse, "tables": [t for t in full["tables"] if t["name"] in used],
            "dense": full["dense"] if name not in SEQUENTIAL else []}


def write_job(name: str, *, schema: Path, work: Path, epochs: int) -> Path:
    """Writes the job of model ``name`` under the shared protocol; returns its path."""
    model = dict(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"])
    job = {
        "include": [str(schema)],
        "features": features(name, schema, model),
        "model": model,
        "data": {"batch_size": USER_BATCH if name in SEQUENTIAL else RATING_BATCH},
        "train": {
            "steps": None, "epochs": epochs, "progress_bar": False, "seed": 0,
            "sparse_optimizer": {"name": "rowwise_adagrad", "lr": SPARSE_LR.get(name, 0.05)},
            "dense_optimizer": {"name": "adam", "lr": 0.001},
            "retrieval": {"ks": [10, 50], "export_items": False},
        },
        "checkpoint": {"enabled": False},
        "run": {"root": str(work / "runs")},
    }
    return save_job(name, job, work=work)


def run_model(name: str, *, schema: Path, work: Path, epochs: int) -> dict[str, Any]:
    """Trains and evaluates one model; returns its table row."""
    return {"model": name, **train_job(write_job(name, schema=schema, work=work, epochs=epochs), run_dir=work / "runs" / name)}


def popularity_row(schema: Path) -> dict[str, float]:
    """The most-rated movies of the training ratings, the same list for every user: the baseline."""
    data = yaml.safe_load(schema.read_text())["data"]
    counts = np.bincount(pq.read_table(data["train_path"], columns=["movie_id"])["movie_id"].to_numpy())
    ranked = np.argsort(-counts, kind="stable")[:50]
    targets = pq.read_table(data["eval_path"], columns=["movie_id"])["movie_id"].to_numpy()
    pos = {int(m): i for i, m in enumerate(ranked)}
    ranks = np.array([pos.get(int(t), 10**9) for t in targets])
    return {"hr@10": float((ranks < 10).mean()), "ndcg@10": float(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0).mean()),
            "recall@50": float((ranks < 50).mean()), "mrr": float(np.where(ranks < 50, 1 / (ranks + 1), 0).mean())}


def main() -> None:
    args, names = parse_args(__doc__, models=MODELS, epochs=10, work="/tmp/shardrec-retrieval")
    print("| model | layout | HR@10 | NDCG@10 | Recall@50 | MRR | train rows/s | embedding params | dense params | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = popularity_row(prepare(args.input, args.work / "movielens_rating", sequential=False))
    print(f"| popularity (baseline) | rating | {base['hr@10']:.4f} | {base['ndcg@10']:.4f} | {base['recall@50']:.4f} | "
          f"{base['mrr']:.4f} | - | - | - | - |", flush=True)
    for name in names:
        sequential = name in SEQUENTIAL
        schema = prepare(args.input, args.work / ("movielens_user" if sequential else "movielens_rating"), sequential=sequential)
        r = run_model(name, schema=schema, work=args.work, epochs=args.epochs)
        print(f"| {name} | {'user' if sequential else 'rating'} | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | {r['recall@50']:.4f} | "
              f"{r['mrr']:.4f} | {r['samples_per_s']:,.0f} | {r['embedding']:,} | {r['dense']:,} | {r['wall_s']:.0f} |", flush=True)
    print(f"\ntest users: {r['rows']:,}, items ranked: {r['items']:,}; jobs: {args.work / 'jobs'}; "
          f"same job through the CLI: shardrec train {args.work / 'jobs'}/<model>.yaml --nproc 2")


if __name__ == "__main__":
    main()
