"""train.precision: bf16 runs the dense parts under autocast while losses, logits and BatchNorm
statistics stay fp32; fp16 and a CPU without bf16 are refused with the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardrec.config import build
from shardrec.data.batch import Batch
from shardrec.errors import ConfigError
from shardrec.models import registry
from shardrec.models.layers import BatchNorm
from shardrec.models.retrieval import RetrievalOutput
from shardrec.sharding import shardable
from shardrec.sharding.shardable import TrainModule, check_precision, cpu_has_bf16, to_fp32
from shardrec.train.config import TrainConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import TINY_ROWS
from shardrec.data.schema import criteo_schema

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions")


def _batch(schema, rows: int = 16) -> Batch:
    gen = torch.Generator().manual_seed(0)
    keys = schema.sparse_names
    ids = torch.stack([torch.randint(0, n, (rows,), generator=gen) for n in TINY_ROWS[: len(keys)]], dim=1)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=ids.t().flatten(), lengths=torch.ones(len(keys) * rows, dtype=torch.long))
    return Batch(dense_features=torch.randn(rows, len(schema.dense), generator=gen), sparse_features=kjt,
                 labels=torch.randint(0, 2, (rows,), generator=gen).float())


@needs_bf16
def test_bf16_runs_the_dense_layers_in_bf16_and_the_loss_in_fp32() -> None:
    schema = criteo_schema(num_dense=3, num_sparse=4, rows=TINY_ROWS[:4], dim=8)
    model = registry.build_model("dcnv2", {"mlp": {"norm": "batch"}}, schema=schema, device=torch.device("cpu"))
    seen: dict[str, torch.dtype] = {}
    def record(name: str):  # a hook that returns None leaves the output alone
        def hook(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
            seen.setdefault(name, output.dtype)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, BatchNorm)):
            module.register_forward_hook(record(name))
    loss, (_, logits, _) = TrainModule(model, precision="bf16")(_batch(schema))
    assert loss.dtype == logits.dtype == torch.float32
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(seen[n] == torch.bfloat16 for n in linear)
    norms = [m for m in model.modules() if isinstance(m, BatchNorm)]
    assert norms and all(m.running_mean.dtype == m.running_var.dtype == torch.float32 for m in norms)
    assert all(m.running_var.ne(1).any() for m in norms)  # updated by the bf16 step
    seen.clear()
    TrainModule(model, precision="fp32")(_batch(schema))
    assert all(seen[n] == torch.float32 for n in linear)


def test_batchnorm_statistics_are_fp32_under_bf16_inputs() -> None:
    norm = BatchNorm(4, device=torch.device("cpu"))
    x = torch.randn(64, 4) * 3 + 100
    out = norm(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and norm.running_mean.dtype == torch.float32
    reference = BatchNorm(4, device=torch.device("cpu"))
    reference(x.to(torch.bfloat16).float())
    assert torch.equal(norm.running_mean, reference.running_mean) and torch.equal(norm.running_var, reference.running_var)


def test_outputs_are_cast_to_fp32_named_tuples_included() -> None:
    out = RetrievalOutput(torch.ones(2, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(2, 3),
                          torch.tensor([1, 2]), torch.ones(0, 3, dtype=torch.bfloat16), torch.tensor([], dtype=torch.long))
    cast = to_fp32(out)
    assert isinstance(cast, RetrievalOutput) and cast.user.dtype == torch.float32 and cast.item_ids.dtype == torch.long
    assert to_fp32((torch.ones(1, dtype=torch.bfloat16), 3))[0].dtype == torch.float32


def test_fp16_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="train.precision: fp16 is not offered yet.*use bf16"):
        build(TrainConfig, {"precision": "fp16"}, key="train")
    with pytest.raises(ConfigError, match="invalid value 'int8' for 'train.precision'"):
        build(TrainConfig, {"precision": "int8"}, key="train")


def test_a_cpu_without_bf16_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert not cpu_has_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert cpu_has_bf16(str(info))
    monkeypatch.setattr(shardable, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match="train.precision: bf16, but this CPU has no bf16 instructions.*use fp32"):
        check_precision("bf16", torch.device("cpu"))
    check_precision("fp32", torch.device("cpu"))
