"""Serving is batch independent: for every registered model in eval mode, with dropout and batch
norm in its MLPs where it has them, row i's score (a retrieval model's user vector) alone equals
its score inside a batch of 256 rows; and so does the exported TorchScript artifact's, which also
equals the eager model's."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import RETRIEVAL_DATA, write_catalogue
from shardrec.errors import ConfigError
from shardrec.models import registry
from shardrec.serving.export_model import ServingModule, TwoTowers, embedding_tables, quantize, to_torchscript, tower_inputs
from test_models import _kjt, _params, _retrieval_batch, _schema_for

CPU = torch.device("cpu")
BATCH = 256
ROWS = [0, 1, 77, 255]
"""Rows scored alone; row 0 of the random ranking batches has every bag empty."""
TOL = 1e-5
MLP = {"dropout": 0.2, "norm": "batch"}
"""What every model with a ``model.mlp`` section is built with."""
NOT_EXPORTABLE = {"hllm", "hstu"}
"""Models ``shardrec export`` cannot script (JaggedTensor.to_padded_dense in TorchScript)."""


def _row(kjt: KeyedJaggedTensor, i: int) -> KeyedJaggedTensor:
    """Row ``i`` of ``kjt`` as a batch of one."""
    values, lengths = [], []
    for key in kjt.keys():
        jt = kjt[key]
        offsets = jt.offsets()
        values.append(jt.values()[offsets[i] : offsets[i + 1]])
        lengths.append(jt.lengths()[i : i + 1])
    return KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(values), lengths=torch.cat(lengths))


def _params_with_mlp(name: str) -> dict[str, object]:
    fields = {f.name for f in dataclasses.fields(registry.get(name).config_cls)}
    deep = {"deep_layer_sizes": [16, 8]} if name == "autoint" else {}  # AutoInt+: its MLP is optional
    return {**_params(name), **deep, **({"mlp": dict(MLP)} if "mlp" in fields else {})}


def _model_and_batch(name: str, tmp: Path) -> tuple[nn.Module, torch.Tensor, KeyedJaggedTensor]:
    """``name`` in eval mode, its running statistics drawn at random (as if trained), and a batch."""
    torch.manual_seed(0)
    schema = _schema_for(name)
    model = registry.build_model(name, _params_with_mlp(name), schema=schema, device=CPU)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if callable(getattr(m, "reset_running_stats", None)):
                m.running_mean.normal_(generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    if registry.get(name).retrieval:
        dense, kjt = _retrieval_batch(tmp, name, BATCH)
    else:
        dense, kjt = torch.randn(BATCH, len(schema.dense), generator=gen), _kjt(schema.sparse_names, BATCH, gen)
    return model.eval(), dense, kjt


Score = Callable[[torch.Tensor, KeyedJaggedTensor], torch.Tensor]


def _assert_rows_alone_match(score: Score, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
    """``score(dense, kjt)`` of the whole batch, after checking each of ROWS alone against it."""
    with torch.no_grad():
        full = score(dense, kjt)
        for i in ROWS:
            torch.testing.assert_close(score(dense[i : i + 1], _row(kjt, i)), full[i : i + 1], atol=TOL, rtol=0)
    return full


def test_every_model_with_an_mlp_takes_model_mlp() -> None:
    # The models without an MLP are the sequential retrieval ones (attention, GRU, capsules).
    without = [n for n in registry.names() if "mlp" not in {f.name for f in dataclasses.fields(registry.get(n).config_cls)}]
    assert without == ["comirec_dr", "comirec_sa", "gru4rec", "hllm", "hstu", "sasrec"]


@pytest.mark.parametrize("name", registry.names())
def test_eval_scores_do_not_depend_on_the_batch(name: str, tmp_path: Path) -> None:
    model, dense, kjt = _model_and_batch(name, tmp_path)
    if "mlp" in _params_with_mlp(name):
        assert any(isinstance(m, nn.BatchNorm1d) for m in model.modules()) and any(isinstance(m, nn.Dropout) for m in model.modules())
    _assert_rows_alone_match(model, dense, kjt)


@pytest.mark.parametrize("name", registry.names())
def test_exported_scores_do_not_depend_on_the_batch(name: str, tmp_path: Path) -> None:
    model, dense, kjt = _model_and_batch(name, tmp_path)
    served = quantize(copy.deepcopy(model), {t: "none" for t in embedding_tables(model)})
    schema = _schema_for(name)
    if registry.get(name).retrieval:
        items = pq.read_table(write_catalogue(tmp_path / "items.parquet", **RETRIEVAL_DATA.get(name, {})))
        towers = TwoTowers(served, schema=schema, items=items)
        module: nn.Module = towers.user
        eager: Score = model.user_vectors
        values, lengths = tower_inputs(kjt, towers.user_inputs)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=towers.user_inputs, values=values, lengths=lengths)
    else:
        module = ServingModule(served, keys=schema.unweighted_names)
        eager = lambda d, k: torch.sigmoid(model(d, k))  # noqa: E731
    if name in NOT_EXPORTABLE:
        with pytest.raises(ConfigError, match="cannot be exported"):
            to_torchscript(module, model=name)
        return
    scripted = to_torchscript(module, model=name)
    full = _assert_rows_alone_match(lambda d, k: scripted(d, k.values(), k.lengths().int()), dense, kjt)
    if registry.get(name).retrieval:
        kjt = towers.user.kjt(kjt.values(), kjt.lengths())
    with torch.no_grad():
        torch.testing.assert_close(full, eager(dense, kjt), atol=TOL, rtol=0)
