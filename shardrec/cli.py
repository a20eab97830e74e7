"""The ``shardrec`` command: parses arguments and hands typed configs to one builder each."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from shardrec.errors import ShardrecError


def train(args: argparse.Namespace, overrides: list[str]) -> int:
    """``shardrec train [CONFIG] [--nproc N] [--resume [PATH]] [--section.key=value ...]``."""
    from shardrec.data.prepare import resolve_data
    from shardrec.job import load_job
    from shardrec.launch.local import launch
    from shardrec.launch.preflight import Launch, check_job
    from shardrec.sharding.planner import resolve_compute_device
    from shardrec.train import run_dir

    job = load_job(args.config, overrides)
    job = dataclasses.replace(job, data=resolve_data(job.data, job.features))
    resume = run_dir.find_resume(job, args.resume or None) if args.resume is not None else None
    check_job(job, Launch(args.nproc, args.nproc, resolve_compute_device(job.sharding)), resume=resume)
    paths = run_dir.prepare(job, resume=resume)
    print(f"run folder: {paths.run_dir}", flush=True)
    rc = launch(nproc=args.nproc, config=paths.config, run_dir=paths.run_dir, resume=paths.resume)
    if rc == INTERRUPTED:
        last = run_dir.mark_interrupted(paths.run_dir)
        where = f"the latest checkpoint is {last}" if last is not None else "no checkpoint was committed yet"
        print(f"shardrec: interrupted: {where}; continue with: shardrec train --resume {paths.run_dir}", file=sys.stderr)
        return rc
    return _report(paths.run_dir, rc)


INTERRUPTED = 130


def _report(run_dir: Path, rc: int, *, local: bool = True) -> int:
    if rc != 0:
        from shardrec.launch.local import failure

        if local:
            found = failure(run_dir)
            print(f"shardrec: error: training failed: {found.line}", file=sys.stderr)
            return 2 if found.bad_input else 1
        error = run_dir / "error.txt"
        detail = error.read_text().strip() if error.is_file() else "see the log above"
        print(f"shardrec: error: training failed: {detail}", file=sys.stderr)
        return rc
    result = json.loads((run_dir / "result.json").read_text())
    if result["eval"]:
        from shardrec.train.metrics import HEADLINE

        shown = "  ".join(f"{k.replace('_', ' ')}: {result['eval'][k]:.4f}" for k in HEADLINE if k in result["eval"])
        print(f"eval {shown}" if shown else f"eval: {result['eval']}")
    waited = result.get("input")
    if waited:
        verdict = "input-bound: a faster reader would speed it up (data.num_workers, data.prefetch)" if waited["input_bound"] \
            else "not input-bound"
        print(f"input: steps waited {100 * waited['fraction']:.1f}% of their time for batches "
              f"({waited['wait_s']:.1f} s of {waited['step_s']:.1f} s, rank {waited['rank']}): {verdict}")
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def convert_criteo(args: argparse.Namespace, _: list[str]) -> int:
    """``shardrec data criteo --input FILE --output FILE.parquet``."""
    from shardrec.data.criteo_convert import convert_criteo as convert

    stats = convert(Path(args.input), Path(args.output))
    print(f"wrote {args.output}: {stats.rows} rows, {stats.positives} positives")
    return 0


def prepare_dataset(args: argparse.Namespace, overrides: list[str]) -> int:
    """``shardrec data prepare DATASET --input PATH --output DIR [options]``."""
    from shardrec.data.datasets import prepare
    from shardrec.errors import ConfigError

    if overrides:
        raise ConfigError(f"shardrec data prepare takes no --section.key=value overrides, got {overrides[0]!r}")
    names = ("split", "hash_rows", "embedding_dim", "negatives", "seed", "eval_file", "rows", "max_history", "title_tokens",
             "sampled_negatives")
    options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    report = prepare(args.dataset, input=Path(args.input), output=Path(args.output), **options)
    print(report.summary())
    return 0


def data_stats(args: argparse.Namespace, overrides: list[str]) -> int:
    """``shardrec data stats JOB.yaml --out FILE [--section.key=value ...]``: the training data's
    statistics for the job's normalized, mean-filled and quantile-bucketized features."""
    from shardrec.data.feature_stats import compute_stats, write_stats
    from shardrec.data.prepare import resolve_data
    from shardrec.errors import ConfigError
    from shardrec.job import load_job

    job = load_job(Path(args.config), overrides)
    if not job.features.needs_stats:
        raise ConfigError(f"'{args.config}': no feature needs statistics (set normalize, fill_missing: mean or num_buckets "
                          "on a feature first)")
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a folder; pass the path of the file to write, e.g. {out / 'feature_stats.json'}")
    data = resolve_data(job.data, job.features)
    start = time.perf_counter()
    stats = compute_stats(data.train_path, job.features, seed=job.train.seed)  # type: ignore[arg-type]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_stats(out, stats)
    print(f"wrote {out}: {len(stats.dense)} dense and {len(stats.quantiles)} bucketized features over {stats.rows} rows "
          f"of {data.train_path} in {time.perf_counter() - start:.1f} s; use it with data.feature_stats={out}")
    return 0


