"""The job config: one typed tree, one section per component, loaded from YAML plus overrides."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shardrec.checkpoint.config import CheckpointConfig
from shardrec.config import apply_overrides, build, load_yaml, to_dict
from shardrec.data.config import DataConfig
from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models import registry
from shardrec.sharding.config import ShardingConfig
from shardrec.train.config import TrainConfig


@dataclass(kw_only=True)
class RunConfig:
    """Where a run writes its files."""

    root: str = "runs"
    """Folder holding every run; each run gets ``root/name/YYYYmmdd-HHMMSS``."""
    name: str | None = None
    """Name of this kind of run; unset: the model name."""


@dataclass(kw_only=True)
class JobConfig:
    """A whole training job."""

    model: dict[str, Any]
    """``name`` (a registered model) plus that model's own config keys."""
    features: FeatureSchema
    """Feature schema and embedding tables."""
    data: DataConfig
    """Training and evaluation data."""
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    """Placement of tables on devices."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimizers, steps, evaluation, pipeline."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint schedule."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run folder."""

    def __post_init__(self) -> None:
        if "name" not in self.model:
            raise ConfigError(f"missing config key 'model.name'; known models: {', '.join(registry.names())}")
        registry.model_config(self.model_name, self.model_params)
        labels = self.features.labels
        if registry.get(self.model_name).retrieval:
            self._check_retrieval()
        elif len(labels) > 1 and not registry.get(self.model_name).multi_task:
            raise ConfigError(
                f"features.label lists {len(labels)} labels ({', '.join(labels)}) but model '{self.model_name}' predicts "
                "one; set features.label to one of them, or use a multi-task model"
            )

    def _check_retrieval(self) -> None:
        other = [t for t in self.features.tasks if t.type != "binary"]
        if other:
            raise ConfigError(f"model '{self.model_name}' is a retrieval model, trained on which items a user chose, but "
                              f"features.label '{other[0].name}' is {other[0].type}; declare the label binary or use a ranking model")
        if self.data.eval_path is not None and self.data.items_path is None:
            raise ConfigError(
                f"model '{self.model_name}' is evaluated by ranking every item: set data.items_path to the item catalogue "
                "(Parquet, one row per item; shardrec data prepare movielens writes items.parquet), or unset data.eval_path"
            )
        self.train.retrieval.check_exclude_feature(self.features.unweighted_names)

    @property
    def model_name(self) -> str:
        """Registered name of the model."""
        return str(self.model["name"])

    @property
    def model_params(self) -> dict[str, Any]:
        """The model's own config keys."""
        return {k: v for k, v in self.model.items() if k != "name"}


def default_job_text() -> str:
    """The embedded default job (synthetic Criteo-shaped data, DLRM, 2 CPU ranks)."""
    return importlib.resources.files("shardrec").joinpath("default_job.yaml").read_text()


def load_job(path: Path | None, overrides: list[str]) -> JobConfig:
    """Loads the job at ``path`` (None: the embedded default) and applies ``--section.key=value`` overrides."""
    data = load_yaml(path) if path is not None else yaml.safe_load(default_job_text())
    apply_overrides(data, overrides)
    return build(JobConfig, data, key="")


def dump_job(job: JobConfig) -> str:
    """The resolved job as YAML."""
    return yaml.safe_dump(to_dict(job), sort_keys=False)
