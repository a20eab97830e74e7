"""MultiTower (TorchEasyRec): features split into named groups, one MLP tower per group, the towers'
outputs concatenated and fused by a final MLP."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models.layers import MLPConfig, build_ebc_if_tables, check_features, check_layer_sizes, mlp_block
from shardrec.models.registry import register


@dataclass(kw_only=True)
class MultiTowerConfig:
    """The ``model`` section for ``name: multitower``."""

    groups: dict[str, list[str]] = field(default_factory=dict)
    """Tower name -> the sparse and dense feature names its tower reads; every feature must be in
    at least one group. Empty: a ``sparse`` tower over every sparse feature and a ``dense`` tower
    over every dense feature."""
    tower_layer_sizes: list[int] = field(default_factory=lambda: [512, 256, 128])
    """Widths of every tower's MLP (ReLU after each layer)."""
    final_layer_sizes: list[int] = field(default_factory=lambda: [64])
    """Widths of the final MLP over the concatenated tower outputs; a width-1 logit layer follows."""
    mlp: MLPConfig = field(default_factory=MLPConfig)
    """Activation, dropout, norm of every MLP block of the model (:class:`shardrec.models.layers.MLPConfig`); the blocks' own sections below override it key by key."""
    tower_mlp: MLPConfig = field(default_factory=MLPConfig)
    """Every group's tower (ReLU after every layer by default); unset keys: ``mlp``'s."""
    final_mlp: MLPConfig = field(default_factory=MLPConfig)
    """The final MLP, ending in the logit; unset keys: ``mlp``'s."""

    def __post_init__(self) -> None:
        check_layer_sizes(self.tower_layer_sizes, key="model.tower_layer_sizes")
        check_layer_sizes(self.final_layer_sizes, key="model.final_layer_sizes")
        for name, features in self.groups.items():
            if not name or "." in name:
                raise ConfigError(f"'model.groups': group name {name!r} must be non-empty and contain no '.'")
            if not features:
                raise ConfigError(f"'model.groups.{name}' lists no features; name at least one or remove the group")
            if len(set(features)) != len(features):
                raise ConfigError(f"'model.groups.{name}' names a feature twice: {features}")


class MultiTower(nn.Module):
    """MultiTower as in TorchEasyRec (alibaba/TorchEasyRec, ``tzrec/models/multi_tower.py``).

    Each group's input is its sparse features' pooled embeddings followed by its dense feature
    values (each in the group's order); each group has its own MLP tower, and a final MLP over the
    concatenated tower outputs gives one logit. Tables may have different embedding_dims; a schema
    of dense features alone has no EBC.

    Example::

        schema = criteo_schema(num_dense=3, num_sparse=2, rows=[100, 100], dim=16)
        config = MultiTowerConfig(groups={"user": ["C1", "I1"], "item": ["C2", "I2", "I3"]})
        model = MultiTower(schema=schema, config=config, device=torch.device("cpu"))
        # keys C1, C2; stride B = 2; row 0 has C1 = [4, 7], C2 = []; row 1 has C1 = [1], C2 = [9]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["C1", "C2"], values=torch.tensor([4, 7, 1, 9]), lengths=torch.tensor([2, 1, 0, 1])
        )
        logits = model(torch.randn(2, 3), kjt)  # [2]
    """

    def __init__(self, *, schema: FeatureSchema, config: MultiTowerConfig, device: torch.device) -> None:
        super().__init__()
        check_features(schema, model="multitower")
        self.groups = resolve_groups(config.groups, schema)
        dense_index = {n: i for i, n in enumerate(schema.dense_names)}
        self.sparse_of = {g: [n for n in names if n not in dense_index] for g, names in self.groups.items()}
        self.dense_of = {g: [dense_index[n] for n in names if n in dense_index] for g, names in self.groups.items()}
        self.ebc = build_ebc_if_tables(schema, device=device)
        self.towers = nn.ModuleDict(
            {g: mlp_block(_group_width(schema, ns), config.tower_layer_sizes, config=config.tower_mlp.over(config.mlp),
                          key="model.tower_mlp", final_activation=True, device=device)
             for g, ns in self.groups.items()}
        )
        fused = len(self.groups) * config.tower_layer_sizes[-1]
        self.final = mlp_block(fused, [*config.final_layer_sizes, schema.output_width], config=config.final_mlp.over(config.mlp),
                               key="model.final_mlp", logit=True, device=device)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Returns logits ``[B]`` for dense ``[B, num_dense]`` and a KJT keyed by the sparse features."""
        pooled = {} if self.ebc is None else self.ebc(sparse_features).to_dict()
        outputs = []
        for group, tower in self.towers.items():
            parts = [pooled[n] for n in self.sparse_of[group]]
            if self.dense_of[group]:
                parts.append(dense_features[:, self.dense_of[group]])
            outputs.append(tower(torch.cat(parts, dim=1)))
        return self.final(torch.cat(outputs, dim=1)).squeeze(-1)


def resolve_groups(groups: dict[str, list[str]], schema: FeatureSchema) -> dict[str, list[str]]:
    """The configured groups checked against ``schema``, or the default sparse and dense groups.

    Raises a ConfigError naming a group's unknown feature (listing the known ones) or the features
    no group reads.
    """
    if not groups:
        default = {"sparse": schema.sparse_names, "dense": schema.dense_names}
        return {g: names for g, names in default.items() if names}
    known = schema.sparse_names + schema.dense_names
    for group, names in groups.items():
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"'model.groups.{group}' names unknown feature '{unknown[0]}'; known features: {', '.join(known)}"
            )
    used = {n for names in groups.values() for n in names}
    unused = [n for n in known if n not in used]
    if unused:
        raise ConfigError(
            f"features {', '.join(unused)} are in no group of 'model.groups'; add each to a group "
            "(or remove it from 'features')"
        )
    return dict(groups)


def _group_width(schema: FeatureSchema, names: list[str]) -> int:
    dense = set(schema.dense_names)
    sparse = {f.name: schema.table(f.table).embedding_dim for f in schema.sparse}
    return sum(1 if n in dense else sparse[n] for n in names)


@register("multitower", MultiTowerConfig)
def build_multitower(config: MultiTowerConfig, *, schema: FeatureSchema, device: torch.device) -> MultiTower:
    """Builds a MultiTower model for ``schema`` on ``device``."""
    return MultiTower(schema=schema, config=config, device=device)