def synth_dataset(args: argparse.Namespace, overrides: list[str]) -> int:
    """``shardrec data synth --output DIR --rows N [--tables SPEC | --config JOB.yaml] [--processes P] [--files F] ...``."""
    from shardrec.data import synthetic_at_scale as synth
    from shardrec.errors import ConfigError

    if overrides:
        raise ConfigError(f"shardrec data synth takes no --section.key=value overrides, got {overrides[0]!r}")
    shape = synth.IdShape().override(hotness=args.hotness, zipf_a=args.zipf_a)
    layout = synth.load_layout(tables=args.tables, config=args.config, dense=args.dense, shape=shape)
    names = ("files", "processes", "row_group_size", "seed", "label_signal", "compression")
    options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    result = synth.write_dataset(synth.SynthConfig(output=Path(args.output), rows=args.rows, **options), layout)
    print(result.summary())
    return 0


def plan(args: argparse.Namespace, overrides: list[str]) -> int:
    """``shardrec plan [CONFIG | --tables FILE] --topology SPEC [--objective O] [--out plan.json]``."""
    from shardrec.errors import ConfigError
    from shardrec.sharding import plan_job

    if args.compare:
        print(plan_job.compare_files([Path(p) for p in args.compare]))
        return 0
    if (args.config is None) == (args.tables is None):
        raise ConfigError("shardrec plan: give a job CONFIG or --tables FILE (one of them)")
    if args.topology is None:
        raise ConfigError("shardrec plan: --topology is required, e.g. --topology 4x8xH100 or a YAML file")
    source = plan_job.input_from_tables(Path(args.tables)) if args.tables else plan_job.input_from_job(args.config, overrides)
    out = Path(args.out) if args.out else None
    chart = Path(args.chart) if args.chart else (out.with_suffix(".png") if out else None)
    objective = args.objective or source.sharding.objective
    if args.search_seconds is not None:
        source = dataclasses.replace(source, sharding=dataclasses.replace(source.sharding, search_seconds=args.search_seconds))
    plan_job.plan_command(
        source=source, topology=plan_job.read_topology(args.topology), objective=objective, out=out, chart=chart,
        with_default=args.with_default, verbose=args.verbose,
    )
    return 0


def inspect(args: argparse.Namespace, overrides: list[str]) -> int:
    """``shardrec checkpoint inspect PATH [--json]``."""
    from shardrec.checkpoint.store import resolve_resume
    from shardrec.checkpoint.inspection import format_inspection, inspect_checkpoint, inspection_json

    ins = inspect_checkpoint(resolve_resume(Path(args.path)))
    print(inspection_json(ins) if args.json else format_inspection(ins))
    return 0


def reshard(args: argparse.Namespace, _: list[str]) -> int:
    """``shardrec checkpoint reshard PATH --plan NEW.json --out NEW_PATH``."""
    from shardrec.checkpoint.reshard import reshard_checkpoint

    done = reshard_checkpoint(Path(args.path), plan=args.plan, out=args.out)
    print(f"wrote {done['checkpoint']}: {done['tables']} tables laid out as {done['plan']}")
    return 0


def export_tables(args: argparse.Namespace, _: list[str]) -> int:
    """``shardrec checkpoint export PATH --out DIR``."""
    from shardrec.checkpoint.export_tables import export_checkpoint

    manifest = export_checkpoint(Path(args.path), args.out)
    print(f"wrote {args.out}: {len(manifest['tables'])} tables, {len(manifest['dense']['tensors'])} dense tensors, "
          f"step {manifest['step']}")
    return 0


