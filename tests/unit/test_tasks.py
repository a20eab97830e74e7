"""Task types per label: config checks, each type's loss and metrics against plain references,
label checks that name the column and the bad rows, string classes through the training data's
class list, heads sized from the tasks over the registry's ranking and multi-task models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shardrec.config import build
from shardrec.data.feature_stats import apply_stats, compute_stats
from shardrec.data.reader import ParquetReader
from shardrec.data.schema import FeatureSchema, LabelConfig, SparseFeature, TableConfig
from shardrec.errors import ConfigError, DataError
from shardrec.models import registry
from shardrec.models.tasks import serve_outputs, task_loss
from shardrec.train.metrics import eval_metrics

REGRESSION = LabelConfig(name="y", type="regression")
HUBER = LabelConfig(name="y", type="regression", loss="huber", huber_delta=0.5)
MULTI = LabelConfig(name="c", type="multiclass", num_classes=4)
BINARY = LabelConfig(name="b")


@pytest.mark.parametrize(("label", "message"), [
    ({"name": "c", "type": "multiclass"}, "needs num_classes >= 2"),
    ({"name": "y", "type": "regression", "num_classes": 3}, "num_classes and class_names are for type: multiclass"),
    ({"name": "y", "type": "regression", "loss": "bce"}, "loss 'bce' does not fit a regression label; use mse or huber"),
    ({"name": "b", "loss": "mse"}, "loss 'mse' does not fit a binary label; use bce"),
    ({"name": "y", "type": "ordinal"}, "valid choices: binary, regression, multiclass"),
    ({"name": "y", "weight": -1}, "weight must be a finite number >= 0"),
])
def test_bad_label_configs_name_the_label(label: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(FeatureSchema, {"label": label}, key="features")


def test_each_task_type_has_its_own_loss() -> None:
    torch.manual_seed(0)
    out = torch.randn(32, 1 + 4 + 1)
    y = torch.stack([torch.randn(32), torch.randint(0, 4, (32,)).float(), torch.randint(0, 2, (32,)).float()], dim=1)
    got = task_loss(out, y, [HUBER, MULTI, BINARY], [1.0, 2.0, 0.5], single=False)
    expected = (torch.nn.functional.huber_loss(out[:, 0], y[:, 0], delta=0.5)
                + 2.0 * torch.nn.functional.cross_entropy(out[:, 1:5], y[:, 1].long())
                + 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(out[:, 5], y[:, 2]))
    assert torch.allclose(got, expected)
    single = task_loss(out[:, 0], y[:, 0], [REGRESSION], single=True)
    assert torch.allclose(single, torch.nn.functional.mse_loss(out[:, 0], y[:, 0]))
    served = serve_outputs(out, [HUBER, MULTI, BINARY])
    assert torch.allclose(served[:, 0], out[:, 0]) and torch.allclose(served[:, 1:5].sum(dim=1), torch.ones(32))
    assert torch.allclose(served[:, 5], torch.sigmoid(out[:, 5]))


def test_metrics_follow_the_task_type() -> None:
    rng = np.random.default_rng(0)
    y = torch.tensor(rng.normal(size=200))
    pred = y + torch.tensor(rng.normal(scale=0.5, size=200))
    m = eval_metrics(pred.float(), y.float(), [REGRESSION])
    err = (pred - y).numpy()
    assert math.isclose(m["rmse"], float(np.sqrt((err**2).mean())), rel_tol=1e-5)
    assert math.isclose(m["mae"], float(np.abs(err).mean()), rel_tol=1e-5)
    assert math.isclose(m["r2"], 1 - (err**2).sum() / ((y.numpy() - y.numpy().mean()) ** 2).sum(), rel_tol=1e-5)
    logits = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [1.0, 0.5, -1.0, 3.0], [0, 2.0, 1.0, -1.0]])
    labels = torch.tensor([0.0, 1.0, 2.0, 2.0])
    mc = eval_metrics(logits, labels, [MULTI])
    assert mc["accuracy"] == 0.5 and mc["top3_accuracy"] == 0.75 and mc["rows"] == 4
    assert math.isclose(mc["log_loss"], float(torch.nn.functional.cross_entropy(logits, labels.long())), rel_tol=1e-6)
    mixed = eval_metrics(torch.cat([pred[:4, None].float(), logits], dim=1), torch.stack([y[:4].float(), labels], dim=1),
                         [REGRESSION, MULTI])
    assert set(mixed) >= {"rmse_task0", "accuracy_task1", "log_loss_task1", "rows"} and "auc" not in mixed


def _labels_file(tmp_path: Path, values: list, name: str = "y") -> Path:
    path = tmp_path / "l.parquet"
    pq.write_table(pa.table({name: values, "a": [0] * len(values)}), path)
    return path


def _schema(label: LabelConfig) -> FeatureSchema:
    return FeatureSchema(label=label, sparse=[SparseFeature(name="a", table="t")], tables=[TableConfig(name="t", num_embeddings=2, embedding_dim=2)])


@pytest.mark.parametrize(("label", "values", "message"), [
    (LabelConfig(name="y"), [0, 1, 2, 2], "label column 'y' holds 2.0; labels must be 0 or 1, and 2 of 4 rows are not"),
    (LabelConfig(name="y", type="regression"), [0.5, float("nan"), 1.0, None],
     "label column 'y' holds null/NaN; regression labels must be finite numbers, and 2 of 4 rows are not"),
    (LabelConfig(name="y", type="multiclass", num_classes=3), [0, 1, 3, 2],
     "label column 'y' holds 3.0; multiclass labels must be class ids 0 .. num_classes - 1, and 1 of 4 rows are not"),
    (LabelConfig(name="y", type="multiclass", num_classes=3), [0, 1.5, 1, 2], "holds 1.5; multiclass labels must be class ids"),
])
def test_label_checks_name_the_column_and_the_bad_rows(tmp_path: Path, label: LabelConfig, values: list, message: str) -> None:
    path = _labels_file(tmp_path, values)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        list(ParquetReader(path, schema=_schema(label), batch_size=4))


def test_string_classes_come_from_the_training_data(tmp_path: Path) -> None:
    train = _labels_file(tmp_path, ["cp", "im", "pp", "im", "cp", "om"])
    label = LabelConfig(name="y", type="multiclass", num_classes=5)
    stats = compute_stats(train, _schema(label))
    assert stats.classes == {"y": ["cp", "im", "om", "pp"]}
    resolved = apply_stats(_schema(label), stats, where="test")
    (batch,) = list(ParquetReader(train, schema=resolved, batch_size=6))
    assert batch.labels.tolist() == [0, 1, 3, 1, 0, 2]
    other = tmp_path / "o"
    other.mkdir()
    with pytest.raises(DataError, match="holds 'imL', a class the training data does not have, in 1 of 2 rows"):
        list(ParquetReader(_labels_file(other, ["cp", "imL"]), schema=resolved, batch_size=2))
    with pytest.raises(DataError, match="holds 4 classes .* more than its num_classes 3; set features.label 'y' num_classes to 4"):
        compute_stats(train, _schema(LabelConfig(name="y", type="multiclass", num_classes=3)))


RANKING = [n for n in registry.names() if not registry.get(n).retrieval and n not in ("esmm", "aitm")]


@pytest.mark.parametrize("name", RANKING)
def test_heads_are_sized_from_the_tasks(name: str) -> None:
    """Every ranking and multi-task model predicts num_classes logits for a multiclass label, one
    value for a regression label, and both side by side when a multi-task model mixes them."""
    from test_models import _build, _kjt, _schema_for  # the registry-wide example schema of each model

    schema = _schema_for(name)
    multi = registry.get(name).multi_task
    tasks = [LabelConfig(name="rating", type="regression"), LabelConfig(name="genre", type="multiclass", num_classes=5)]
    schema.label = tasks if multi else tasks[1]
    model = _build(name, schema).train()
    gen = torch.Generator().manual_seed(0)
    dense, kjt = torch.randn(6, len(schema.dense), generator=gen), _kjt(schema.sparse_names, 6, gen)
    labels = torch.stack([torch.randn(6), torch.randint(0, 5, (6,)).float()], dim=1) if multi else torch.randint(0, 5, (6,)).float()
    loss, logits = registry.training_loss(model, model(dense, kjt), labels, schema.tasks, single=not multi)
    assert logits.shape == (6, 6 if multi else 5) and torch.isfinite(loss)
    loss.backward()
    assert model.eval()(dense, kjt).shape == (6, 6 if multi else 5)


@pytest.mark.parametrize("name", ["esmm", "aitm"])
def test_funnel_models_say_they_need_binary_labels(name: str) -> None:
    from test_models import _schema_for

    schema = _schema_for(name)
    schema.label = [LabelConfig(name="click"), LabelConfig(name="gmv", type="regression")]
    with pytest.raises(ConfigError, match=f"model '{name}' .* so its labels must be binary, but features.label 'gmv' is regression"):
        registry.build_model(name, {}, schema=schema, device=torch.device("cpu"))


def test_class_names_fix_the_ids_and_admit_classes_the_training_data_lack(tmp_path: Path) -> None:
    label = LabelConfig(name="y", type="multiclass", num_classes=3, class_names=["a", "b", "c"])
    schema = _schema(label)
    assert not schema.needs_stats
    (batch,) = list(ParquetReader(_labels_file(tmp_path, ["c", "a", "c"]), schema=schema, batch_size=3))
    assert batch.labels.tolist() == [2, 0, 2]
    with pytest.raises(ConfigError, match="class_names must list num_classes \\(3\\) distinct classes, got 2"):
        LabelConfig(name="y", type="multiclass", num_classes=3, class_names=["a", "b"])
