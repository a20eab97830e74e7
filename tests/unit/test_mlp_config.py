"""``model.mlp`` and the per-block MLP sections: what they build, how a block's section falls back
to ``model.mlp``, the errors naming the key; DIN with prelu; defaults build today's layers; and
running statistics set to their true values after a meta model is materialized."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from helpers import sequence_schema, tiny_job_dict
from shardrec.config import apply_overrides, build
from shardrec.data.schema import criteo_schema
from shardrec.errors import ConfigError
from shardrec.job import JobConfig
from shardrec.models import registry
from shardrec.models.layers import MLPConfig
from shardrec.train.weight_init import init_dense

CPU = torch.device("cpu")


def _types(module: nn.Module) -> list[str]:
    return [type(m).__name__ for m in module]


def _multitask(params: dict[str, Any]) -> nn.Module:
    schema = criteo_schema(num_dense=2, num_sparse=2, rows=[20, 20], dim=4)
    schema.label = ["click", "conversion"]
    return registry.build_model("mmoe", params, schema=schema, device=CPU)


def test_model_mlp_sets_every_block_and_a_block_section_overrides_it_key_by_key() -> None:
    model = _multitask({"mlp": {"activation": "prelu", "dropout": 0.2, "norm": "batch"}, "tower_mlp": {"norm": "layer"},
                        "expert_layer_sizes": [8], "tower_layer_sizes": [4]})
    # Experts end in their activation (their output is mixed by the gates); towers end in the logit.
    assert _types(model.experts.experts[0]) == ["Linear", "BatchNorm", "PReLU", "Dropout"]
    assert _types(model.towers.towers[0]) == ["Linear", "LayerNorm", "PReLU", "Dropout", "Linear"]
    assert model.towers.towers[0][3].p == 0.2


def test_defaults_build_the_layers_of_before() -> None:
    model = _multitask({"expert_layer_sizes": [8], "tower_layer_sizes": [4]})
    assert _types(model.experts.experts[0]) == ["Linear", "ReLU"]
    assert _types(model.towers.towers[0]) == ["Linear", "ReLU", "Linear"]
    dlrm = registry.build_model("dlrm", {"dense_arch_layer_sizes": [8, 4]},
                                schema=criteo_schema(num_dense=2, num_sparse=2, rows=[20, 20], dim=4), device=CPU)
    assert _types(dlrm.dense_arch) == ["Linear", "ReLU", "Linear", "ReLU"]
    assert _types(dlrm.over_arch) == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]


def test_dlrm_blocks_have_their_own_sections() -> None:
    model = registry.build_model("dlrm", {"dense_arch_layer_sizes": [8, 4], "dense_arch_mlp": {"activation": "silu"},
                                          "over_arch_mlp": {"norm": "batch"}},
                                 schema=criteo_schema(num_dense=2, num_sparse=2, rows=[20, 20], dim=4), device=CPU)
    assert _types(model.dense_arch) == ["Linear", "SiLU", "Linear", "SiLU"]
    assert _types(model.over_arch) == ["Linear", "BatchNorm", "ReLU", "Linear", "BatchNorm", "ReLU", "Linear"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"mlp": {"dropuot": 0.1}}, r"unknown config key 'model\.mlp\.dropuot'.*activation, dropout, final_activation, norm"),
        ({"tower_mlp": {"activation": "swish"}}, r"'model\.tower_mlp\.activation'.*relu, leaky_relu, prelu, gelu, silu, dice"),
        ({"mlp": {"norm": "group"}}, r"'model\.mlp\.norm'.*batch, layer, none"),
        ({"mlp": {"dropout": 1.5}}, r"'model\.mlp'.*'dropout' must be a rate in \[0, 1\)"),
        ({"expert_mlp": {"final_activation": "yes"}}, r"'model\.expert_mlp\.final_activation' must be of type bool"),
    ],
)
def test_bad_mlp_keys_are_named(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        registry.model_config("mmoe", params)


@pytest.mark.parametrize(("params", "key"), [({"tower_mlp": {"final_activation": True}}, "model.tower_mlp"),
                                             ({"mlp": {"final_activation": True}}, "model.tower_mlp")])
def test_final_activation_on_a_logit_is_rejected(params: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}\.final_activation' cannot be true.*logit"):
        _multitask(params)


def test_final_activation_where_the_block_feeds_on() -> None:
    model = _multitask({"expert_mlp": {"final_activation": False}, "expert_layer_sizes": [8, 6]})
    assert _types(model.experts.experts[0]) == ["Linear", "ReLU", "Linear"]


def test_mlp_config_checks_itself_when_built_in_python() -> None:
    with pytest.raises(ValueError, match="'activation' must be one of"):
        MLPConfig(activation="swish")  # type: ignore[arg-type]
    assert MLPConfig(norm="batch").over(MLPConfig(activation="gelu", norm="layer")) == MLPConfig(activation="gelu", norm="batch")


@pytest.mark.parametrize("params", [{"activation": "prelu"}, {"mlp": {"activation": "prelu"}},
                                    {"attention_mlp": {"activation": "prelu", "norm": "batch"}}])
def test_din_runs_with_prelu(params: dict[str, Any]) -> None:
    # nn.PReLU took dimension 1 of the attention unit's [B, L, 4D] input as its channels and failed.
    torch.manual_seed(0)
    model = registry.build_model("din", params, schema=sequence_schema(dim=8), device=CPU)
    history, target = torch.randn(3, 6, 8), torch.randn(3, 8)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False], [False] * 6])
    weights = model.attention(history, target, mask)
    assert weights.shape == (3, 6) and torch.isfinite(weights).all() and (weights[~mask] == 0).all()
    assert any(type(m).__name__ == "PReLU" for m in model.attention.mlp)


def test_din_activation_keeps_its_meaning() -> None:
    # model.activation sets both MLPs; model.mlp overrides it for both, attention_mlp for the attention unit.
    def built(params: dict[str, Any]) -> tuple[str, str]:
        model = registry.build_model("din", params, schema=sequence_schema(dim=8), device=CPU)
        return _types(model.attention.mlp)[1], _types(model.mlp)[1]

    assert built({"activation": "prelu"}) == ("PReLU", "PReLU")
    assert built({"activation": "prelu", "attention_mlp": {"activation": "dice"}}) == ("Dice", "PReLU")
    assert built({"activation": "prelu", "mlp": {"activation": "gelu"}}) == ("GELU", "GELU")


class _Stats(nn.Module):
    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3, device=device)
        self.bn = nn.BatchNorm1d(3, device=device)
        self.plain_bn = nn.BatchNorm1d(3, affine=False, device=device)  # buffers only: no reset_parameters call


def test_init_dense_sets_running_statistics_of_a_materialized_model() -> None:
    # DistributedModelParallel re-creates meta buffers as zeros (torch.zeros_like): a running
    # variance of 0 normalizes by 1/sqrt(eps) in eval.
    model = _Stats(torch.device("meta")).to_empty(device=CPU)
    for buffer in model.buffers():
        buffer.zero_()
    dice_model = registry.build_model("din", {}, schema=sequence_schema(dim=8), device=torch.device("meta")).to_empty(device=CPU)
    for buffer in dice_model.buffers():
        buffer.zero_()
    init_dense(model, seed=0)
    init_dense(dice_model, seed=0)
    for bn in (model.bn, model.plain_bn):
        assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
        assert int(bn.num_batches_tracked) == 0
    dice = [m for m in dice_model.modules() if type(m).__name__ == "Dice"]
    assert dice and all(torch.equal(d.running_var, torch.ones(d.num_features)) for d in dice)


def test_command_line_overrides_reach_a_block(tmp_path: Path) -> None:
    job = tiny_job_dict(tmp_path, rows=64)
    apply_overrides(job, ["--model.mlp.norm=batch", "--model.over_arch_mlp.dropout=0.1"])
    config = registry.model_config("dlrm", build(JobConfig, job, key="").model_params)
    assert config.mlp == MLPConfig(norm="batch") and config.over_arch_mlp == MLPConfig(dropout=0.1)
    with pytest.raises(ConfigError, match=r"'model\.dense_arch_mlp\.norm'"):
        build(JobConfig, apply_overrides(job, ["--model.dense_arch_mlp.norm=bn"]), key="")
