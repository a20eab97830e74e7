"""The training job: sharded model, pipelined loop, periodic evaluation, checkpoints, metrics."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipeline
from tqdm import tqdm

from shardrec.data.batch import Batch
from shardrec.data.feature_stats import STATS_FILE, FeatureStats, apply_stats, compute_stats, read_stats, write_stats
from shardrec.data.schema import FeatureSchema
from shardrec.data.negatives import NegativeSampler
from shardrec.data.reader import ParquetReader
from shardrec.data.sources import resolve
from shardrec.errors import ConfigError, DataError, ShardrecError
from shardrec.job import JobConfig, dump_job
from shardrec.models import registry
from shardrec.checkpoint import store as checkpoint
from shardrec.train.dist import DistContext
from shardrec.train.running_stats import sync_running_stats
from shardrec.train.weight_init import init_dense, init_tables
from shardrec.train.metrics import HEADLINE, MetricsLog, eval_metrics
from shardrec.train.optim import build_optimizer, init_optimizer_state
from shardrec.checkpoint.warm_start import warm_start
from shardrec.train.rng import rng_states, set_rng_states
from shardrec.train.schedule import LRSchedule
from shardrec.checkpoint.async_saver import Saver
from shardrec.train.pipeline import eval_model, make_pipeline, resume_training
from shardrec.train.retrieval_eval import embed_catalogue, evaluate_retrieval
from shardrec.data.catalogue import Catalogue, read_catalogue, write_item_embeddings
from shardrec.sharding.plan_file import load_plan
from shardrec.sharding.objectives import collective_plan_for_objective
from shardrec.sharding.planner import format_plan, half_tables, plan_rows, save_plan, topology_spec
from shardrec.sharding.shardable import check_precision, meta_model
from shardrec.sharding.sharders import default_sharders


@dataclass
class TrainResult:
    """What a finished run reports."""

    step: int
    eval: dict[str, float] | None
    checkpoint: Path | None
    losses: list[float]
    samples_per_s: float
    """Global training samples/s over the steps after the first WARMUP_STEPS of this process."""
    input_wait: InputWait | None = None
    """How long the training steps waited for their batches (the slowest rank's share)."""


WARMUP_STEPS = 10
INPUT_BOUND = 0.1
"""A run whose steps spend more than this share of their time waiting for the next batch is
reported input-bound: a faster reader (``data.num_workers``, ``data.prefetch``) would speed it up."""


@dataclass
class InputWait:
    """Time the training loop spent waiting for batches, against the loop's whole time (evaluations
    and checkpoints left out), on the rank that waited the largest share."""

    wait_s: float
    step_s: float
    rank: int

    @property
    def fraction(self) -> float:
        return self.wait_s / self.step_s if self.step_s > 0 else 0.0

    @property
    def bound(self) -> bool:
        return self.fraction > INPUT_BOUND

    def to_json(self) -> dict[str, Any]:
        return {"wait_s": round(self.wait_s, 3), "step_s": round(self.step_s, 3), "fraction": round(self.fraction, 4),
                "rank": self.rank, "input_bound": self.bound}


class TimedBatches:
    """An iterator over batches that adds up the time spent waiting in ``next``: reading and
    decoding when the reader works in the caller's thread, waiting on its queue otherwise."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self._batches = batches
        self.wait_s = 0.0

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> Batch:
        start = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self.wait_s += time.perf_counter() - start


@dataclass
class DataPaths:
    """Resolved training and evaluation data: local paths or fsspec URLs."""

    train: str
    eval: str | None


class Trainer:
    """Builds the sharded model and runs the loop; one instance per rank."""

    def __init__(self, job: JobConfig, *, ctx: DistContext, run_dir: Path, data: DataPaths) -> None:
        self.job, self.ctx, self.run_dir, self.data = job, ctx, run_dir, data
        self.log = MetricsLog(run_dir / "metrics.jsonl", enabled=ctx.is_main,
                              tensorboard=run_dir / "tensorboard" if job.train.tensorboard else None)
        self.features = self.feature_schema()
        self.model = self.build_model()
        self.optimizer = build_optimizer(
            self.model, dense=job.train.dense_optimizer, sparse=job.train.sparse_optimizer, world_size=ctx.world_size
        )
        self.step = 0
        self.current_reader: ParquetReader | None = None
        self._per_epoch: int | None = None
        self.schedule: LRSchedule | None = None
        self.retrieval = registry.get(job.model_name).retrieval
        self.catalogue: Catalogue | None = None
        # The item catalogue's ids and columns: read at the first evaluation, kept for the others.
        self._catalogue_rows: tuple[torch.Tensor, pa.Table] | None = None
        self.sampler = (
            NegativeSampler(job.features, train_files=[f.key() for f in resolve(data.train)[0]], seed=job.train.seed, rank=ctx.rank)
            if NegativeSampler.active(job.features) else None
        )
        cfg = job.checkpoint
        self.saver = Saver(
            run_dir / "checkpoints", is_main=ctx.is_main, keep_last_n=cfg.keep_last_n, asynchronous=cfg.async_save,
            timeout_s=job.train.timeout_s,
        )

    def feature_schema(self) -> FeatureSchema:
        """The schema the readers get: the job's, with the training data's statistics where its
        features need them. Rank 0 reads them from the run folder (a resumed run), from
        ``data.feature_stats``, or computes them in one pass, writes them into the run folder and
        sends them to the other ranks."""
        schema = self.job.features
        if not schema.needs_stats:
            return schema
        path = self.run_dir / STATS_FILE
        box: list[Any] = [None]
        if self.ctx.is_main:
            try:
                box[0] = self._main_stats(path).to_json()
            except ShardrecError as e:
                box[0] = {"error": str(e), "kind": type(e).__name__}
                self._send(box)
                raise
        self._send(box)
        if "error" in box[0]:
            raise (DataError if box[0]["kind"] == "DataError" else ConfigError)(box[0]["error"])
        return apply_stats(schema, FeatureStats.from_json(box[0], where=str(path)), where=f"'{path}'")

    def _main_stats(self, path: Path) -> FeatureStats:
        given = self.job.data.feature_stats
        if path.is_file():
            return read_stats(path)
        if given is not None:
            stats = read_stats(Path(given))
            apply_stats(self.job.features, stats, where=f"data.feature_stats '{given}'")
        else:
            start = time.perf_counter()
            stats = compute_stats(self.data.train, self.job.features, seed=self.job.train.seed)
            print(f"feature statistics: {stats.rows} training rows read in {time.perf_counter() - start:.1f} s -> {path}", flush=True)
        write_stats(path, stats)
        return stats

    def _send(self, box: list[Any]) -> None:
        if torch.distributed.is_initialized() and self.ctx.world_size > 1:
            torch.distributed.broadcast_object_list(box, src=0)

    def build_model(self) -> DistributedModelParallel:
        """Builds on meta, plans, shards and initializes the model independently of the plan."""
        job, ctx = self.job, self.ctx
        check_precision(job.train.precision, ctx.device)
        meta = meta_model(job, device_type=ctx.device.type)
        module, tables = meta.module, meta.tables
        spec = topology_spec(
            job.sharding, world_size=ctx.world_size, local_world_size=ctx.local_world_size, batch_size=job.data.batch_size
        )
        sharders = default_sharders()
        if job.sharding.plan is not None:
            plan = load_plan(
                Path(job.sharding.plan), tables=tables, world_size=ctx.world_size, compute_device=spec.compute_device,
                local_world_size=ctx.local_world_size, half=half_tables(module),
            )
        else:
            plan = collective_plan_for_objective(
                module, pg=torch.distributed.GroupMember.WORLD, cfg=job.sharding, tables=tables, topology=spec,
                objective=job.sharding.objective, sharders=sharders,
            ).plan
        if ctx.is_main:
            rows = plan_rows(plan, tables)
            print("sharding plan:\n" + format_plan(rows), flush=True)
            save_plan(rows, spec, self.run_dir / "plan.json")
        model = DistributedModelParallel(module, device=ctx.device, plan=plan, sharders=sharders)
        init_dense(model, seed=job.train.seed)
        init_tables(model, seed=job.train.seed, tables=tables)
        return model

    def reader(self, *, start_batch: int = 0, epoch: int = 0) -> ParquetReader:
        """A reader of this rank's share of the training data, at ``start_batch`` of ``epoch``."""
        data = self.job.data
        return ParquetReader(
            self.data.train,
            schema=self.features,
            batch_size=data.batch_size,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            start_batch=start_batch,
            epoch=epoch,
            prefetch=data.prefetch,
            num_workers=data.num_workers,
            worker_kind=data.worker_kind,
            pin_memory=data.pin_memory and self.ctx.device.type == "cuda",
            shuffle_buffer=data.shuffle_buffer,
            seed=self.job.train.seed,
            on_bad_rows=data.on_bad_rows,
        )

    def eval_reader(self) -> ParquetReader:
        """This rank's share of the evaluation data, in file order, read in this process."""
        assert self.data.eval is not None
        data = self.job.data
        return ParquetReader(
            self.data.eval, schema=self.features, batch_size=data.eval_batch_size or data.batch_size,
            rank=self.ctx.rank, world_size=self.ctx.world_size, prefetch=data.prefetch,
        )

    def total_steps(self) -> int:
        """Steps of the whole run, from ``train.steps`` or ``train.epochs``."""
        if self.job.train.steps is not None:
            return self.job.train.steps
        return self.job.train.epochs * self.batches_per_epoch()  # type: ignore[operator]

    def batches_per_epoch(self) -> int:
        """Batches of one epoch on each rank."""
        if self._per_epoch is None:
            self._per_epoch = len(self.reader())
        return self._per_epoch

    def batches(self, start_step: int) -> Iterator[Batch]:
        """Training batches from step ``start_step`` on, epoch after epoch, on the host: the
        pipeline copies each to the device itself (on its own stream with sparse_dist).

        The reader's position follows from the step alone (epoch, batch within it), and its shuffle
        from (seed, epoch): a resumed run sees exactly the batches an uninterrupted one would.
        """
        per_epoch = self.batches_per_epoch()
        epoch, offset = divmod(start_step, per_epoch)
        step = start_step
        while True:
            self.current_reader = self.reader(start_batch=offset, epoch=epoch)
            for batch in self.current_reader:
                step += 1
                yield batch if self.sampler is None else self.sampler.fill(batch, step)
            epoch, offset = epoch + 1, 0

    def warm_start(self) -> None:
        """Initializes from ``checkpoint.warm_start`` (a new run: the step stays 0)."""
        cfg = self.job.checkpoint.warm_start
        assert cfg is not None
        if cfg.optimizer:
            init_optimizer_state(self.optimizer)
        warm_start(cfg, model=self.model, optimizer=self.optimizer, warn=self.ctx.is_main)
        if self.ctx.is_main:
            print(f"warm start from {cfg.path}", flush=True)

    def resume(self, path: Path) -> None:
        """Loads model, optimizers and step from checkpoint ``path``."""
        init_optimizer_state(self.optimizer)
        meta = checkpoint.load(path, model=self.model, optimizer=self.optimizer, warn=self.ctx.is_main)
        self.step = int(meta["step"])
        self._restore_rank_state(path, meta)
        # The times this node's torchrun restarted its ranks (0 on a node restarted for another
        # node's failure); the record dates a recovery.
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.log.write("resume", step=self.step, checkpoint=str(path), restarts=restarts)
        if self.ctx.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _restore_rank_state(self, path: Path, meta: dict[str, Any]) -> None:
        """RNG states when the world size is the checkpoint's; notes when the data position is recomputed."""
        saved_world = int(meta.get("world_size", self.ctx.world_size))
        own = checkpoint.rank_file(path, self.ctx.rank)
        if saved_world == self.ctx.world_size and own.is_file():
            set_rng_states(torch.load(own, weights_only=True)["rng"])
        elif self.ctx.is_main:
            print(f"note: random generators start afresh: checkpoint '{path}' has the states of {saved_world} ranks, "
                  f"this launch has {self.ctx.world_size}", flush=True)
        data = meta.get("data")
        here = {"batch_size": self.job.data.batch_size, "world_size": self.ctx.world_size}
        if data is not None and {k: data.get(k) for k in here} != here and self.ctx.is_main:
            print(f"note: checkpoint '{path}' read the data with batch size {data.get('batch_size')} on "
                  f"{data.get('world_size')} ranks; the position now follows from step {self.step} in batches of "
                  f"{here['batch_size']} on {here['world_size']} ranks", flush=True)

    def fit(self) -> TrainResult:
        """Trains to the configured number of steps, evaluating and checkpointing on schedule."""
        total = self.total_steps()
        pipeline = make_pipeline(self.job.train.pipeline, model=self.model, optimizer=self.optimizer, device=self.ctx.device)
        data = TimedBatches(itertools.islice(self.batches(self.step), total - self.step))
        loop_start, paused = time.perf_counter(), 0.0
        self.schedule = LRSchedule(self.job.train.lr_schedule, optimizer=self.optimizer, model=self.model, total_steps=total)
        progress = _Progress(self, total=total)
        last_ckpt: Path | None = None
        result_eval: dict[str, float] | None = None
        self.model.train()
        while self.step < total:
            self.schedule.apply(self.step + 1)
            loss, _, labels = pipeline.progress(data)
            self.step += 1
            progress.update(loss, labels.shape[0] * self.ctx.world_size)
            if self._due(self.job.train.eval_interval) and self.step < total:
                t = time.perf_counter()
                result_eval = self.evaluate(pipeline)
                paused += time.perf_counter() - t
            if self._due(self.job.checkpoint.interval) and self.step < total:
                t = time.perf_counter()
                last_ckpt = self.save()
                paused += time.perf_counter() - t
        progress.close()
        rate = progress.measured()
        input_wait = self._input_wait(data.wait_s, time.perf_counter() - loop_start - paused)
        if self.data.eval is not None:
            result_eval = self.evaluate(pipeline)
            self._export_items()
        if self.job.checkpoint.enabled:
            last_ckpt = self.save()
        self.saver.close()
        self.log.close()
        return TrainResult(
            step=self.step, eval=result_eval, checkpoint=last_ckpt, losses=progress.losses(), samples_per_s=rate,
            input_wait=input_wait,
        )

    def _input_wait(self, wait_s: float, step_s: float) -> InputWait:
        """The rank whose steps waited the largest share of their time for batches (same on every rank)."""
        mine = torch.tensor([wait_s / step_s if step_s > 0 else 0.0, wait_s, step_s, float(self.ctx.rank)],
                            dtype=torch.float64, device=self.ctx.device)
        if torch.distributed.is_initialized() and self.ctx.world_size > 1:
            everyone = [torch.zeros_like(mine) for _ in range(self.ctx.world_size)]
            torch.distributed.all_gather(everyone, mine)
            mine = max(everyone, key=lambda t: float(t[0]))
        mine = mine.cpu()
        return InputWait(wait_s=float(mine[1]), step_s=float(mine[2]), rank=int(mine[3]))

    def _attachments(self) -> dict[str, str]:
        """Texts every checkpoint carries: this run's resolved job, its plan and its feature statistics."""
        texts = {"config.yaml": dump_job(self.job)}
        for name in ("plan.json", STATS_FILE):
            if (self.run_dir / name).is_file():
                texts[name] = (self.run_dir / name).read_text()
        return texts

    def _due(self, interval: int) -> bool:
        return interval > 0 and self.step % interval == 0

    @torch.no_grad()
    def evaluate(self, pipeline: TrainPipeline) -> dict[str, float] | None:
        """Each task's metrics over the evaluation data of every rank (binary: AUC and log loss;
        regression: RMSE, MAE, R²; multiclass: accuracy, log loss, top-3 accuracy; retrieval
        models: recall, hit rate, NDCG and MRR at k over the item catalogue)."""
        if self.data.eval is None:
            return None
        sync_running_stats(self.model)
        model = eval_model(pipeline)
        model.eval()
        if self.retrieval:
            metrics = self._evaluate_retrieval(model)
            model.train()
            resume_training(pipeline)
            return metrics
        batches = self.eval_reader()
        logits, labels = [], []
        for batch in itertools.islice(batches, self.job.train.eval_batches):
            _, (_, out, lab) = model(batch.to(self.ctx.device))
            logits.append(out.float())
            labels.append(lab.float())
        model.train()
        resume_training(pipeline)
        metrics = eval_metrics(torch.cat(logits), torch.cat(labels), self.job.features.tasks)
        self.log.write("eval", step=self.step, **metrics)
        if self.ctx.is_main:
            shown = " ".join(f"{k} {metrics[k]:.4f}" for k in HEADLINE if k in metrics)
            tqdm.write(f"step {self.step}: eval {shown}")
        return metrics

    def _evaluate_retrieval(self, model: nn.Module) -> dict[str, float]:
        job = self.job
        cfg = job.train.retrieval
        # DMP -> TrainModule -> the zoo model, whose sharded collections run eagerly once detached.
        retrieval_model = model.module.model
        assert job.data.items_path is not None
        if self._catalogue_rows is None:
            self._catalogue_rows = read_catalogue(job.data.items_path, self.features, item_feature=retrieval_model.item_feature)
        self.catalogue = embed_catalogue(retrieval_model, *self._catalogue_rows, job.features, batch_size=cfg.item_batch_size,
                                         device=self.ctx.device, where=job.data.items_path)
        batches = itertools.islice(self.eval_reader(), job.train.eval_batches)
        metrics = evaluate_retrieval(retrieval_model, batches, self.catalogue, cfg, device=self.ctx.device)
        self.log.write("eval", step=self.step, **metrics)
        if self.ctx.is_main:
            shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "@" in k or k == "mrr")
            tqdm.write(f"step {self.step}: eval {shown} ({metrics['rows']} rows, {metrics['items']} items)")
        return metrics

    def _export_items(self) -> None:
        """Writes the last evaluation's item vectors for an ANN index (rank 0)."""
        if self.catalogue is not None and self.job.train.retrieval.export_items and self.ctx.is_main:
            path = self.run_dir / "item_embeddings.parquet"
            write_item_embeddings(path, self.catalogue)
            print(f"item embeddings: {path} ({len(self.catalogue.ids)} items)", flush=True)

    def save(self) -> Path | None:
        """Writes a checkpoint of the current step."""
        if not self.job.checkpoint.enabled:
            return None
        sync_running_stats(self.model)
        per_epoch = self.batches_per_epoch()
        data = {"epoch": self.step // per_epoch, "batch": self.step % per_epoch, "batches_per_epoch": per_epoch,
                "batch_size": self.job.data.batch_size, "world_size": self.ctx.world_size}
        return self.saver.save(
            step=self.step,
            model=self.model,
            optimizer=self.optimizer,
            meta={"model": self.job.model_name, "world_size": self.ctx.world_size, "epoch": data["epoch"], "data": data,
                  **({"lr_schedule": self.schedule.state_dict()} if self.schedule is not None else {})},
            attach=self._attachments(),
            rank_state={"rng": rng_states()},
        )