def export_serving(args: argparse.Namespace, _: list[str]) -> int:
    """``shardrec export CHECKPOINT --out DIR [--quantize int8|int4|fp16|none] [--table-quantize TABLE=KIND ...]``."""
    from shardrec.errors import ConfigError
    from shardrec.serving.export_model import export_model
    from shardrec.serving.config import ExportConfig

    pairs = [item.partition("=") for item in args.table_quantize]
    if any(not sep for _, sep, _ in pairs):
        raise ConfigError(f"--table-quantize takes TABLE=KIND, got {args.table_quantize}")
    cfg = ExportConfig(checkpoint=Path(args.checkpoint), out=args.out, quantize=args.quantize, config=args.config,
                       table_quantize={t: q for t, _, q in pairs})
    manifest = export_model(cfg)
    print(f"wrote {args.out}: model {manifest['model']} at step {manifest['step']}, {len(manifest['tables'])} tables, "
          f"files {', '.join(manifest['files'].values())}")
    return 0


def predict(args: argparse.Namespace, _: list[str]) -> int:
    """``shardrec predict --model DIR --data PATH --out FILE.parquet --id-column NAME``."""
    from shardrec.serving.predict import predict as run_predict
    from shardrec.serving.config import PredictConfig

    cfg = PredictConfig(model=args.model, data=args.data, out=args.out, id_column=args.id_column, batch_size=args.batch_size,
                        progress_bar=not args.no_progress)
    print(run_predict(cfg).summary())
    return 0


def submit(args: argparse.Namespace, overrides: list[str]) -> int:
    """``shardrec submit [CONFIG] --scheduler S [-j NxM] [--gpu N ...] [--cfg KEY=VALUE ...] [--dryrun]``."""
    from shardrec.launch import cluster

    launch = cluster.LaunchConfig(
        scheduler=args.scheduler, j=args.j, cpu=args.cpu, gpu=args.gpu, mem_mb=args.mem_mb, image=args.image,
        env=cluster.parse_env(args.env), mounts=args.mount, max_restarts=args.max_restarts, rdzv_port=args.rdzv_port,
        scheduler_args=args.cfg,
    )
    sub = cluster.prepare(args.config, overrides, launch, dryrun=args.dryrun)
    if args.dryrun:
        print(cluster.dryrun_text(sub), end="")
        return 0
    print(f"run folder: {sub.run_dir}", flush=True)
    handle = cluster.submit(sub)
    print(f"app handle: {handle}", flush=True)
    if not (args.wait or cluster.SCHEDULERS[launch.scheduler].in_process):
        return 0
    final = cluster.follow(handle, nodes=launch.nodes)
    print(cluster.format_status(handle, final))
    return _report(sub.run_dir, 0 if cluster.succeeded(final) else 1, local=False)


def job_status(args: argparse.Namespace, _: list[str]) -> int:
    """``shardrec status HANDLE``."""
    from shardrec.launch import cluster

    print(cluster.format_status(args.handle, cluster.status(args.handle)))
    return 0


def job_logs(args: argparse.Namespace, _: list[str]) -> int:
    """``shardrec logs HANDLE [--node K] [--follow]``."""
    from shardrec.launch import cluster

    nodes = [args.node] if args.node is not None else range(cluster.replicas(args.handle))
    for k in nodes:
        for line in cluster.logs(args.handle, replica=k, tail=args.follow):
            print(line, end="")
    return 0


def job_cancel(args: argparse.Namespace, _: list[str]) -> int:
    """``shardrec cancel HANDLE``."""
    from shardrec.launch import cluster

    cluster.cancel(args.handle)
    print(f"{args.handle}: cancel requested")
    return 0


