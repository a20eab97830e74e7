"""Reading a checkpoint must never run code from it.

DCP's ``FileSystemReader.read_metadata`` unpickles ``.metadata`` with plain ``pickle.load``, and
its ``DefaultLoadPlanner.load_bytes`` reads every non-tensor value with
``torch.load(weights_only=False)``: a crafted checkpoint (a ``__reduce__`` calling ``os.system``)
runs its payload as soon as it is opened. Checkpoints travel between teams and shared file
systems, so every shardrec path that opens one goes through here instead:

- :func:`read_metadata` unpickles ``.metadata`` with :class:`MetadataUnpickler`, which resolves
  only the classes DCP's metadata is made of (its dataclasses, ``_StorageInfo``, ``torch.Size``,
  dtypes, layouts, memory formats and paths); any other global is a :class:`CheckpointError`
  naming the file, raised before anything is called.
- :class:`SafeReader` and :class:`SafeLoadPlanner` are what ``dcp.load`` gets: the same
  metadata reader, and non-tensor values through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.planner import ReadItem

from shardrec.errors import CheckpointError

METADATA_FILE = ".metadata"

_DCP = "torch.distributed.checkpoint.metadata"
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    (_DCP, "Metadata"), (_DCP, "StorageMeta"), (_DCP, "MetadataIndex"), (_DCP, "ChunkStorageMetadata"),
    (_DCP, "TensorStorageMetadata"), (_DCP, "BytesStorageMetadata"), (_DCP, "TensorProperties"),
    (_DCP, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
})
"""Globals a DCP ``.metadata`` may name; torch dtypes are admitted by value, not listed here."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata, refusing every global outside :data:`ALLOWED` and torch's dtypes."""

    def __init__(self, file: Any, *, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"'{self.path}' names '{module}.{name}', which a checkpoint's metadata never holds; it was not loaded "
            "(nothing in it ran). Open only checkpoints written by shardrec or torch.distributed.checkpoint"
        )


def read_metadata(folder: Path, *, rank: int | None = None) -> Metadata:
    """The DCP metadata of the checkpoint in ``folder`` (``rank``: that rank's own metadata file,
    which DCP falls back to), read without running code from it.

    Raises:
        CheckpointError: the file is missing, truncated, or names a global outside ALLOWED.
    """
    path = Path(folder) / (METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}")
    try:
        with path.open("rb") as f:
            metadata = MetadataUnpickler(f, path=path).load()
    except FileNotFoundError as e:
        raise CheckpointError(f"'{folder}' holds no {path.name}: it is not a complete DCP checkpoint") from e
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or garbled pickle raises anything from EOFError to TypeError
        raise CheckpointError(f"'{path}' cannot be read ({type(e).__name__}: {e}); the checkpoint is damaged") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"'{path}' holds a {type(metadata).__name__}, not DCP metadata; the checkpoint is damaged")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file system reader with :func:`read_metadata` in place of its ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(Path(str(self.path)), rank=kwargs.get("rank"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor values with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [s.strip() for s in str(e).splitlines() if s.strip()]
            reason = next((s for s in lines if "Unsupported global" in s), lines[0] if lines else "")
            raise CheckpointError(
                f"checkpoint value '{fqn}' is not plain data (a weights-only load refused it: {reason}); "
                "nothing in it ran. Open only checkpoints written by shardrec"
            ) from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def safe_load(state: dict[str, Any], path: Path) -> None:
    """``dcp.load(state)`` from the checkpoint at ``path`` through SafeReader and SafeLoadPlanner.

    DCP reports a failure on any rank as a CheckpointException (a BaseException carrying each
    rank's error and traceback); it comes out here as one CheckpointError line.
    """
    try:
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
    except CheckpointException as e:
        first = next(iter(e.failures.values()))[0] if e.failures else e
        if isinstance(first, CheckpointError):
            raise CheckpointError(str(first)) from None
        raise CheckpointError(f"checkpoint '{path}' could not be read: {type(first).__name__}: {first}") from None
