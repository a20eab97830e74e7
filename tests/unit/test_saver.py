"""The saver: staging copies, commit only when the write is done, pruning, sync and async alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from shardrec.checkpoint.store import committed, latest, load
from shardrec.checkpoint.async_saver import Saver, stage


def test_stage_copies_tensors_so_later_updates_do_not_leak_in() -> None:
    state = {"model": {"w": torch.ones(3)}, "optim": {"param_groups": [{"lr": 0.1, "params": ["w"]}]}}
    staged = stage(state)
    state["model"]["w"].add_(1)
    state["optim"]["param_groups"][0]["lr"] = 0.5
    assert staged["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert staged["optim"]["param_groups"][0]["lr"] == 0.1


@pytest.mark.parametrize("asynchronous", [False, True])
def test_saves_commit_with_meta_and_prune(tmp_path: Path, asynchronous: bool) -> None:
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = Saver(tmp_path, is_main=True, keep_last_n=2, asynchronous=asynchronous)
    weights = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(step))
        weights[step] = model.weight.clone()
        saver.save(step=step, model=model, optimizer=optimizer, meta={"model": "linear"}, attach={"note.txt": f"{step}"})
        with torch.no_grad():
            model.weight.fill_(-1.0)  # what the save holds must be the weights at save time
        if asynchronous:
            assert latest(tmp_path) is None or latest(tmp_path).name != f"step-{step:08d}"  # not committed yet
    saver.close()
    assert [p.name for p in committed(tmp_path)] == ["step-00000002", "step-00000003"]
    assert not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "step-00000003" / "note.txt").read_text() == "3"
    meta = load(tmp_path / "step-00000003", model=model, optimizer=optimizer)
    assert meta["step"] == 3 and torch.equal(model.weight, weights[3])


_KILLED = """
import os, sys, torch
from torch import nn
from shardrec.checkpoint.async_saver import Saver
model = nn.Linear(2048, 2048)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
saver = Saver(__import__("pathlib").Path(sys.argv[1]), is_main=True, keep_last_n=3, asynchronous=True)
with torch.no_grad():
    model.weight.fill_(1.0)
saver.save(step=1, model=model, optimizer=opt, meta={}, attach={})
saver.wait()
with torch.no_grad():
    model.weight.fill_(2.0)
saver.save(step=2, model=model, optimizer=opt, meta={}, attach={})
os.kill(os.getpid(), 9)  # dies while step 2 is being written, before it can commit
"""


def test_a_process_killed_during_an_async_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]
    assert latest(tmp_path) == tmp_path / "step-00000001"
    model = nn.Linear(2048, 2048)
    meta = load(tmp_path / "step-00000001", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert meta["step"] == 1 and bool((model.weight == 1.0).all())
