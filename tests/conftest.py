"""Shared fixtures: tiny jobs, free ports, and markers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def sample_data() -> Path:
    """The shared real-data folder named by SHARDREC_SAMPLE_DATA; skips the test when unset."""
    value = os.environ.get("SHARDREC_SAMPLE_DATA")
    if not value:
        pytest.skip("SHARDREC_SAMPLE_DATA is not set")
    return Path(value)
