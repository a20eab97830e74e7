"""Click AUC, conversion AUC, log loss, training samples/s and parameters of the five multi-task
models on the MovieLens-100k funnel, against a logistic regression per task fitted in the same run.

One protocol for all models, the one of bench/model_quality.py: `shardrec data prepare
movielens_funnel` (every rating an impression with click 1, one sampled unrated movie per rating
with click 0, conversion = rating >= 4; each user's last 20% of ratings, with their sampled movies,
as test), each model's own config file with its MLPs set to the same widths (a 64-wide shared
layer or expert and a 32-wide tower, or 64-32 towers where the model has towers only), embedding
dim 16, the same epochs, batch and optimizers, equal task weights, 2 gloo ranks. A job file per
model is written to ``<work>/jobs/`` and trained in this process's spawned ranks;
``shardrec train <work>/jobs/<model>.yaml --nproc 2`` trains the same job through the CLI. The
baseline: one logistic regression per label on the same features as the models read them
(bench/model_quality.py's ``logistic_baselines``: one weight per id, dense features as
normalized), the same epochs and batch, Adam in this process. Prints a markdown table. Usage:

    python bench/multitask_quality.py [--models mmoe,esmm] [--epochs 2] [--work /tmp/shardrec-mtl]

The MovieLens folder is ``$SHARDREC_SAMPLE_DATA/movielens100k`` unless ``--input`` names another.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import yaml

from model_quality import CONFIGS, logistic_baselines, parse_args, save_job, train_job  # bench/ is on sys.path when a bench runs
from shardrec.cli import main as cli_main

MODELS = ["sharedbottom", "mmoe", "ple", "esmm", "aitm"]
SHARED, TOWER = [64], [32]
# Every model's MLPs at the same widths; other keys stay as in the model's config file.
MLP_KEYS: dict[str, dict[str, Any]] = {
    "sharedbottom": {"bottom_layer_sizes": SHARED, "tower_layer_sizes": TOWER},
    "mmoe": {"expert_layer_sizes": SHARED, "tower_layer_sizes": TOWER},
    "ple": {"expert_layer_sizes": SHARED, "tower_layer_sizes": TOWER},
    "esmm": {"tower_layer_sizes": SHARED + TOWER},
    "aitm": {"tower_layer_sizes": SHARED + TOWER},
}


def prepare(src: Path, out: Path) -> Path:
    """The converted funnel folder's schema.yaml, converting once."""
    schema = out / "schema.yaml"
    if not schema.is_file():
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli_main(["data", "prepare", "movielens_funnel", "--input", str(src), "--output", str(out)])
        if rc != 0:
            raise SystemExit(f"data prepare movielens_funnel failed on {src}")
    return schema


def model_section(name: str) -> dict[str, Any]:
    """``configs/<name>.yaml``'s model section with the shared MLP widths and equal task weights."""
    model = dict(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"])
    return model | MLP_KEYS[name] | {"task_weights": None}


def write_job(name: str, *, schema: Path, work: Path, epochs: int) -> Path:
    """Writes the job of model ``name`` under the shared protocol; returns its path."""
    job = {
        "include": [str(schema)],
        "model": model_section(name),
        "data": {"batch_size": 256},
        "train": {
            "steps": None, "epochs": epochs, "progress_bar": False, "seed": 0,
            "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.05},
            "dense_optimizer": {"name": "adam", "lr": 0.001},
        },
        "checkpoint": {"enabled": False},
        "run": {"root": str(work / "runs")},
    }
    return save_job(name, job, work=work)


def run_model(name: str, *, schema: Path, work: Path, epochs: int) -> dict[str, Any]:
    """Trains and evaluates one model; returns its table row."""
    r = train_job(write_job(name, schema=schema, work=work, epochs=epochs), run_dir=work / "runs" / name)
    return {"model": name, "click_auc": r["auc_task0"], "conversion_auc": r["auc_task1"], **r}


def lr_row(path: Path, *, epochs: int) -> dict[str, float]:
    """The logistic regressions' click AUC, conversion AUC, log loss of each and their mean."""
    fits = logistic_baselines(path, epochs=epochs)
    c, v = fits["click"], fits["conversion"]
    return {"click_auc": c["auc"], "conversion_auc": v["auc"], "click_log_loss": c["log_loss"],
            "conversion_log_loss": v["log_loss"], "log_loss": (c["log_loss"] + v["log_loss"]) / 2}


def main() -> None:
    args, names = parse_args(__doc__, models=MODELS, epochs=2, work="/tmp/shardrec-mtl")
    schema = prepare(args.input, args.work / "movielens_funnel")
    lr = lr_row(write_job("sharedbottom", schema=schema, work=args.work, epochs=args.epochs), epochs=args.epochs)
    print(f"logistic regression per task on the same features: click AUC {lr['click_auc']:.4f} (log loss "
          f"{lr['click_log_loss']:.4f}), conversion AUC {lr['conversion_auc']:.4f} (log loss {lr['conversion_log_loss']:.4f})\n")
    print("| model | click AUC | minus LR | conversion AUC | minus LR | log loss | minus LR | train samples/s | "
          "parameters (dense) | command |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| logistic regression | {lr['click_auc']:.4f} | | {lr['conversion_auc']:.4f} | | {lr['log_loss']:.4f} | | | | |")
    for name in names:
        r = run_model(name, schema=schema, work=args.work, epochs=args.epochs)
        conversion = f"{r['conversion_auc']:.4f}" + (" ¹" if name == "esmm" else "")
        print(f"| {name} | {r['click_auc']:.4f} | {r['click_auc'] - lr['click_auc']:+.4f} | {conversion} | "
              f"{r['conversion_auc'] - lr['conversion_auc']:+.4f} | {r['log_loss']:.4f} | {r['log_loss'] - lr['log_loss']:+.4f} | "
              f"{r['samples_per_s']:,.0f} | {r['embedding'] + r['dense']:,} ({r['dense']:,}) | "
              f"`shardrec train {r['job']} --nproc 2` |", flush=True)
    print(f"\n¹ ESMM's second output is pCTCVR = pCTR * pCVR, so its conversion AUC is the CTCVR AUC over every "
          f"impression (conversion implies click in the funnel, so the labels are the same).\n"
          f"Log loss: the mean of the two tasks'. Test rows: {r['rows']:,}; {args.epochs} epochs, batch 256 per rank, "
          f"2 gloo ranks, embedding dim 16.")


if __name__ == "__main__":
    main()
