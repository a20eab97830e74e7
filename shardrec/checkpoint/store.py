"""Checkpoints with torch.distributed.checkpoint (DCP): sharded model, both optimizers, step.

Layout of a run folder::

    checkpoints/step-00000200/      committed checkpoint (DCP shards + .metadata + meta.json)
    checkpoints/step-00000300.tmp/  a save in progress or interrupted; never read

A checkpoint is written under a ``.tmp`` name and renamed by rank 0 once every rank has finished
(shardrec/checkpoint/async_saver.py), so a crash during a save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch import nn
from torch.optim import Optimizer

from shardrec import __version__
from shardrec.errors import CheckpointError
from shardrec.checkpoint import relayout
from shardrec.checkpoint.dcp_reader import SavedCheckpoint
from shardrec.checkpoint.safe_read import safe_load

_STEP_DIR = re.compile(r"^step-(\d+)$")
META_FILE = "meta.json"
FORMAT = 1
"""Version of the checkpoint layout (meta.json, rank files, key names) this shardrec writes and reads."""


def step_dir(root: Path, step: int) -> Path:
    """Folder of the checkpoint taken after ``step`` steps."""
    return root / f"step-{step:08d}"


def committed(root: Path) -> list[Path]:
    """Committed checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest(root: Path) -> Path | None:
    """The newest committed checkpoint under ``root``, if any."""
    found = committed(root)
    return found[-1] if found else None


def read_meta(path: Path) -> dict[str, Any]:
    """The meta.json of a committed checkpoint, with errors that name the path."""
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a run folder or a checkpoints/step-N folder")
    meta = path / META_FILE
    if not meta.is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(
            f"'{path}' is not a complete checkpoint (no {META_FILE} or .metadata); it may be a save that was "
            "interrupted: resume from an earlier checkpoints/step-N folder"
        )
    data = json.loads(meta.read_text())
    written = int(data.get("format", 1))  # checkpoints from before the field existed are format 1
    if written != FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' has format {written} (written by shardrec {data.get('shardrec_version', '?')}), this "
            f"shardrec {__version__} reads format {FORMAT}: use the shardrec version that wrote it"
        )
    return data


def rank_file(path: Path, rank: int) -> Path:
    """The per-rank part of a checkpoint: RNG states of rank ``rank``."""
    return path / f"rank-{rank:05d}.pt"


def load(path: Path, *, model: nn.Module, optimizer: Optimizer, warn: bool = True) -> dict[str, Any]:
    """Loads ``path`` into ``model`` and ``optimizer`` in place and returns its meta (step ...).

    Each rank reads the rows of its own shards straight from the DCP files into the model's memory
    (shardrec/checkpoint/dcp_reader.py: one pass, no collectives), so the checkpoint may come from another world
    size or plan. Every model
    tensor must be in the checkpoint with the same global shape, or this raises a CheckpointError
    naming what differs. Optimizer state that the checkpoint holds in another layout (a table that
    was column-wise and is table-wise now, or data-parallel and fused now) is converted
    (shardrec/checkpoint/relayout.py); what cannot be converted starts from zero, with a warning
    naming the tables (``warn`` on rank 0).
    """
    meta = read_meta(path)
    saved = SavedCheckpoint(path)
    saved.check_files()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    flat, mapping = flatten_state_dict(state)
    _check_model(path, flat, saved.entries)
    other = [k for k, v in flat.items() if k.startswith("optim.state.") and _mismatch(v, saved.entries.get(k)) is not None]
    try:
        rest = [k for k in flat if k not in other and not _read_in_place(saved, k, flat[k])]
        if rest:  # entries that are not tensors: DCP's own reader
            safe_load(_without(state, [mapping[k] for k in flat if k not in rest]), path)
        failed = relayout.convert(saved, flat, other, step=int(meta["step"]))
    except CheckpointError:
        raise
    except Exception as e:  # DCP reports damaged files as assorted exceptions
        raise CheckpointError(f"checkpoint '{path}' could not be read: {e}") from e
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    recast = precision_changes(flat, saved.entries)
    converted = {_param_of(k) for k in other if k not in failed and not k.endswith(".step")}
    zeroed = {_param_of(k) for k in failed}
    if dist.is_initialized() and dist.get_world_size() > 1:  # a rank without shards of a table has no state for it
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (converted, zeroed))
        converted, zeroed = set().union(*(c for c, _ in everyone)), set().union(*(z for _, z in everyone))
    if warn and recast:
        print(f"note: weights of {', '.join(recast)} converted from the checkpoint's precision (a table of another "
              "'precision' than when it was saved)", flush=True)
    if warn and converted:
        print(f"note: optimizer state of {sorted(converted)} converted from the layout of checkpoint '{path}' "
              "(docs/checkpointing.md, 'Optimizer state across layouts')", flush=True)
    if warn and zeroed:
        print(f"warning: optimizer state starts from zero for {sorted(zeroed)}: checkpoint "
              f"'{path}' holds it in a form that cannot be converted", flush=True)
    return meta


