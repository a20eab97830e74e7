"""Checkpoint folders on disk (no DCP save here): which count as committed, their order, resolving a
resume path, partial checkpoints, and the checkpoint config's validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shardrec.config import build
from shardrec.errors import CheckpointError, ConfigError
from shardrec.checkpoint.store import META_FILE, committed, latest, read_meta, resolve_resume, step_dir
from shardrec.checkpoint.config import CheckpointConfig


def _commit(root: Path, step: int, **extra: object) -> Path:
    """A folder laid out like a committed checkpoint: DCP's .metadata plus meta.json."""
    path = step_dir(root, step)
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"dcp")
    (path / META_FILE).write_text(json.dumps({"step": step, **extra}))
    return path


def _partial(root: Path, name: str) -> Path:
    """A folder a crashed save leaves: shards, no meta.json."""
    path = root / name
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"shard")
    return path


def test_step_dir_name() -> None:
    assert step_dir(Path("/r"), 200) == Path("/r/step-00000200")
    assert step_dir(Path("/r"), 123_456_789).name == "step-123456789"


def test_committed_ignores_tmp_and_folders_without_meta(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    good = [_commit(root, s) for s in (100, 200)]
    tmp = _commit(root, 0)
    tmp.rename(root / "step-00000300.tmp")  # fully written but not yet renamed: still not committed
    _partial(root, "step-00000400.tmp")
    _partial(root, "step-00000500")  # right name, no meta.json
    (root / "step-00000600").write_text("a file, not a folder")
    (root / "notes").mkdir()
    (root / "notes" / META_FILE).write_text("{}")
    assert committed(root) == good
    assert latest(root) == good[-1]


def test_order_is_numeric_not_lexical(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (10, 9, 100, 1):
        _commit(root, step)
    # Past the 8-digit padding names grow wider: "step-100000000" sorts before "step-99999999" as text.
    _commit(root, 99_999_999)
    _commit(root, 100_000_000)
    assert [p.name for p in committed(root)] == [
        "step-00000001", "step-00000009", "step-00000010", "step-00000100", "step-99999999", "step-100000000",
    ]
    assert latest(root) == root / "step-100000000"


def test_step_9_before_step_10(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _commit(root, 10)
    _commit(root, 9)
    assert [p.name for p in committed(root)] == ["step-00000009", "step-00000010"]
    assert latest(root) == step_dir(root, 10)


def test_missing_or_empty_root(tmp_path: Path) -> None:
    assert committed(tmp_path / "nope") == [] and latest(tmp_path / "nope") is None
    (tmp_path / "empty").mkdir()
    assert committed(tmp_path / "empty") == [] and latest(tmp_path / "empty") is None
    _partial(tmp_path / "only_tmp", "step-00000005.tmp")
    assert latest(tmp_path / "only_tmp") is None


# resolve_resume -----------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "dlrm" / "20240101-000000"
    for step in (9, 10):
        _commit(run / "checkpoints", step)
    _partial(run / "checkpoints", "step-00000011.tmp")
    return run


def test_resolve_resume_from_run_folder(run_dir: Path) -> None:
    assert resolve_resume(run_dir) == run_dir / "checkpoints" / "step-00000010"


def test_resolve_resume_from_checkpoints_folder(run_dir: Path) -> None:
    assert resolve_resume(run_dir / "checkpoints") == run_dir / "checkpoints" / "step-00000010"


def test_resolve_resume_from_step_folder(run_dir: Path) -> None:
    step9 = run_dir / "checkpoints" / "step-00000009"
    assert resolve_resume(step9) == step9  # an older step is taken as given, not replaced by the newest


@pytest.mark.parametrize(
    "relative, message",
    [
        ("does-not-exist", "does not exist"),
        ("checkpoints/step-00000011.tmp", "is not a complete checkpoint"),
        ("empty-run", "no complete checkpoint under"),
        ("checkpoints/step-00000012", "is not a complete checkpoint"),
    ],
)
def test_resolve_resume_rejects_other_paths(run_dir: Path, relative: str, message: str) -> None:
    (run_dir / "empty-run").mkdir()
    _partial(run_dir / "checkpoints", "step-00000012")
    path = run_dir / relative
    with pytest.raises(CheckpointError, match=message) as info:
        resolve_resume(path)
    assert f"'{path}'" in str(info.value)


# read_meta ----------------------------------------------------------------------------------------


def test_read_meta_of_a_committed_checkpoint(tmp_path: Path) -> None:
    path = _commit(tmp_path, 42, batches=7, world_size=2)
    assert read_meta(path) == {"step": 42, "batches": 7, "world_size": 2}


@pytest.mark.parametrize("missing", [META_FILE, ".metadata"])
def test_read_meta_on_partial_checkpoint_says_it_may_be_interrupted(tmp_path: Path, missing: str) -> None:
    path = _commit(tmp_path, 5)
    (path / missing).unlink()
    with pytest.raises(CheckpointError) as info:
        read_meta(path)
    message = str(info.value)
    assert f"'{path}' is not a complete checkpoint" in message
    assert "interrupted" in message and "step-N" in message


def test_read_meta_on_tmp_folder(tmp_path: Path) -> None:
    path = _partial(tmp_path, "step-00000005.tmp")
    with pytest.raises(CheckpointError, match="may be a save that was interrupted"):
        read_meta(path)


def test_read_meta_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "step-00000001"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        read_meta(path)
    assert str(path) in str(info.value)


# CheckpointConfig ---------------------------------------------------------------------------------


def test_checkpoint_config_defaults() -> None:
    cfg = CheckpointConfig()
    assert (cfg.enabled, cfg.interval, cfg.keep_last_n) == (True, 0, 3)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"interval": -1}, "checkpoint.interval must be >= 0, got -1"),
        ({"keep_last_n": 0}, "checkpoint.keep_last_n must be >= 1, got 0"),
        ({"interval": "often"}, "'checkpoint.interval' must be of type int, got 'often'"),
        ({"enabled": "yes"}, "'checkpoint.enabled' must be of type bool, got 'yes'"),
        ({"keep": 2}, "unknown config key 'checkpoint.keep'; valid keys under 'checkpoint' are: async_save, enabled, interval, keep_last_n, warm_start"),
    ],
)
def test_checkpoint_config_errors_name_the_key(data: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(CheckpointConfig, data, key="checkpoint")
    assert expected in str(info.value)


def test_checkpoint_config_accepts_valid_values() -> None:
    cfg = build(CheckpointConfig, {"enabled": False, "interval": 50, "keep_last_n": 1}, key="checkpoint")
    assert (cfg.enabled, cfg.interval, cfg.keep_last_n) == (False, 50, 1)


def test_read_meta_refuses_another_format_and_names_the_version(tmp_path: Path) -> None:
    path = _commit(tmp_path, 5, format=2, shardrec_version="9.0.0")
    with pytest.raises(CheckpointError, match=r"format 2 \(written by shardrec 9\.0\.0\).*reads format 1"):
        read_meta(path)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    import random

    import numpy as np

    from shardrec.train.rng import rng_states, set_rng_states

    torch.manual_seed(3)
    torch.save(rng_states(), tmp_path / "rng.pt")
    first = (torch.rand(3), random.random(), float(np.random.rand()))
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), random.random(), float(np.random.rand()))
    assert torch.equal(again[0], first[0]) and again[1:] == first[1:]
