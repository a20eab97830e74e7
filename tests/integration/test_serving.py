"""``shardrec export`` and ``shardrec predict``: a 2-rank checkpoint exported on one CPU process
scores as the eager model does (fp32), close to it and with the same AUC (int8), loads without
shardrec, and bad input fails clearly with nothing written; a two-tower model (DSSM) exports both
towers and its catalogue's item vectors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from helpers import tiny_job
from shardrec.cli import main as cli_main
from shardrec.data.reader import ParquetReader
from shardrec.errors import CheckpointError, ConfigError, DataError
from shardrec.job import JobConfig, load_job
from shardrec.launch.spawn import run_ranks
from shardrec.models import registry
from shardrec.train.metrics import auc
from shardrec.checkpoint.dcp_reader import SavedCheckpoint
from shardrec.data.catalogue import catalogue_kjt, read_catalogue
from shardrec.serving.export_model import SAVED_PREFIX, export_model, tower_inputs
from shardrec.serving.config import ExportConfig
from shardrec.serving.predict import predict
from shardrec.serving.config import PredictConfig
from shardrec.train.worker import run

MODELS = ["dlrm", "deepfm", "din", "mmoe"]
ID_COLUMN = {"dlrm": "C1", "deepfm": "C1", "din": "user_id", "mmoe": "C1"}
"""A column of each model's data written next to the scores (the synthetic data have no row id)."""
FP32_TOL = 1e-5
INT8_TOL = 0.02
"""Largest |int8 score - fp32 score| accepted: row-wise int8 keeps each weight within 1/255 of its
row's range, which moves these tiny models' probabilities by a few thousandths."""
AUC_TOL = 0.002
STEPS = {"din": 40}
"""Training steps where 12 teach a model too little (DIN's history signal) to show an AUC above chance."""


def _train(job: JobConfig, run_dir: Path) -> None:
    run(job, run_dir=run_dir, resume=None)


_RUNS: dict[str, tuple[str, Path, JobConfig]] = {}
"""Each model's run, trained once for the parametrized tests and the dlrm-only ones alike."""


def _trained(model: str, factory: pytest.TempPathFactory) -> tuple[str, Path, JobConfig]:
    if model not in _RUNS:
        tmp = factory.mktemp(model)
        steps = STEPS.get(model, 12)
        job = tiny_job(tmp, model=model, steps=steps, checkpoint={"enabled": True})
        run_ranks(_train, job, tmp / "run")
        _RUNS[model] = model, tmp / "run" / "checkpoints" / f"step-{steps:08d}", job
    return _RUNS[model]


def _exports(checkpoint: Path) -> dict[str, Path]:
    out = {q: checkpoint.parent.parent.parent / f"export-{q}" for q in ("none", "int8")}
    for q, path in out.items():
        if not path.exists():
            export_model(ExportConfig(checkpoint=checkpoint, out=path, quantize=q))
    return out


