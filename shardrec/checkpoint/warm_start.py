"""Warm start: a new model initialized from another run's checkpoint, tables renamed as asked.

Unlike ``--resume`` this starts a new run at step 0: weights (and, when asked, the optimizer
state) come from the checkpoint wherever a tensor of the same name, after renaming tables, and
the same shape is found; everything else keeps its fresh initialization, with a warning naming
it. DCP reshards on load, so the checkpoint may come from any world size or plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.optim import Optimizer

from shardrec.errors import ConfigError
from shardrec.checkpoint.store import TABLE_MARKERS, read_meta, resolve_resume, table_of_key
from shardrec.checkpoint.config import WarmStartConfig
from shardrec.checkpoint.safe_read import read_metadata, safe_load

def _rename(key: str, tables: dict[str, str]) -> str:
    """``key`` with its table name (after an embedding marker, and in fused state names) mapped."""
    for marker in TABLE_MARKERS:
        if marker in key:
            head, tail = key.split(marker, 1)
            name, _, rest = tail.partition(".")
            old = tables.get(name, name)
            rest = rest.replace(f".{name}.", f".{old}.") if rest.startswith("weight.") else rest
            return f"{head}{marker}{old}.{rest}" if rest else f"{head}{marker}{old}"
    return key


def warm_start(cfg: WarmStartConfig, *, model: nn.Module, optimizer: Optimizer, warn: bool) -> list[str]:
    """Loads what matches from the checkpoint into ``model`` (and ``optimizer``); returns what was skipped."""
    path = resolve_resume(Path(cfg.path))
    read_meta(path)
    saved = read_metadata(path).state_dict_metadata
    state = {"model": model.state_dict(), **({"optim": optimizer.state_dict()} if cfg.optimizer else {})}
    flat, _ = flatten_state_dict(state)
    wanted, skipped = {}, []
    for key, value in flat.items():
        if not isinstance(value, torch.Tensor):
            continue  # param groups (learning rates ...) come from the new job
        source = _rename(key, cfg.tables)
        md = saved.get(source)
        if isinstance(md, TensorStorageMetadata) and tuple(md.size) == tuple(value.size()):
            wanted[source] = value
        else:
            skipped.append(key)
    _check_renames(cfg, saved)
    safe_load(wanted, path)
    model.load_state_dict(state["model"])
    if cfg.optimizer:
        optimizer.load_state_dict(state["optim"])
    if skipped and warn:
        print(f"warning: warm start from '{path}' kept fresh values for {len(skipped)} tensors not in it "
              f"(or of another shape): {', '.join(sorted(skipped)[:8])}{' ...' if len(skipped) > 8 else ''}", flush=True)
    return skipped


def _check_renames(cfg: WarmStartConfig, saved: dict[str, Any]) -> None:
    names = {name for k in saved if (name := table_of_key(k)) is not None}
    missing = sorted(old for old in cfg.tables.values() if old not in names)
    if missing:
        raise ConfigError(
            f"checkpoint.warm_start.tables maps to {missing}, not tables of checkpoint '{cfg.path}'; "
            f"its tables: {', '.join(sorted(names))}"
        )
