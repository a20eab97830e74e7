"""Rating regression and a multi-task rating + click model on MovieLens-100k, against a
user + item bias baseline fitted here.

The protocol of bench/model_quality.py (``data prepare movielens --split time``, each user's last
20% of ratings as test, the same features, MLP widths, optimizers and epochs, 2 gloo ranks) with
the label ``rating`` declared ``type: regression`` (MSE). Baseline: ``rating ~ mu + b_user +
b_item``, ridge-regularized (lambda 5), fitted by alternating exact updates on the training rows.

Multi-task: MMoE and PLE with two tasks, ``rating`` (regression) and ``label`` (rating >= 4,
binary), against the same model trained on each task alone (one label). Each multi-task job runs
with ``train.seed`` 0 .. seeds-1; a row shows the median and each seed's value.

    python bench/movielens_tasks.py [--models dlrm,deepfm] [--epochs 2] [--work /tmp/shardrec-ml-tasks]
                                    [--seeds 3] [--skip-rating-models]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_quality import MODELS, parse_args, prepare, save_job, train_job, write_job  # noqa: E402

RATING = {"name": "rating", "type": "regression"}
TASKS = (("rating", [RATING]), ("click", ["label"]), ("both", [RATING, "label"]))
MULTI_TASK = {"mmoe": {"num_experts": 4, "expert_layer_sizes": [64], "tower_layer_sizes": [32]},
              "ple": {"num_levels": 2, "num_shared_experts": 2, "num_task_experts": 2, "expert_layer_sizes": [64], "tower_layer_sizes": [32]}}


def bias_baseline(train: Path, test: Path, *, lam: float = 5.0, iterations: int = 20) -> float:
    """Test RMSE of mu + b_user + b_item fitted on ``train``."""
    tr, te = pq.read_table(train, columns=["user_id", "movie_id", "rating"]), pq.read_table(test, columns=["user_id", "movie_id", "rating"])
    u, i, r = (tr.column(c).to_numpy() for c in ("user_id", "movie_id", "rating"))
    r = r.astype(np.float64)
    mu = r.mean()
    bu, bi = np.zeros(u.max() + 1 + 10_000), np.zeros(i.max() + 1 + 10_000)
    for _ in range(iterations):
        bi = np.bincount(i, r - mu - bu[u], minlength=bi.size) / (np.bincount(i, minlength=bi.size) + lam)
        bu = np.bincount(u, r - mu - bi[i], minlength=bu.size) / (np.bincount(u, minlength=bu.size) + lam)
    tu, ti, tr_ = (te.column(c).to_numpy() for c in ("user_id", "movie_id", "rating"))
    pred = mu + bu[np.minimum(tu, bu.size - 1)] + bi[np.minimum(ti, bi.size - 1)]
    return float(np.sqrt(np.mean((pred - tr_) ** 2)))


def with_label(path: Path, label: Any, *, name: str, work: Path, model: dict[str, Any] | None = None) -> Path:
    """A copy of job file ``path`` with another label (and model section)."""
    job = yaml.safe_load(path.read_text())
    job["features"]["label"] = label
    if model is not None:
        job["model"] = model
    return save_job(name, job, work=work)


def with_seed(path: Path, seed: int, *, name: str, work: Path) -> Path:
    """A copy of job file ``path`` with ``train.seed`` set to ``seed``."""
    job = yaml.safe_load(path.read_text())
    job["train"]["seed"] = seed
    return save_job(name, job, work=work)


def task_metrics(r: dict[str, Any], tag: str) -> dict[str, float]:
    """Rating RMSE, click AUC and click log loss of one run, for the tasks that ``tag`` trains."""
    out: dict[str, float] = {}
    if tag != "click":
        out["rmse"] = r.get("rmse", r.get("rmse_task0"))
    if tag != "rating":
        out["auc"] = r.get("auc", r.get("auc_task1"))
        out["log_loss"] = r.get("log_loss", r.get("log_loss_task1"))
    return out


def summary(runs: list[dict[str, float]], key: str) -> list[str]:
    """The median over seeds of ``key`` and each seed's value (two empty cells where no run has it)."""
    values = [r[key] for r in runs if key in r]
    if not values:
        return ["", ""]
    return [f"{statistics.median(values):.4f}", ", ".join(f"{v:.4f}" for v in values)]


def rating_models(names: list[str], *, schema: Path, work: Path, epochs: int) -> None:
    """Prints the bias baseline and the table of single-task ranking models on ``rating``."""
    data = yaml.safe_load(schema.read_text())["data"]
    baseline = bias_baseline(Path(data["train_path"]), Path(data["eval_path"]))
    print(f"user + item bias baseline: test RMSE {baseline:.4f}\n")
    print("| model | test RMSE | minus bias baseline | MAE | R² |")
    print("|---|---|---|---|---|")
    for name in names:
        job = with_label(write_job(name, schema=schema, work=work, epochs=epochs), RATING, name=f"{name}_rating", work=work)
        r = train_job(job, run_dir=work / "runs" / job.stem)
        print(f"| {name} | {r['rmse']:.4f} | {r['rmse'] - baseline:+.4f} | {r['mae']:.4f} | {r['r2']:.4f} |", flush=True)
    print()


def multi_task(*, schema: Path, work: Path, epochs: int, seeds: int) -> None:
    """Prints MMoE and PLE on rating alone, click alone and both: medians and per-seed values."""
    print(f"| model | tasks | rating RMSE (median of {seeds}) | seeds | click AUC (median) | seeds | click log loss (median) | seeds |")
    print("|---|---|---|---|---|---|---|---|")
    base = write_job("dlrm", schema=schema, work=work, epochs=epochs)  # the shared protocol's job, model replaced
    for name, section in MULTI_TASK.items():
        model = {"name": name, **section}
        for tag, label in TASKS:
            job = with_label(base, label, name=f"{name}_{tag}", work=work, model=model)
            runs = []
            for seed in range(seeds):
                seeded = with_seed(job, seed, name=f"{job.stem}_seed{seed}", work=work)
                runs.append(task_metrics(train_job(seeded, run_dir=work / "runs" / seeded.stem), tag))
            cells = [c for key in ("rmse", "auc", "log_loss") for c in summary(runs, key)]
            print(f"| {name} | {tag} | {' | '.join(cells)} |", flush=True)


def extra_args(p: argparse.ArgumentParser) -> None:
    """This bench's options beyond the shared ones."""
    p.add_argument("--seeds", type=int, default=3, help="train.seed 0 .. N-1 for every multi-task job")
    p.add_argument("--skip-rating-models", action="store_true", help="skip the single-task ranking models on rating")


def main() -> None:
    args, names = parse_args(__doc__, models=MODELS, epochs=2, work="/tmp/shardrec-ml-tasks", extend=extra_args)
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    schema = prepare(args.input, args.work / "movielens")
    if not args.skip_rating_models:
        rating_models(names, schema=schema, work=args.work, epochs=args.epochs)
    multi_task(schema=schema, work=args.work, epochs=args.epochs, seeds=args.seeds)


if __name__ == "__main__":
    main()
