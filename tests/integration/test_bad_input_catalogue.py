"""The bad-input catalogue: what a user gets wrong in the first week, through the real CLI.

Every case asserts the exit code, that stderr is one ``shardrec: error:`` line naming the key or
file and a fix, with no traceback, and that nothing was half-written (no run folder, output folder
or committed checkpoint the failure should have prevented).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from helpers import tiny_job_dict
from shardrec.cli import main as cli_main


@dataclass(frozen=True)
class World:
    """Files every case may start from: a tiny job and its data, a run with a checkpoint, an
    exported model and a plan file of the job."""

    root: Path
    job: dict
    job_file: Path
    run: Path
    checkpoint: Path
    export: Path
    plan: Path

    def write_job(self, name: str, **changes: dict) -> Path:
        job = json.loads(json.dumps(self.job))
        for section, values in changes.items():  # a new model replaces the section, others merge
            job[section] = values if section == "model" else {**job.get(section, {}), **values}
        path = self.root / name
        path.write_text(yaml.safe_dump(job))
        return path

    def data(self, name: str, edit: Callable[[pa.Table], pa.Table]) -> Path:
        path = self.root / name
        pq.write_table(edit(pq.read_table(self.root / "train.parquet")), path, row_group_size=1024)
        return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("catalogue")
    job = tiny_job_dict(root, steps=2, checkpoint={"enabled": True})
    job_file = root / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    assert cli_main(["train", str(job_file), "--nproc", "1"]) == 0
    (run,) = (root / "runs" / "dlrm").iterdir()
    shutil.move(str(root / "runs"), str(root / "trained"))  # cases start with no run folder at all
    run = root / "trained" / "dlrm" / run.name
    checkpoint = run / "checkpoints" / "step-00000002"
    export = root / "exported"
    assert cli_main(["export", str(checkpoint), "--out", str(export)]) == 0
    plan = root / "plan.json"
    assert cli_main(["plan", str(job_file), "--topology", "1x2xCPU", "--out", str(plan)]) == 0
    return World(root=root, job=job, job_file=job_file, run=run, checkpoint=checkpoint, export=export, plan=plan)


@dataclass(frozen=True)
class Case:
    """One bad input: the command to run on ``world``, the words its error line must hold."""

    name: str
    argv: Callable[[World], list[str]]
    says: tuple[str, ...]
    """Substrings of the error line: what is wrong (key, file, feature) and the fix."""
    absent: Callable[[World], list[Path]] = field(default=lambda w: [])
    """Paths the failure must not have created (besides the run folder, always checked)."""
    rc: int = 2
    started: bool = False
    """The error can only show once the rank reads the bad row: a run folder exists, with no
    checkpoint and no result."""


def _train(w: World, job: Path | None = None, *extra: str) -> list[str]:
    return ["train", str(job or w.job_file), "--nproc", "1", *extra]


def _copy_checkpoint(w: World, name: str) -> Path:
    dst = w.root / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(w.checkpoint, dst)
    return dst


def _truncated_shard(w: World) -> Path:
    ckpt = _copy_checkpoint(w, "truncated_ckpt")
    shard = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return ckpt


def _no_metadata(w: World) -> Path:
    ckpt = _copy_checkpoint(w, "unfinished_ckpt")
    (ckpt / ".metadata").unlink()
    return ckpt


def _future_format(w: World) -> Path:
    ckpt = _copy_checkpoint(w, "future_ckpt")
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "format": 99}))
    return ckpt


def _other_model_job(w: World) -> Path:
    tables = json.loads(json.dumps(w.job["features"]["tables"]))
    tables[0]["num_embeddings"] += 7
    return w.write_job("other_model.yaml", features={"tables": tables})


def _other_plan(w: World) -> Path:
    data = json.loads(w.plan.read_text())
    data["tables"][0]["table"] = "t_elsewhere"
    path = w.root / "other_plan.json"
    path.write_text(json.dumps(data))
    return path


def _four_rank_plan(w: World) -> Path:
    path = w.root / "plan4.json"
    if not path.exists():
        assert cli_main(["plan", str(w.job_file), "--topology", "1x4xCPU", "--out", str(path)]) == 0
    return path


def _text(w: World, name: str, text: str) -> Path:
    path = w.root / name
    path.write_text(text)
    return path


def _bytes(w: World, name: str, data: bytes) -> Path:
    path = w.root / name
    path.write_bytes(data)
    return path


def _column(name: str, values: Callable[[int], pa.Array]) -> Callable[[pa.Table], pa.Table]:
    def edit(t: pa.Table) -> pa.Table:
        return t.set_column(t.schema.get_field_index(name), name, values(t.num_rows))
    return edit


def _late(name: str, value: float, type_: pa.DataType) -> Callable[[pa.Table], pa.Table]:
    """Column ``name`` with ``value`` in one row of the third row group (found mid-file)."""
    def edit(t: pa.Table) -> pa.Table:
        values = t.column(name).to_pylist()
        values[2500] = value
        return t.set_column(t.schema.get_field_index(name), name, pa.array(values, type_))
    return edit


def _data_train(w: World, name: str, edit: Callable[[pa.Table], pa.Table]) -> list[str]:
    # enough steps to reach row 2500, where _late puts the bad value
    return _train(w, None, f"--data.train_path={w.data(name, edit)}", "--train.steps=30")


def _predict_data(w: World, drop: str | None = None) -> Path:
    path = w.root / f"score_{drop}.parquet"
    table = pq.read_table(w.root / "eval.parquet").append_column("row_id", pa.array(range(1024)))
    pq.write_table(table.drop([drop]) if drop else table, path)
    return path


def _incomplete_export(w: World) -> Path:
    dst = w.root / "export_incomplete"
    if not dst.exists():
        shutil.copytree(w.export, dst)
        for f in dst.iterdir():
            if f.name != "manifest.json":
                f.unlink()
    return dst


CASES = [
    # ---- config
    Case("unknown key", lambda w: _train(w, None, "--train.stepz=3"), ("train.stepz", "valid keys")),
    Case("bad choice", lambda w: _train(w, None, "--train.pipeline=fast"), ("train.pipeline", "valid choices")),
    Case("wrong type", lambda w: _train(w, None, "--train.steps=many"), ("train.steps", "int")),
    Case("unknown model", lambda w: _train(w, None, "--model.name=dlrn"), ("model.name", "known models")),
    Case("override without value", lambda w: _train(w, None, "--train.steps"), ("--train.steps", "--section.key=value")),
    Case("job file missing", lambda w: _train(w, w.root / "nope.yaml"), ("nope.yaml",)),
    Case("job file not YAML", lambda w: _train(w, _text(w, "broken.yaml", "model: [dlrm\n")), ("broken.yaml",)),
    Case("job file not a mapping", lambda w: _train(w, _text(w, "list.yaml", "- 1\n- 2\n")), ("list.yaml",)),
    Case("negative interval", lambda w: _train(w, None, "--checkpoint.interval=-1"), ("checkpoint.interval", ">= 0")),
    Case("dense-only DLRM without a field width", lambda w: _train(w, w.write_job("nosparse.yaml", features={"sparse": [], "tables": []})),
         ("dlrm", "model.dense_embedding_dim")),
    Case("sparse optimizer without CPU kernel", lambda w: _train(w, None, "--train.sparse_optimizer.name=adam"),
         ("train.sparse_optimizer.name", "rowwise_adagrad")),
    Case("two labels, single-task model", lambda w: _train(w, w.write_job("twolabels.yaml", features={"label": ["label", "I1"]})),
         ("features.label", "multi-task")),
    Case("unknown model key", lambda w: _train(w, None, "--model.dense_arch_layer_size=[4]"), ("dense_arch_layer_size",)),
    # ---- data
    Case("train path missing", lambda w: _train(w, None, "--data.train_path=/nonexistent/x.parquet"), ("/nonexistent/x.parquet",)),
    Case("missing column", lambda w: _data_train(w, "nocol.parquet", lambda t: t.drop(["C3"])), ("nocol.parquet", "C3")),
    Case("mistyped column", lambda w: _data_train(w, "typed.parquet", _column("I2", lambda n: pa.array(["x"] * n))),
         ("typed.parquet", "I2")),
    Case("extra columns only", lambda w: _train(w, None, f"--data.train_path={w.data('labelless.parquet', lambda t: t.drop(['label']))}"),
         ("labelless.parquet", "label")),
    Case("NaN dense, no fill", lambda w: _train(w, w.write_job("nofill.yaml", train={"steps": 30}, features={"dense": [
         {**d, "fill_missing": None} for d in w.job["features"]["dense"]]}),
         f"--data.train_path={w.data('nan.parquet', _late('I1', float('nan'), pa.float32()))}"),
         ("nan.parquet", "I1", "fill_missing"), started=True),
    Case("negative id", lambda w: _data_train(w, "negid.parquet", _late("C3", -5, pa.int64())), ("C3", "t_C3", "hash: true"), started=True),
    Case("id outside table", lambda w: _data_train(w, "bigid.parquet", _late("C4", 9, pa.int64())), ("C4", "t_C4", "num_embeddings"), started=True),
    Case("label not 0/1", lambda w: _data_train(w, "label2.parquet", _late("label", 2.0, pa.float32())),
         ("label2.parquet", "label", "0 or 1"), started=True),
    Case("NaN label", lambda w: _data_train(w, "labelnan.parquet", _late("label", float("nan"), pa.float32())),
         ("labelnan.parquet", "NaN", "0 or 1"), started=True),
    Case("truncated Parquet", lambda w: _train(w, None, "--data.train_path="
         + str(_bytes(w, "cut.parquet", (w.root / "train.parquet").read_bytes()[:5000]))), ("cut.parquet",)),
    Case("empty file", lambda w: _train(w, None, f"--data.train_path={_bytes(w, 'empty.parquet', b'')}"), ("empty.parquet", "0 bytes")),
    Case("glob matches nothing", lambda w: _train(w, None, f"--data.train_path={w.root}/nothing-*.parquet"), ("matches no files",)),
    Case("ragged CSV", lambda w: _train(w, None, f"--data.train_path={_ragged_csv(w)}"), ("ragged.csv",)),
    Case("CSV without header", lambda w: _train(w, None, "--data.train_path=" + str(_text(w, "noheader.csv", "1,2,3\n4,5,6\n"))),
         ("noheader.csv",)),
    # ---- checkpoint
    Case("resume: no run yet", lambda w: _train(w, None, "--resume"), ("--resume", "no run under")),
    Case("resume: not a checkpoint", lambda w: _train(w, None, "--resume", str(_folder(w, "not_a_ckpt"))),
         ("not_a_ckpt", "no complete checkpoint")),
    Case("resume: other model", lambda w: _train(w, _other_model_job(w), "--resume", str(w.checkpoint)),
         ("different model", "t_C1", "config.yaml")),
    Case("resume: truncated shard", lambda w: _train(w, None, "--resume", str(_truncated_shard(w))), ("truncated", ".distcp")),
    Case("resume: interrupted save", lambda w: _train(w, None, "--resume", str(_no_metadata(w))), ("unfinished_ckpt",)),
    Case("resume: future format", lambda w: _train(w, None, "--resume", str(_future_format(w))), ("format 99", "shardrec version")),
    Case("inspect: not a checkpoint", lambda w: ["checkpoint", "inspect", str(_folder(w, "plain_dir"))], ("plain_dir",)),
    Case("reshard: plan of another job", lambda w: ["checkpoint", "reshard", str(w.checkpoint), "--plan", str(_other_plan(w)),
         "--out", str(w.root / "resharded")], ("t_elsewhere",), absent=lambda w: [w.root / "resharded"]),
    Case("checkpoint export: out exists", lambda w: ["checkpoint", "export", str(w.checkpoint), "--out", str(w.export)],
         ("already exists", "--out")),
    Case("warm start: missing", lambda w: _train(w, None, f"--checkpoint.warm_start.path={w.root / 'gone'}"), ("gone", "does not exist")),
    # ---- plan
    Case("topology malformed", lambda w: ["plan", str(w.job_file), "--topology", "4x8"], ("4x8", "topology")),
    Case("topology unknown kind", lambda w: ["plan", str(w.job_file), "--topology", "4x8xH900"], ("H900", "H100")),
    Case("topology file bad key", lambda w: ["plan", str(w.job_file), "--topology", str(_text(w, "topo.yaml", "nodez: 2\n"))],
         ("nodez", "valid keys")),
    Case("impossible model", lambda w: ["plan", "--tables", str(_text(w, "huge.csv", "name,rows,dim\nhuge,100000000000,128\n")),
         "--topology", "1x2xCPU", "--out", str(w.root / "never.json")], ("huge", "hosts", "options:"),
         absent=lambda w: [w.root / "never.json"]),
    Case("train: plan of another job", lambda w: ["train", str(w.job_file), "--nproc", "2", f"--sharding.plan={_other_plan(w)}"], ("other_plan.json", "t_elsewhere")),
    Case("train: plan for 4 ranks", lambda w: _train(w, None, f"--sharding.plan={_four_rank_plan(w)}"), ("plan4.json", "4")),
    Case("train: plan not JSON", lambda w: _train(w, None, f"--sharding.plan={_text(w, 'plan.txt', 'not json')}"), ("plan.txt",)),
    Case("plan: tables file missing", lambda w: ["plan", "--tables", str(w.root / "tables.csv"), "--topology", "1x2xCPU"], ("tables.csv",)),
    # ---- launch
    Case("unknown scheduler", lambda w: ["submit", str(w.job_file), "-s", "yarn", "--dryrun"], ("yarn", "local_cwd")),
    Case("malformed -j", lambda w: ["submit", str(w.job_file), "-j", "2by2", "--dryrun"], ("2by2", "-j")),
    Case("more ranks than GPUs", lambda w: ["submit", str(w.job_file), "-s", "slurm", "-j", "1x4", "--gpu", "2", "--dryrun"],
         ("--gpu 2", "GPU")),
    Case("submit: dense-only DLRM without a field width", lambda w: ["submit", str(w.write_job("nosparse2.yaml", features={"sparse": [], "tables": []})),
         "--dryrun"], ("dlrm", "model.dense_embedding_dim")),
    # ---- serving
    Case("predict: missing feature column", lambda w: ["predict", "--model", str(w.export), "--data", str(_predict_data(w, "C2")),
         "--out", str(w.root / "scores.parquet"), "--id-column", "row_id", "--no-progress"], ("C2",),
         absent=lambda w: [w.root / "scores.parquet"]),
    Case("predict: id column missing", lambda w: ["predict", "--model", str(w.export), "--data", str(_predict_data(w)),
         "--out", str(w.root / "scores2.parquet"), "--id-column", "user", "--no-progress"], ("user",),
         absent=lambda w: [w.root / "scores2.parquet"]),
    Case("predict: incomplete export", lambda w: ["predict", "--model", str(_incomplete_export(w)), "--data", str(_predict_data(w)),
         "--out", str(w.root / "scores3.parquet"), "--id-column", "row_id", "--no-progress"], ("export_incomplete",),
         absent=lambda w: [w.root / "scores3.parquet"]),
    Case("predict: not an export", lambda w: ["predict", "--model", str(_folder(w, "not_export")), "--data", str(_predict_data(w)),
         "--out", str(w.root / "scores4.parquet"), "--id-column", "row_id"], ("not_export", "shardrec export")),
    Case("export: unknown quantization", lambda w: ["export", str(w.checkpoint), "--out", str(w.root / "q"), "--quantize", "int3"],
         ("int3", "int8"), absent=lambda w: [w.root / "q"]),
    Case("export: unknown table", lambda w: ["export", str(w.checkpoint), "--out", str(w.root / "q2"), "--table-quantize", "t_zz=int8"],
         ("t_zz",), absent=lambda w: [w.root / "q2"]),
    Case("export: out exists", lambda w: ["export", str(w.checkpoint), "--out", str(w.export)], ("already exists",)),
]


def _folder(w: World, name: str) -> Path:
    path = w.root / name
    path.mkdir(exist_ok=True)
    return path


def _ragged_csv(w: World) -> Path:
    table = pq.read_table(w.root / "train.parquet").slice(0, 50)
    header = ",".join(table.column_names)
    rows = [",".join(str(v) for v in row.values()) for row in table.to_pylist()]
    rows[30] += ",7"
    return _text(w, "ragged.csv", "\n".join([header, *rows]) + "\n")


def test_catalogue_is_large() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(world: World, case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(world.root / "runs", ignore_errors=True)
    argv = case.argv(world)
    capsys.readouterr()
    assert cli_main(argv) == case.rc
    err = capsys.readouterr().err
    first, *report = [line for line in err.splitlines() if line.strip()]
    assert first.startswith("shardrec: error: "), err
    assert all(line.startswith("  ") for line in report), f"more than one line, and not an indented report:\n{err}"
    assert "Traceback" not in err
    for word in case.says:
        assert word in err, f"{word!r} not in: {err}"
    runs = world.root / "runs"
    if case.started:
        assert not list(runs.rglob("result.json")) and not list(runs.glob("*/*/checkpoints/step-*"))
    else:
        assert not runs.exists(), "a run folder was created before the error"
    for path in case.absent(world):
        assert not path.exists(), path
