"""Test AUC at each precision: fp32, bf16 compute, fp16 tables, and both, over 3 seeds (issue #22).

``--settings`` picks them (default all, with the ``fp32 without data_parallel`` control).

Jobs, each on 2 gloo ranks:

* ``default``: the embedded default job (``shardrec train`` with no config: DLRM on Criteo-shaped
  synthetic data, 300 steps), its checkpoints off;
* ``deepfm`` and ``dcn``: the MovieLens-100k jobs of ``bench/model_quality.py`` (time split, 2
  epochs), the protocol of docs/models.md.

Each (job, seed) is trained in every precision one after another, so the settings are interleaved
and share the seed's initialization (``train.seed``) and data order. Prints each seed's AUC, the
median over seeds, and the median of the per-seed differences from fp32. Usage:

    SHARDREC_SAMPLE_DATA=../shared/data python bench/precision_quality.py [--seeds 0,1,2] [--jobs default,deepfm,dcn]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

import yaml

from model_quality import prepare, save_job, train_job, write_job  # bench/ is on sys.path when a bench runs
from shardrec.job import default_job_text

PRECISIONS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"train": {"precision": "bf16"}},
    "fp16 tables": {"features": {"table_precision": "fp16"}},
    "bf16 + fp16 tables": {"train": {"precision": "bf16"}, "features": {"table_precision": "fp16"}},
    # A control: fp16 tables are never data-parallel, so their small tables move from the dense
    # optimizer (Adam) to the fused one (row-wise Adagrad); this fp32 run makes the same move.
    "fp32 without data_parallel": {"sharding": {"default": {"sharding_types": [
        "table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise"]}}},
}


def job_dict(name: str, *, schema: Path | None, work: Path) -> dict[str, Any]:
    """The job ``name`` as a dict, before the seed and precision are set."""
    if name == "default":
        job = yaml.safe_load(default_job_text())
        job["checkpoint"] = {"enabled": False}
        job["sharding"] = {"compute_device": "cpu"}
        job["train"].update({"progress_bar": False, "tensorboard": False})
        job["run"] = {"root": str(work / "runs")}
        return job
    assert schema is not None
    return yaml.safe_load(write_job(name, schema=schema, work=work, epochs=2).read_text())


def with_setting(job: dict[str, Any], *, seed: int, setting: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in job.items()}
    out["train"] = {**out["train"], "seed": seed, "tensorboard": False}
    for section, values in setting.items():
        out[section] = {**out.get(section, {}), **values}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", default="default,deepfm,dcn")
    p.add_argument("--settings", default=",".join(PRECISIONS), help="comma-separated names of PRECISIONS (fp32 is always run)")
    p.add_argument("--input", type=Path, default=Path(os.environ.get("SHARDREC_SAMPLE_DATA", "../shared/data")) / "movielens100k")
    p.add_argument("--work", type=Path, default=Path("/tmp/shardrec-precision-quality"))
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    settings = {"fp32": PRECISIONS["fp32"], **{k: PRECISIONS[k.strip()] for k in args.settings.split(",") if k.strip()}}
    schema = prepare(args.input, args.work / "movielens") if any(j != "default" for j in jobs) else None
    auc: dict[tuple[str, str], list[float]] = {}
    for name in jobs:
        base = job_dict(name, schema=schema, work=args.work)
        for seed in seeds:
            for label, setting in settings.items():
                tag = f"{name}-s{seed}-{label.replace(' ', '').replace('+', '_').replace(',', '_')}"
                path = save_job(tag, with_setting(base, seed=seed, setting=setting), work=args.work)
                r = train_job(path, run_dir=args.work / "runs" / tag)
                auc.setdefault((name, label), []).append(r["auc"])
                print(f"{name} seed {seed} {label}: AUC {r['auc']:.4f}, {r['samples_per_s']:,.0f} samples/s", flush=True)
    print(f"\nseeds {seeds}; load average after: {os.getloadavg()[0]:.2f}")
    print("| job | precision | test AUC per seed | median | median diff from fp32 (per seed) |")
    print("|---|---|---|---|---|")
    for name in jobs:
        ref = auc[(name, "fp32")]
        for label in settings:
            values = auc[(name, label)]
            diff = statistics.median(v - r for v, r in zip(values, ref))
            print(f"| {name} | {label} | {', '.join(f'{v:.4f}' for v in values)} | {statistics.median(values):.4f} | "
                  f"{diff:+.4f} |")


if __name__ == "__main__":
    main()