def _cluster_parsers(sub: argparse._SubParsersAction) -> None:
    """``shardrec submit|status|logs|cancel`` (torchx; docs/launch.md)."""
    s = sub.add_parser("submit", help="run a job through torchx on local_cwd, local_docker, slurm or kubernetes")
    s.add_argument("config", nargs="?", type=Path, help="YAML job file (no CONFIG: the embedded default job)")
    s.add_argument("--scheduler", "-s", default="local_cwd", help="local_cwd (default), local_docker, slurm or kubernetes")
    s.add_argument("-j", default="1x2", metavar="NODESxPROCS", help="nodes x ranks per node; default 1x2")
    s.add_argument("--gpu", type=int, default=0, help="GPUs per node (one per rank)")
    s.add_argument("--cpu", type=int, help="CPUs per node (schedulers that reserve them)")
    s.add_argument("--mem-mb", type=int, help="memory per node in MB (schedulers that reserve it)")
    s.add_argument("--image", help="container image with shardrec installed (local_docker, kubernetes)")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of every rank (repeatable)")
    s.add_argument("--mount", action="append", default=[], metavar="SPEC", help="type=bind,src=HOST,dst=PATH[,readonly] or type=volume,src=NAME,dst=PATH (repeatable)")
    s.add_argument("--max-restarts", type=int, default=0, help="restarts after a rank fails, each from the latest checkpoint; default 0")
    s.add_argument("--rdzv-port", type=int, default=29500, help="rendezvous port on the first node (multi-node); default 29500")
    s.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE", help="scheduler option, as torchx's -cfg (repeatable), e.g. queue=default")
    s.add_argument("--dryrun", action="store_true", help="print the AppDef and the scheduler's request (sbatch script, manifest); submit nothing")
    s.add_argument("--wait", action="store_true", help="follow the logs until the job ends (always so on local_cwd)")
    s.set_defaults(func=submit)
    for name, func, help_ in (("status", job_status, "state of a submitted job, with the root cause of a failure"),
                              ("logs", job_logs, "log lines of a submitted job"), ("cancel", job_cancel, "stop a submitted job")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("handle", help="the app handle submit printed, e.g. slurm://shardrec/1234")
        c.set_defaults(func=func)
        if name == "logs":
            c.add_argument("--node", type=int, help="only this node (replica); default every node")
            c.add_argument("--follow", action="store_true", help="keep printing until the job ends")


def _checkpoint_parser(sub: argparse._SubParsersAction) -> None:
    """``shardrec checkpoint inspect|reshard|export``."""
    c = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(dest="checkpoint_command", required=True)
    i = c.add_parser("inspect", help="tables, shapes, sharding, bytes, step and job of a checkpoint (offline)")
    i.add_argument("path", help="a checkpoints/step-N folder, or a run folder (its latest checkpoint)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=inspect)
    r = c.add_parser("reshard", help="rewrite a checkpoint for another plan (offline; optimizer state converted)")
    r.add_argument("path", help="a checkpoints/step-N folder, or a run folder (its latest checkpoint)")
    r.add_argument("--plan", type=Path, required=True, help="plan file of the new layout (shardrec plan --out)")
    r.add_argument("--out", type=Path, required=True, help="folder of the new checkpoint (must not exist)")
    r.set_defaults(func=reshard)
    e = c.add_parser("export", help="one plain tensor file per table, streamed (offline)")
    e.add_argument("path", help="a checkpoints/step-N folder, or a run folder (its latest checkpoint)")
    e.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")
    e.set_defaults(func=export_tables)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    """``shardrec train``."""
    t = sub.add_parser("train", help="train a job (no CONFIG: the embedded default job)")
    t.add_argument("config", nargs="?", type=Path, help="YAML job file")
    t.add_argument("--nproc", type=int, default=2, help="local processes (ranks); default 2")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH", help="continue the latest run, or the run/checkpoint at PATH")
    t.set_defaults(func=train)


def tune(args: argparse.Namespace, overrides: list[str]) -> int:
    """``shardrec tune JOB --space SPACE [...]``: a hyperparameter search on Ray Tune (docs/tune.md)."""
    from shardrec.config import load_yaml
    from shardrec.tune import search

    out = args.out
    if out is None:
        if args.resume:
            print("shardrec: error: --resume needs --out, the sweep folder to continue", file=sys.stderr)
            return 2
        root = Path(load_yaml(args.config).get("run", {}).get("root", "runs"))
        out = root / "tune" / time.strftime("%Y%m%d-%H%M%S")
    sweep = search.prepare(args.config, args.space, out=out, scheduler=args.scheduler, search=args.search,
                           samples=args.samples, nproc=args.nproc, metric=args.metric, mode=args.mode, overrides=overrides)
    print(f"sweep folder: {out}", flush=True)
    rows = search.run(sweep, address=args.address, resume=args.resume, max_concurrent=args.max_concurrent)
    print(f"\nresults ({sweep.metric}, {sweep.mode}; best first):")
    print(search.results_table(rows, sweep))
    print(f"results: {out / 'results.csv'}, {out / 'results.json'}")
    if (out / "best.yaml").is_file():
        print(f"best job: {out / 'best.yaml'} (shardrec train {out / 'best.yaml'})")
        return 0
    failed = next((r["error"] for r in rows if r["error"]), None)
    print(f"shardrec: error: no trial reported an evaluation{f' (first failure: {failed})' if failed else ''}; "
          f"see the trials' train.log under {out / 'trials'}", file=sys.stderr)
    return 1


def _tune_parser(sub: argparse._SubParsersAction) -> None:
    """``shardrec tune``."""
    t = sub.add_parser("tune", help="hyperparameter search over a job on Ray Tune")
    t.add_argument("config", type=Path, help="YAML job file")
    t.add_argument("--space", type=Path, required=True, help="YAML file: job key -> {loguniform|uniform|randint|choice|grid: ...}")
    t.add_argument("--samples", type=int, default=4, help="trials to sample (each grid point this many times); default 4")
    t.add_argument("--scheduler", choices=["fifo", "asha", "median"], default="asha", help="trial stopping; default asha")
    t.add_argument("--search", choices=["random", "optuna"], default="random", help="random/grid, or Optuna's TPE; default random")
    t.add_argument("--metric", help="eval metric to optimize; default the job's headline (auc, rmse, accuracy, ndcg@k)")
    t.add_argument("--mode", help="min or max (with --metric)")
    t.add_argument("--nproc", type=int, default=2, help="ranks per trial (CPUs Ray reserves for it); default 2")
    t.add_argument("--max-concurrent", type=int, help="trials at once; default as many as the CPUs allow")
    t.add_argument("--address", help="a running Ray cluster (auto, ray://host:10001); default an embedded local Ray")
    t.add_argument("--out", type=Path, help="sweep folder; default <run.root>/tune/<timestamp>")
    t.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --out")
    t.set_defaults(func=tune)


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    """``shardrec plan``."""
    pl = sub.add_parser("plan", help="plan shards for a hardware topology (no GPU needed)")
    pl.add_argument("config", nargs="?", type=Path, help="YAML job file (tables taken from its model)")
    pl.add_argument("--tables", help="table list: YAML with 'tables:' or CSV name,rows,dim[,pooling_factor,...]")
    pl.add_argument("--topology", help="NODESxDEVICESxKIND (4x8xH100; kinds H100, H200, A100-40GB, A100-80GB, L4, CPU) or a YAML file")
    pl.add_argument("--objective", choices=["balanced", "perf", "memory", "default"], help="default: the job's sharding.objective, else balanced")
    pl.add_argument("--out", help="write the plan (JSON, usable as --sharding.plan) here")
    pl.add_argument("--chart", help="write a PNG of memory and time per device here (default: next to --out)")
    pl.add_argument("--with-default", action="store_true", help="also run torchrec's default planner on large inputs (slow)")
    pl.add_argument("--search-seconds", type=float, help="time budget of the search (sharding.search_seconds; default 30)")
    pl.add_argument("-v", "--verbose", action="store_true", help="also show torchrec's known repeated planner warnings")
    pl.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="show two plan files side by side")
    pl.set_defaults(func=plan)


def _data_parser(sub: argparse._SubParsersAction) -> None:
    """``shardrec data criteo|prepare|stats|synth``."""
    d = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    c = d.add_parser("criteo", help="convert Criteo text (TSV/CSV) to Parquet")
    c.add_argument("--input", required=True)
    c.add_argument("--output", required=True)
    c.set_defaults(func=convert_criteo)
    pr = d.add_parser("prepare", help="convert a public dataset to Parquet plus schema.yaml (features and data sections)")
    pr.add_argument("dataset", help="criteo, movielens, movielens_funnel, census, aliccp or amazon")
    pr.add_argument("--input", required=True, help="the raw data: a file or folder, as the dataset expects")
    pr.add_argument("--output", required=True, help="folder to create (must not exist)")
    pr.add_argument("--split", help="movielens: time (default) or leave_last_out")
    pr.add_argument("--hash-rows", type=int, help="criteo: rows of each hashed table; default 2x distinct ids")
    pr.add_argument("--embedding-dim", type=int, help="width of every table; default 16")
    pr.add_argument("--negatives", type=int, help="amazon, movielens_funnel: negative samples per positive; default 1")
    pr.add_argument("--rows", help="movielens: rating (a row per rating, default) or user (a train and an eval row per user)")
    pr.add_argument("--max-history", type=int, help="movielens: movies kept in each history; default 50")
    pr.add_argument("--title-tokens", type=int, help="movielens: tokens per title for text features (HLLM); default 0: none")
    pr.add_argument("--sampled-negatives", type=int, help="movielens: ids drawn per batch for a sampled softmax; default 0: none")
    pr.add_argument("--seed", type=int, help="seed of random splits, shuffles and negative sampling; default 0")
    pr.add_argument("--eval-file", help="criteo: the day file to hold out for eval; default the last one")
    pr.set_defaults(func=prepare_dataset)
    st = d.add_parser("stats", help="compute the training data's feature statistics (normalize, fill_missing: mean, num_buckets)")
    st.add_argument("config", help="the job YAML (its features and data.train_path)")
    st.add_argument("--out", required=True, help="the JSON file to write; a job reads it with data.feature_stats")
    st.set_defaults(func=data_stats)
    sy = d.add_parser("synth", help="write a large synthetic Parquet data set plus schema.yaml, in parallel")
    sy.add_argument("--output", required=True, help="folder to create (must not exist, or be empty)")
    sy.add_argument("--rows", required=True, type=int, help="rows in all")
    src = sy.add_mutually_exclusive_group()
    src.add_argument("--tables", help="COUNTxROWS[:DIM[:HOTNESS[:ZIPF_A]]],... or a .yaml/.csv of name, rows, dim, hotness, zipf_a; default 26x100000:16")
    src.add_argument("--config", type=Path, help="job YAML whose features: section the data follow")
    sy.add_argument("--dense", type=int, help="dense columns next to --tables; default 13")
    sy.add_argument("--hotness", help="ids per row where a table does not say: N (exactly) or ~N (on average); default 1")
    sy.add_argument("--zipf-a", type=float, help="power-law exponent where a table does not say; default 1.2")
    sy.add_argument("--files", type=int, help="Parquet files (the data depend on it, not on --processes); default 8")
    sy.add_argument("--processes", type=int, help="processes writing files in parallel; default 1")
    sy.add_argument("--row-group-size", type=int, help="rows per row group; default 65536")
    sy.add_argument("--seed", type=int, help="default 0")
    sy.add_argument("--label-signal", action=argparse.BooleanOptionalAction, help="labels follow a planted, learnable logit (default) or are coin flips")
    sy.add_argument("--compression", choices=["none", "snappy", "lz4", "zstd"], help="default snappy")
    sy.set_defaults(func=synth_dataset)


def _serving_parser(sub: argparse._SubParsersAction) -> None:
    """``shardrec export|predict``."""
    e = sub.add_parser("export", help="a checkpoint as a quantized TorchScript model plus manifest, for serving")
    e.add_argument("checkpoint", help="a checkpoints/step-N folder, or a run folder (its latest checkpoint)")
    e.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")
    e.add_argument("--quantize", default=None,
                   help="table weights: int8, int4, fp16 or none (float32); default: as trained (fp16 tables fp16, others none)")
    e.add_argument("--table-quantize", action="append", default=[], metavar="TABLE=KIND", help="one table's weights (repeatable)")
    e.add_argument("--config", type=Path, help="job file of the model; default the checkpoint's config.yaml")
    e.set_defaults(func=export_serving)
    p = sub.add_parser("predict", help="score Parquet rows with an exported model")
    p.add_argument("--model", type=Path, required=True, help="folder written by shardrec export")
    p.add_argument("--data", required=True, help="Parquet file, folder, glob or URL")
    p.add_argument("--out", type=Path, required=True, help="Parquet file to write")
    p.add_argument("--id-column", required=True, help="column of the data written next to the scores")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per forward; default 4096")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=predict)


def parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="shardrec", description="Train recommendation models with sharded embedding tables.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _tune_parser, _plan_parser, _data_parser, _checkpoint_parser, _serving_parser, _cluster_parsers):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shardrec`` console script."""
    args, rest = parser().parse_known_args(argv)
    unknown = [a for a in rest if not (a.startswith("--") and "=" in a)]
    if unknown:
        print(f"shardrec: error: unrecognized arguments {unknown}; config overrides look like --section.key=value", file=sys.stderr)
        return 2
    try:
        return args.func(args, [a[2:] for a in rest])
    except ShardrecError as e:
        print(f"shardrec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
