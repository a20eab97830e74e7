"""Every config under configs/ loads and builds its model on the data its header says to prepare
(skips without SHARDREC_SAMPLE_DATA)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from shardrec.data.datasets import prepare
from shardrec.job import load_job
from shardrec.models import registry

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# The data folders the configs include, prepared as their header comments say.
LAYOUTS = {
    "movielens": ("movielens", {"split": "leave_last_out"}),
    "movielens_seq": ("movielens", {"split": "leave_last_out", "rows": "user", "max_history": 200, "title_tokens": 8,
                                    "sampled_negatives": 128}),
    "movielens_retrieval": ("movielens", {"split": "leave_last_out", "sampled_negatives": 128}),
    "movielens_funnel": ("movielens_funnel", {}),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not os.environ.get("SHARDREC_SAMPLE_DATA"):
        pytest.skip("SHARDREC_SAMPLE_DATA is not set")
    sample = Path(os.environ["SHARDREC_SAMPLE_DATA"])
    root = tmp_path_factory.mktemp("configs")
    shutil.copytree(CONFIGS, root / "configs")
    for folder, (dataset, options) in LAYOUTS.items():
        prepare(dataset, input=sample / "movielens100k", output=root / "data" / folder, **options)
    return root


# criteo_synthetic.yaml is the data the Criteo-shaped configs include, not a job.
@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml") if "\nmodel:" in p.read_text()))
def test_config_loads_and_builds(tree: Path, config: str) -> None:
    job = load_job(tree / "configs" / config, [])
    model = registry.build_model(job.model_name, job.model_params, schema=job.features, device=torch.device("meta"))
    assert any(p.is_meta for p in model.parameters())
    if registry.get(job.model_name).retrieval:
        assert job.data.items_path is not None and Path(job.data.items_path).is_file()