@pytest.fixture(scope="module", params=MODELS)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, JobConfig]:
    """(model, checkpoint, job) of a 2-rank run of ``model``."""
    return _trained(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def exports(trained: tuple[str, Path, JobConfig]) -> dict[str, Path]:
    """The run exported with float32 and with int8 tables."""
    return _exports(trained[1])


def _eager(job: JobConfig, checkpoint: Path) -> torch.nn.Module:
    """The job's model with the checkpoint's weights, read independently of the exporter."""
    model = registry.build_model(job.model_name, job.model_params, schema=job.features, device=torch.device("cpu"))
    saved = SavedCheckpoint(checkpoint)
    model.load_state_dict({k: saved.read(SAVED_PREFIX + k) for k in model.state_dict()})
    return model.eval()


def _scores(module: torch.nn.Module, job: JobConfig, *, eager: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and labels over the held-out data, batch by batch."""
    scores, labels = [], []
    with torch.no_grad():
        for batch in ParquetReader(job.data.eval_path, schema=job.features, batch_size=200):
            kjt = batch.sparse_features
            out = torch.sigmoid(module(batch.dense_features, kjt)) if eager else module(batch.dense_features, kjt.values(), kjt.lengths())
            scores.append(out)
            labels.append(batch.labels)
    return torch.cat(scores), torch.cat(labels)


def _aucs(scores: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """AUC of each task."""
    scores, labels = scores.reshape(len(scores), -1), labels.reshape(len(labels), -1)
    return [auc(scores[:, t], labels[:, t]) for t in range(scores.shape[1])]


def test_fp32_export_scores_equal_eager(trained: tuple[str, Path, JobConfig], exports: dict[str, Path]) -> None:
    model, checkpoint, job = trained
    eager, labels = _scores(_eager(job, checkpoint), job, eager=True)
    exported, _ = _scores(torch.jit.load(str(exports["none"] / "model.pt")), job, eager=False)
    assert (exported - eager).abs().max().item() < FP32_TOL
    assert _aucs(eager, labels)[0] > 0.52  # trained: the comparison is of a model that learned something
    manifest = json.loads((exports["none"] / "manifest.json").read_text())
    assert manifest["model"] == model and manifest["step"] == STEPS.get(model, 12)
    assert manifest["inputs"]["sparse"] == job.features.unweighted_names
    assert {t.name: (t.num_embeddings, t.embedding_dim, "none") for t in job.features.tables}.items() <= {
        t: (v["rows"], v["dim"], v["dtype"]) for t, v in manifest["tables"].items()}.items()


def test_int8_export_is_close_with_the_same_auc(trained: tuple[str, Path, JobConfig], exports: dict[str, Path]) -> None:
    _, _, job = trained
    fp32, labels = _scores(torch.jit.load(str(exports["none"] / "model.pt")), job, eager=False)
    int8, _ = _scores(torch.jit.load(str(exports["int8"] / "model.pt")), job, eager=False)
    diff = (int8 - fp32).abs().max().item()
    assert 0 < diff < INT8_TOL
    deltas = [a - b for a, b in zip(_aucs(int8, labels), _aucs(fp32, labels))]
    assert max(map(abs, deltas)) < AUC_TOL, deltas


def test_predict_writes_ids_and_scores(trained: tuple[str, Path, JobConfig], exports: dict[str, Path], tmp_path: Path) -> None:
    model, _, job = trained
    out = tmp_path / "scores.parquet"
    assert cli_main(["predict", "--model", str(exports["none"]), "--data", str(job.data.eval_path), "--out", str(out),
                     "--id-column", ID_COLUMN[model], "--batch-size", "200", "--no-progress"]) == 0
    table = pq.read_table(out)
    tasks = ["score_label", "score_label2"] if registry.get(model).multi_task else ["score"]
    assert table.column_names == [ID_COLUMN[model], *tasks]
    assert table.column(0).to_pylist() == pq.read_table(job.data.eval_path).column(ID_COLUMN[model]).to_pylist()
    expected, _ = _scores(torch.jit.load(str(exports["none"] / "model.pt")), job, eager=False)
    written = torch.stack([torch.tensor(table.column(t).to_numpy()) for t in tasks], dim=1)
    # The same batches as _scores: DIN's Dice takes its statistics from the batch at hand, so its
    # scores depend on which rows share a batch.
    torch.testing.assert_close(written, expected.reshape(len(written), -1), rtol=0, atol=1e-6)


LOADER = """
import sys, torch, fbgemm_gpu
module = torch.jit.load(sys.argv[1])
dense, values, lengths, expected = torch.load(sys.argv[2], weights_only=True)
assert not [m for m in sys.modules if m.split(".")[0] in ("shardrec", "torchrec")]
print((module(dense, values, lengths) - expected).abs().max().item())
"""


def test_artifact_loads_with_only_torch_and_fbgemm(trained: tuple[str, Path, JobConfig], exports: dict[str, Path], tmp_path: Path) -> None:
    _, _, job = trained
    batch = next(iter(ParquetReader(job.data.eval_path, schema=job.features, batch_size=64)))
    kjt = batch.sparse_features
    module = torch.jit.load(str(exports["int8"] / "model.pt"))
    torch.save((batch.dense_features, kjt.values(), kjt.lengths(), module(batch.dense_features, kjt.values(), kjt.lengths())),
               tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", LOADER, str(exports["int8"] / "model.pt"), str(tmp_path / "inputs.pt")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) == 0.0


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing written. One model is enough.


@pytest.fixture(scope="module")
def dlrm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, JobConfig, Path]:
    """The dlrm run (checkpoint, job, float32 export) the bad-input cases use."""
    _, checkpoint, job = _trained("dlrm", tmp_path_factory)
    return checkpoint, job, _exports(checkpoint)["none"]


def test_unknown_quantization_is_an_error(dlrm_run: tuple[Path, JobConfig, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint, _, _ = dlrm_run
    assert cli_main(["export", str(checkpoint), "--out", str(tmp_path / "x"), "--quantize", "int3"]) == 2
    assert "invalid value 'int3' for 'quantize'; valid choices: int8, int4, fp16, none" in capsys.readouterr().err
    assert cli_main(["export", str(checkpoint), "--out", str(tmp_path / "x"), "--table-quantize", "t_C9=fp16"]) == 2
    assert "--table-quantize names t_C9, not tables of this model; its tables: t_C1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_per_table_dtype(dlrm_run: tuple[Path, JobConfig, Path], tmp_path: Path) -> None:
    checkpoint, job, fp32 = dlrm_run
    out = tmp_path / "mixed"
    assert cli_main(["export", str(checkpoint.parent.parent), "--out", str(out), "--quantize", "int8", "--table-quantize", "t_C3=fp16",
                     "--table-quantize", "t_C1=int4"]) == 0
    tables = json.loads((out / "manifest.json").read_text())["tables"]
    assert {t: v["dtype"] for t, v in tables.items()} == {"t_C1": "int4", "t_C2": "int8", "t_C3": "fp16", "t_C4": "int8",
                                                          "t_C5": "int8", "t_C6": "int8"}
    mixed, _ = _scores(torch.jit.load(str(out / "model.pt")), job, eager=False)
    reference, _ = _scores(torch.jit.load(str(fp32 / "model.pt")), job, eager=False)
    assert 0 < (mixed - reference).abs().max().item() < 0.05


def test_tables_that_do_not_match_the_config(dlrm_run: tuple[Path, JobConfig, Path], tmp_path: Path) -> None:
    checkpoint, _, _ = dlrm_run
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    config["features"]["tables"][2]["num_embeddings"] = 999
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match=r"table 't_C3' is 1000 x 8 in the checkpoint, 999 x 8 in the config"):
        export_model(ExportConfig(checkpoint=checkpoint, out=tmp_path / "x", config=tmp_path / "job.yaml"))
    assert not (tmp_path / "x").exists() and load_job(tmp_path / "job.yaml", []).model_name == "dlrm"


def _bad_data(job: JobConfig, tmp: Path, change: str) -> Path:
    table = pq.read_table(job.data.eval_path)
    if change == "missing":
        table = table.drop(["C3"])
    else:
        table = table.set_column(table.schema.get_field_index("C2"), "C2", pa.array([[1]] * table.num_rows, pa.list_(pa.float32())))
    path = tmp / f"{change}.parquet"
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("change, message", [
    ("missing", r"has no column 'C3' \(configured by features.sparse\[2\]\)"),
    ("wrong_type", r"column 'C2' \(features.sparse\[1\]\) has type list<element: float>; a sparse column must hold"),
])
def test_predict_bad_data(dlrm_run: tuple[Path, JobConfig, Path], tmp_path: Path, change: str, message: str) -> None:
    _, job, exported = dlrm_run
    with pytest.raises(DataError, match=message):
        predict(PredictConfig(model=exported, data=str(_bad_data(job, tmp_path, change)), out=tmp_path / "s.parquet", id_column="C1"))
    assert not (tmp_path / "s.parquet").exists() and not list(tmp_path.glob(".s.parquet*"))


def test_predict_unknown_id_column(dlrm_run: tuple[Path, JobConfig, Path], tmp_path: Path) -> None:
    _, job, exported = dlrm_run
    with pytest.raises(DataError, match=r"has no column 'row_id' \(--id-column\); its columns are: label, I1"):
        predict(PredictConfig(model=exported, data=str(job.data.eval_path), out=tmp_path / "s.parquet", id_column="row_id"))
    with pytest.raises(ConfigError, match="not an exported model"):
        predict(PredictConfig(model=tmp_path, data=str(job.data.eval_path), out=tmp_path / "s.parquet", id_column="C1"))
    assert not list(tmp_path.glob("*.parquet"))


def test_predict_without_label_columns(dlrm_run: tuple[Path, JobConfig, Path], tmp_path: Path) -> None:
    _, job, exported = dlrm_run
    unlabeled = tmp_path / "unlabeled.parquet"
    pq.write_table(pq.read_table(job.data.eval_path).drop(["label"]), unlabeled)
    for data, out in ((unlabeled, tmp_path / "a.parquet"), (job.data.eval_path, tmp_path / "b.parquet")):
        predict(PredictConfig(model=exported, data=str(data), out=out, id_column="C1", batch_size=200, progress_bar=False))
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.num_rows == 1024 and a.equals(b)


# ---------------------------------------------------------------------------------------------
# Two towers (DSSM): user and item towers, the catalogue's item vectors, user vectors from predict.

VECTOR_INT8_TOL = 0.005
"""Largest |int8 - fp32| of an L2-normalized vector entry (measured: about 5e-4): int8 rows move
each embedding by under 1/255 of its row's range, which the MLP carries into the unit vector."""
HR_TOL = 0.01


@pytest.fixture(scope="module")
def dssm(tmp_path_factory: pytest.TempPathFactory) -> tuple[JobConfig, Path, dict[str, Path]]:
    """(job, checkpoint, {quantize: export}) of a 2-rank DSSM run."""
    tmp = tmp_path_factory.mktemp("dssm")
    job = tiny_job(tmp, model="dssm", steps=30, checkpoint={"enabled": True})
    run_ranks(_train, job, tmp / "run")
    checkpoint = tmp / "run" / "checkpoints" / f"step-{30:08d}"
    out = {q: tmp / f"export-{q}" for q in ("none", "int8")}
    for q, path in out.items():
        export_model(ExportConfig(checkpoint=checkpoint, out=path, quantize=q))
    return job, checkpoint, out


def _user_vectors(module: torch.nn.Module, job: JobConfig, inputs: list[str] | None) -> torch.Tensor:
    """User vectors of the held-out rows: eager (``inputs`` None) or through an exported user tower."""
    out = []
    with torch.no_grad():
        for batch in ParquetReader(job.data.eval_path, schema=job.features, batch_size=100):
            kjt = batch.sparse_features
            out.append(module.user_vectors(batch.dense_features, kjt) if inputs is None else module(batch.dense_features, *tower_inputs(kjt, inputs)))
    return torch.cat(out)


def _item_vectors(module: torch.nn.Module, job: JobConfig, inputs: list[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, vectors) of the catalogue: eager (``inputs`` None) or through an exported item tower."""
    ids, table = read_catalogue(job.data.items_path, job.features, item_feature="item_id")
    kjt = catalogue_kjt(table, job.features, where="test")
    with torch.no_grad():
        return ids, module.item_vectors(kjt) if inputs is None else module(*tower_inputs(kjt, inputs))


def _towers(folder: Path) -> tuple[dict[str, Any], torch.jit.ScriptModule, torch.jit.ScriptModule]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest, torch.jit.load(str(folder / "user_tower.pt")), torch.jit.load(str(folder / "item_tower.pt"))


def test_dssm_fp32_towers_equal_eager(dssm: tuple[JobConfig, Path, dict[str, Path]]) -> None:
    job, checkpoint, exports = dssm
    manifest, user, item = _towers(exports["none"])
    assert manifest["kind"] == "two_tower" and sorted(p.name for p in exports["none"].iterdir()) == sorted(
        ["manifest.json", *manifest["files"].values()])
    assert manifest["inputs"]["user"]["sparse"] == ["user_id", "history"] and manifest["inputs"]["item"]["sparse"] == ["item_id"]
    eager = _eager(job, checkpoint)
    eager_user = _user_vectors(eager, job, None)
    assert (_user_vectors(user, job, manifest["inputs"]["user"]["sparse"]) - eager_user).abs().max().item() < FP32_TOL
    ids, eager_items = _item_vectors(eager, job, None)
    _, items = _item_vectors(item, job, manifest["inputs"]["item"]["sparse"])
    assert (items - eager_items).abs().max().item() < FP32_TOL
    written = pq.read_table(exports["none"] / "item_embeddings.parquet")
    assert written.column("id").to_pylist() == ids.tolist() == list(range(60)) and manifest["items"]["count"] == 60
    torch.testing.assert_close(torch.tensor(written.column("vector").to_pylist()), items, rtol=0, atol=0)
    # Trained: the eval rows' own items rank well above chance (10 in 60) among the catalogue.
    assert _hit_rate(eager_user, eager_items, job) > 0.3


def _hit_rate(user: torch.Tensor, items: torch.Tensor, job: JobConfig) -> float:
    """HR@10 of the held-out rows' own items among the catalogue (whose ids are 0..N-1)."""
    targets = torch.tensor(pq.read_table(job.data.eval_path).column("item_id").to_pylist())
    return ((user @ items.t()).topk(10).indices == targets.unsqueeze(1)).any(dim=1).float().mean().item()


def test_dssm_int8_towers_are_close(dssm: tuple[JobConfig, Path, dict[str, Path]]) -> None:
    job, _, exports = dssm
    manifest, user32, item32 = _towers(exports["none"])
    _, user8, item8 = _towers(exports["int8"])
    user_in, item_in = manifest["inputs"]["user"]["sparse"], manifest["inputs"]["item"]["sparse"]
    users = {q: _user_vectors(m, job, user_in) for q, m in (("int8", user8), ("fp32", user32))}
    items = {q: _item_vectors(m, job, item_in)[1] for q, m in (("int8", item8), ("fp32", item32))}
    user_diff = (users["int8"] - users["fp32"]).abs().max().item()
    item_diff = (items["int8"] - items["fp32"]).abs().max().item()
    assert 0 < user_diff < VECTOR_INT8_TOL and 0 < item_diff < VECTOR_INT8_TOL, (user_diff, item_diff)
    assert abs(_hit_rate(users["int8"], items["int8"], job) - _hit_rate(users["fp32"], items["fp32"], job)) <= HR_TOL


TOWER_LOADER = """
import sys, torch, fbgemm_gpu
user, item = torch.jit.load(sys.argv[1] + "/user_tower.pt"), torch.jit.load(sys.argv[1] + "/item_tower.pt")
user_in, item_in, expected = torch.load(sys.argv[2], weights_only=True)
assert not [m for m in sys.modules if m.split(".")[0] in ("shardrec", "torchrec")]
print(max((user(*user_in) - expected[0]).abs().max().item(), (item(*item_in) - expected[1]).abs().max().item()))
"""


def test_towers_load_with_only_torch_and_fbgemm(dssm: tuple[JobConfig, Path, dict[str, Path]], tmp_path: Path) -> None:
    job, _, exports = dssm
    manifest, user, item = _towers(exports["int8"])
    batch = next(iter(ParquetReader(job.data.eval_path, schema=job.features, batch_size=64)))
    user_in = (batch.dense_features, *tower_inputs(batch.sparse_features, manifest["inputs"]["user"]["sparse"]))
    _, table = read_catalogue(job.data.items_path, job.features, item_feature="item_id")
    item_in = tower_inputs(catalogue_kjt(table, job.features, where="test"), manifest["inputs"]["item"]["sparse"])
    torch.save((user_in, item_in, (user(*user_in), item(*item_in))), tmp_path / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", TOWER_LOADER, str(exports["int8"]), str(tmp_path / "inputs.pt")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) == 0.0


def test_predict_writes_user_vectors(dssm: tuple[JobConfig, Path, dict[str, Path]], tmp_path: Path) -> None:
    job, _, exports = dssm
    manifest, user, _ = _towers(exports["none"])
    # A request has no target item and no label: the user tower reads neither column.
    users = tmp_path / "users.parquet"
    pq.write_table(pq.read_table(job.data.eval_path).drop(["label", "item_id"]), users)
    out = tmp_path / "vectors.parquet"
    assert cli_main(["predict", "--model", str(exports["none"]), "--data", str(users), "--out", str(out), "--id-column", "user_id",
                     "--batch-size", "100", "--no-progress"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["user_id", "vector"]
    assert table.column("user_id").to_pylist() == pq.read_table(users).column("user_id").to_pylist()
    expected = _user_vectors(user, job, manifest["inputs"]["user"]["sparse"])
    torch.testing.assert_close(torch.tensor(table.column("vector").to_pylist()), expected, rtol=0, atol=1e-6)
