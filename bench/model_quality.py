"""Test AUC, log loss, training samples/s and parameters of every ranking model on MovieLens-100k.

One protocol for all models (docs/models.md): `shardrec data prepare movielens --split time`
(label rating >= 4, each user's last 20% of ratings as test, the last 50 movies as history; age as
log1p and the history mean-pooled, see ``features``), each
model's own config file with its main MLP set to the same widths, embedding dim 16, the same epochs,
batch and optimizers, 2 gloo ranks. A job file per model is written to ``<work>/jobs/`` and trained
in this process's spawned ranks; ``shardrec train <work>/jobs/<model>.yaml --nproc 2`` trains the same
job through the CLI. Prints a markdown table. Usage:

    python bench/model_quality.py [--models widedeep,din] [--epochs 2] [--work /tmp/shardrec-quality]

The MovieLens folder is ``$SHARDREC_SAMPLE_DATA/movielens100k`` unless ``--input`` names another.
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from shardrec.cli import main as cli_main
from shardrec.data.prepare import resolve_data
from shardrec.data.reader import ParquetReader
from shardrec.data.schema import FeatureSchema
from shardrec.job import JobConfig, load_job
from shardrec.launch.spawn import run_ranks
from shardrec.models import registry
from shardrec.train.dist import init_distributed, shutdown
from shardrec.train.metrics import auc, log_loss
from shardrec.train.quiet import quiet_libraries
from shardrec.train.trainer import DataPaths, TrainResult, Trainer
from shardrec.sharding.shardable import model_tables

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MODELS = ["widedeep", "deepfm", "dlrm", "dcn", "dcnv2", "xdeepfm", "autoint", "masknet", "wukong", "multitower",
          "rocket_launching", "din", "dien", "bst"]
MLP = [64, 32]
# The main MLP of each model, set to MLP (dlrm's over arch ends in its logit); other keys stay as
# in the model's config file.
MLP_KEYS: dict[str, dict[str, Any]] = {
    "widedeep": {"deep_layer_sizes": MLP},
    "deepfm": {"deep_layer_sizes": MLP},
    "dlrm": {"dense_arch_layer_sizes": [32, 16], "over_arch_layer_sizes": [*MLP, 1]},
    "dcn": {"deep_layer_sizes": MLP},
    "dcnv2": {"deep_layer_sizes": MLP},
    "xdeepfm": {"deep_layer_sizes": MLP},
    "autoint": {"deep_layer_sizes": MLP},
    "masknet": {"mlp_layer_sizes": MLP},
    "wukong": {"final_layer_sizes": MLP},
    # The config's groups name Criteo columns; without groups: one sparse and one dense tower.
    "multitower": {"groups": None, "tower_layer_sizes": MLP, "final_layer_sizes": [32]},
    "rocket_launching": {"booster_layer_sizes": MLP, "light_layer_sizes": [32]},
    "din": {"mlp_layer_sizes": MLP},
    "dien": {"mlp_layer_sizes": MLP},
    "bst": {"mlp_layer_sizes": MLP, "norm_first": True, "target_in_mlp": True},
}


def prepare(src: Path, out: Path) -> Path:
    """The converted MovieLens folder's schema.yaml, converting once."""
    schema = out / "schema.yaml"
    if not schema.is_file():
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli_main(["data", "prepare", "movielens", "--input", str(src), "--output", str(out), "--split", "time"])
        if rc != 0:
            raise SystemExit(f"data prepare movielens failed on {src}")
    return schema


