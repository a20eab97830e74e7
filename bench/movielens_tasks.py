"""Rating regression and a multi-task rating + click model on MovieLens-100k, against a
user + item bias baseline fitted here.

The protocol of bench/model_quality.py (``data prepare movielens --split time``, each user's last
20% of ratings as test, the same features, MLP widths, optimizers and epochs, 2 gloo ranks) with
the label ``rating`` declared ``type: regression`` (MSE). Baseline: ``rating ~ mu + b_user +
b_item``, ridge-regularized (lambda 5), fitted by alternating exact updates on the training rows.

Multi-task: MMoE and PLE with two tasks, ``rating`` (regression) and ``label`` (rating >= 4,
binary), against the same model trained on each task alone (one label).

    python bench/movielens_tasks.py [--models dlrm,deepfm] [--epochs 2] [--work /tmp/shardrec-ml-tasks]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_quality import MODELS, parse_args, prepare, save_job, train_job, write_job  # noqa: E402

RATING = {"name": "rating", "type": "regression"}
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


def main() -> None:
    args, names = parse_args(__doc__, models=MODELS, epochs=2, work="/tmp/shardrec-ml-tasks")
    schema = prepare(args.input, args.work / "movielens")
    data = yaml.safe_load(schema.read_text())["data"]
    baseline = bias_baseline(Path(data["train_path"]), Path(data["eval_path"]))
    print(f"user + item bias baseline: test RMSE {baseline:.4f}\n")
    print("| model | test RMSE | minus bias baseline | MAE | R² |")
    print("|---|---|---|---|---|")
    for name in names:
        job = with_label(write_job(name, schema=schema, work=args.work, epochs=args.epochs), RATING, name=f"{name}_rating", work=args.work)
        r = train_job(job, run_dir=args.work / "runs" / job.stem)
        print(f"| {name} | {r['rmse']:.4f} | {r['rmse'] - baseline:+.4f} | {r['mae']:.4f} | {r['r2']:.4f} |", flush=True)
    print("\n| model | tasks | rating RMSE | click AUC | click log loss |")
    print("|---|---|---|---|---|")
    base = write_job("dlrm", schema=schema, work=args.work, epochs=args.epochs)  # the shared protocol's job, model replaced
    for name, section in MULTI_TASK.items():
        model = {"name": name, **section}
        for tag, label in (("rating", [RATING]), ("click", ["label"]), ("both", [RATING, "label"])):
            job = with_label(base, label, name=f"{name}_{tag}", work=args.work, model=model)
            r = train_job(job, run_dir=args.work / "runs" / job.stem)
            rmse = r.get("rmse", r.get("rmse_task0"))
            auc = r.get("auc", r.get("auc_task1")) if tag != "rating" else None
            loss = r.get("log_loss", r.get("log_loss_task1")) if tag != "rating" else None
            shown = [f"{x:.4f}" if x is not None else "" for x in (rmse if tag != "click" else None, auc, loss)]
            print(f"| {name} | {tag} | {' | '.join(shown)} |", flush=True)


if __name__ == "__main__":
    main()