def precision_changes(flat: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """``table: fp16 -> fp32`` for each model tensor whose dtype differs from its checkpoint entry
    (read with a cast: fp16 values widen exactly, fp32 ones round to nearest)."""
    out = []
    for k, v in flat.items():
        md = saved.get(k)
        if k.startswith("model.") and isinstance(v, torch.Tensor) and isinstance(md, TensorStorageMetadata) \
                and md.properties.dtype != v.dtype:
            out.append(f"{table_of_key(k) or k[6:]} {_DTYPE_NAMES.get(md.properties.dtype, md.properties.dtype)} -> "
                       f"{_DTYPE_NAMES.get(v.dtype, v.dtype)}")
    return sorted(set(out))


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _read_in_place(saved: SavedCheckpoint, key: str, value: Any) -> bool:
    """Reads tensor ``key`` into ``value``'s local memory (every local shard of a ShardedTensor)
    straight from the files: one pass, no collectives. False if ``value`` is not a tensor."""
    if isinstance(value, ShardedTensor):
        for shard in value.local_shards():
            m = shard.metadata
            saved.read_into(key, tuple((o, o + n) for o, n in zip(m.shard_offsets, m.shard_sizes)), shard.tensor)
        return True
    if isinstance(value, torch.Tensor):
        saved.read_into(key, tuple((0, n) for n in value.shape), value)
        return True
    return False


def _mismatch(value: Any, saved: Any) -> str | None:
    """Why ``value`` cannot load from the checkpoint entry ``saved`` (None: it can)."""
    if saved is None:
        return "missing"
    if isinstance(value, torch.Tensor) and isinstance(saved, TensorStorageMetadata):
        if tuple(value.size()) != tuple(saved.size):
            return f"shape {list(saved.size)} in the checkpoint, {list(value.size())} in the model"
    return None


def _check_model(path: Path, flat: dict[str, Any], saved: dict[str, Any]) -> None:
    """Raises a CheckpointError naming model tensors that are missing, extra or of another shape."""
    problems = [f"{k[6:]}: {why}" for k, v in flat.items() if k.startswith("model.") and (why := _mismatch(v, saved.get(k)))]
    extra = sorted(k[6:] for k in saved if k.startswith("model.") and k not in flat)
    problems += [f"{k}: in the checkpoint, not in the model" for k in extra]
    if problems:
        raise CheckpointError(f"checkpoint '{path}' was written by a different model: {first_problems(problems)}")


def first_problems(problems: list[str], most: int = 8) -> str:
    """The first ``most`` of ``problems`` joined by "; ", and how many more there are."""
    return "; ".join(problems[:most]) + (f"; and {len(problems) - most} more" if len(problems) > most else "")


def _without(state: dict[str, Any], paths: list[tuple[Any, ...]]) -> dict[str, Any]:
    """A copy of nested ``state`` without the leaves at ``paths``; the other leaves are shared."""
    if not paths:
        return state
    heads: dict[Any, list[tuple[Any, ...]]] = {}
    for p in paths:
        heads.setdefault(p[0], []).append(p[1:])
    out = {}
    for key, value in state.items():
        rest = heads.get(key)
        if rest is None:
            out[key] = value
        elif any(len(r) == 0 for r in rest):
            continue
        elif isinstance(value, dict):
            kept = _without(value, rest)
            if kept:  # DCP would look an emptied dict up as a key of its own
                out[key] = kept
        else:
            out[key] = value
    return out


def _param_of(flat_key: str) -> str:
    """The table (or parameter) an optimizer state entry belongs to."""
    key = flat_key.removeprefix("optim.state.")
    return table_of_key(key) or key.rsplit(".", 1)[0]


TABLE_MARKERS = (".embedding_bags.", ".embeddings.")


def table_of_key(key: str) -> str | None:
    """The embedding table a state-dict key belongs to (the name after ``.embedding_bags.``), if any."""
    for marker in TABLE_MARKERS:
        if marker in key:
            return key.split(marker, 1)[1].split(".")[0]
    return None


def resolve_resume(path: Path) -> Path:
    """A run folder, its checkpoints folder or a step folder -> the checkpoint to resume from."""
    if not path.exists():
        raise CheckpointError(f"checkpoint path '{path}' does not exist; pass a run folder or a checkpoints/step-N folder")
    if (path / META_FILE).is_file() or _STEP_DIR.match(path.name.removesuffix(".tmp")):
        read_meta(path)  # a step folder: complete, or an error that says it is not
        return path
    for root in (path / "checkpoints", path):
        found = latest(root)
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint under '{path}'; pass a run folder that has checkpoints/step-N")


def open_for_rewrite(path: Path, *, out: Path, label: str) -> tuple[Path, dict[str, Any], SavedCheckpoint]:
    """The committed checkpoint at ``path`` (a run or step folder) opened for an offline rewrite
    into ``out``: its resolved path, meta.json and files, each checked; ``out`` must not exist."""
    path = resolve_resume(Path(path))
    meta = read_meta(path)
    if out.exists():
        raise CheckpointError(f"{label} '{out}' already exists; pass another --out or remove it")
    saved = SavedCheckpoint(path)
    saved.check_files()
    return path, meta, saved