class _Progress:
    """Progress bar, metrics records and throughput of one training run."""

    def __init__(self, trainer: Trainer, *, total: int) -> None:
        self.trainer = trainer
        self.interval = trainer.job.train.log_interval
        show = trainer.ctx.is_main and trainer.job.train.progress_bar
        self.bar = tqdm(total=total, initial=trainer.step, disable=not show, unit="step", mininterval=1.0)
        self._losses: list[torch.Tensor] = []
        self.start = time.perf_counter()
        self.samples = 0
        self.warm = (self.start, 0)

    def update(self, loss: torch.Tensor, samples: int) -> None:
        """Records one finished step; reads the loss off the device only every ``log_interval`` steps."""
        self._losses.append(loss.detach())
        self.samples += samples
        if len(self._losses) == WARMUP_STEPS:
            self.warm = (time.perf_counter(), self.samples)
        self.bar.update(1)
        if self.trainer.step % self.interval == 0:
            recent = float(torch.stack(self._losses[-self.interval :]).mean())
            rate = self.samples / (time.perf_counter() - self.start)
            self.bar.set_postfix(loss=f"{recent:.4f}", samples_s=f"{rate:,.0f}")
            extra = {}
            reader = self.trainer.current_reader
            if reader is not None and self.trainer.job.data.on_bad_rows == "skip":
                extra["skipped_rows"] = reader.skipped_rows  # this epoch's, on this rank
            factor = self.trainer.schedule.factor if self.trainer.schedule is not None else 1.0
            train = self.trainer.job.train
            self.trainer.log.write("train", step=self.trainer.step, loss=recent, samples_per_s=rate,
                                   lr_dense=train.dense_optimizer.lr * factor, lr_sparse=train.sparse_optimizer.lr * factor, **extra)

    def losses(self) -> list[float]:
        """Every step's loss on this rank."""
        return [float(x) for x in self._losses]

    def measured(self) -> float:
        """Global samples/s after the warm-up steps (or over all steps of a short run)."""
        return (self.samples - self.warm[1]) / max(time.perf_counter() - self.warm[0], 1e-9)

    def close(self) -> None:
        """Closes the progress bar."""
        self.bar.close()


def summary(result: TrainResult) -> dict[str, Any]:
    """A JSON-friendly summary of ``result``."""
    return {"step": result.step, "eval": result.eval, "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "samples_per_s": result.samples_per_s,
            "input": result.input_wait.to_json() if result.input_wait is not None else None}