def model_section(name: str) -> dict[str, Any]:
    """``configs/<name>.yaml``'s model section with the shared MLP widths."""
    model = dict(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"])
    for key, value in MLP_KEYS[name].items():
        if value is None:
            model.pop(key, None)
        else:
            model[key] = value
    return model


def features(schema: Path) -> dict[str, Any]:
    """The converted schema's features section, changed for every model alike: ``age`` (years, also
    bucketized) as log1p, and mean pooling of the ``movie`` table, which the 50-long history shares
    with ``movie_id`` (one id: its mean is itself). With the converter's raw age and sum pooling,
    models that feed them to a linear, FM or cross term lost up to 0.17 AUC (docs/models.md)."""
    tables = yaml.safe_load(schema.read_text())["features"]["tables"]
    return {
        "dense": [{"name": "age", "fill_missing": 0.0, "transform": "log1p"}],
        "tables": [t | {"pooling": "mean"} if t["name"] == "movie" else t for t in tables],
    }


def write_job(name: str, *, schema: Path, work: Path, epochs: int) -> Path:
    """Writes the job of model ``name`` under the shared protocol; returns its path."""
    job = {
        "include": [str(schema)],
        "features": features(schema),
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


def save_job(name: str, job: dict[str, Any], *, work: Path) -> Path:
    """Writes ``job`` to ``<work>/jobs/<name>.yaml``; returns its path."""
    path = work / "jobs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def parse_args(doc: str, *, models: list[str], epochs: int, work: str,
               extend: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """A quality bench's command line (--models, --epochs, --input, --work, and what ``extend`` adds)
    and the models it names."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(models), help=f"comma-separated; default: all {len(models)}")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--input", type=Path, default=Path(os.environ.get("SHARDREC_SAMPLE_DATA", "../shared/data")) / "movielens100k")
    p.add_argument("--work", type=Path, default=Path(work))
    if extend is not None:
        extend(p)
    args = p.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(models))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {', '.join(models)}")
    return args, names


def parameters(job: JobConfig) -> tuple[int, int]:
    """(embedding, dense) parameter counts of the job's model, built on the meta device."""
    model = registry.build_model(job.model_name, job.model_params, schema=job.features, device=torch.device("meta"))
    embedding = sum(rows * dim for rows, dim in model_tables(model).values())
    return embedding, sum(p.numel() for p in model.parameters()) - embedding


def _rank(job: JobConfig, run_dir: Path) -> TrainResult:
    quiet_libraries()
    ctx = init_distributed(compute_device="cpu")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the plan, printed by every run
            return Trainer(job, ctx=ctx, run_dir=run_dir, data=DataPaths(job.data.train_path or "", job.data.eval_path)).fit()
    finally:
        shutdown()


def train_job(path: Path, *, run_dir: Path, timeout: float = 3600) -> dict[str, Any]:
    """Trains the job file ``path`` on 2 gloo ranks into ``run_dir``: its eval metrics, samples/s,
    parameter counts, wall seconds and path."""
    job = load_job(path, [])
    job = dataclasses.replace(job, data=resolve_data(job.data, job.features))
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = run_ranks(_rank, job, run_dir, world_size=2, timeout=timeout)[0]
    embedding, dense = parameters(job)
    assert result.eval is not None
    return {**result.eval, "samples_per_s": result.samples_per_s, "embedding": embedding, "dense": dense,
            "wall_s": time.perf_counter() - start, "job": path}


class _Logistic(torch.nn.Module):
    """Logistic regression over the features a model reads: one weight per id of every sparse
    feature (mean over a bag of ids), one per dense feature, and a bias."""

    def __init__(self, schema: FeatureSchema) -> None:
        super().__init__()
        self.keys = schema.sparse_names
        self.bags = torch.nn.ModuleList(
            torch.nn.EmbeddingBag(schema.table(f.table).num_embeddings, 1, mode="mean") for f in schema.sparse  # type: ignore[arg-type]
        )
        for bag in self.bags:
            torch.nn.init.zeros_(bag.weight)
        self.dense = torch.nn.Linear(len(schema.dense), 1)

    def forward(self, batch: Any) -> torch.Tensor:
        logit = self.dense(batch.dense_features).squeeze(-1)
        for key, bag in zip(self.keys, self.bags):
            jt = batch.sparse_features[key]
            logit = logit + bag(jt.values(), jt.offsets()[:-1]).squeeze(-1)
        return logit


class _Logistics(torch.nn.Module):
    """One :class:`_Logistic` per label, each initialized as if it were alone (seed 0). Logits ``[B, labels]``."""

    def __init__(self, schema: FeatureSchema) -> None:
        super().__init__()
        regressions = []
        for _ in schema.labels:
            torch.manual_seed(0)
            regressions.append(_Logistic(schema))
        self.regressions = torch.nn.ModuleList(regressions)

    def forward(self, batch: Any) -> torch.Tensor:
        return torch.stack([r(batch) for r in self.regressions], dim=-1)


def logistic_baselines(path: Path, *, epochs: int, lr: float = 0.01) -> dict[str, dict[str, float]]:
    """Test AUC and log loss, per label, of a logistic regression per binary label of the job, on
    its features as its models read them (the same fill, log1p and normalization), trained
    ``epochs`` with Adam in this process. The regressions share the batches and nothing else: each
    starts as it would alone and Adam updates each weight from its own gradient, so each is the
    regression that its label alone would give."""
    job = load_job(path, [])
    data = resolve_data(job.data, job.features)
    schema = job.features.without_raw()
    other = [f"{t.name} ({t.type})" for t in schema.tasks if t.type != "binary"]
    if other:
        raise SystemExit(f"{path}: features.label has non-binary labels {other}; a logistic baseline fits binary labels only")
    model = _Logistics(schema)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for batch in ParquetReader(data.train_path or "", schema=schema, batch_size=job.data.batch_size, epoch=epoch,
                                   shuffle_buffer=job.data.shuffle_buffer, seed=job.train.seed):
            logits = model(batch)
            per_row = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels.reshape(logits.shape), reduction="none")
            loss = per_row.mean(0).sum()  # each label's mean loss, summed
            opt.zero_grad()
            loss.backward()
            opt.step()
    scores, labels = [], []
    with torch.no_grad():
        for batch in ParquetReader(data.eval_path or "", schema=schema, batch_size=4096):
            logits = model(batch)
            scores.append(logits)
            labels.append(batch.labels.reshape(logits.shape))
    s, y = torch.cat(scores), torch.cat(labels)
    return {name: {"auc": auc(s[:, i], y[:, i]), "log_loss": log_loss(s[:, i], y[:, i])} for i, name in enumerate(schema.labels)}


def logistic_baseline(path: Path, *, epochs: int, lr: float = 0.01) -> dict[str, float]:
    """Test AUC and log loss of :func:`logistic_baselines` on a job with one binary label."""
    fits = logistic_baselines(path, epochs=epochs, lr=lr)
    if len(fits) != 1:
        raise SystemExit(f"{path}: features.label names {len(fits)} labels {sorted(fits)}; use logistic_baselines")
    return next(iter(fits.values()))


def run_model(name: str, *, schema: Path, work: Path, epochs: int) -> dict[str, Any]:
    """Trains and evaluates one model; returns its table row."""
    return {"model": name, **train_job(write_job(name, schema=schema, work=work, epochs=epochs), run_dir=work / "runs" / name)}


def main() -> None:
    args, names = parse_args(__doc__, models=MODELS, epochs=2, work="/tmp/shardrec-quality")
    schema = prepare(args.input, args.work / "movielens")
    lr = logistic_baseline(write_job("widedeep", schema=schema, work=args.work, epochs=args.epochs), epochs=args.epochs)
    print(f"logistic regression on the same features (ids one-hot, age log1p): test AUC {lr['auc']:.4f}, "
          f"log loss {lr['log_loss']:.4f}\n")
    print("| model | test AUC | log loss | train samples/s | embedding params | dense params | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        r = run_model(name, schema=schema, work=args.work, epochs=args.epochs)
        print(f"| {name} | {r['auc']:.4f} | {r['log_loss']:.4f} | {r['samples_per_s']:,.0f} | {r['embedding']:,} | "
              f"{r['dense']:,} | {r['wall_s']:.0f} |", flush=True)
    print(f"\ntest rows: {r['rows']:,}; jobs: {args.work / 'jobs'}; "
          f"same job through the CLI: shardrec train {args.work / 'jobs'}/<model>.yaml --nproc 2")


if __name__ == "__main__":
    main()
