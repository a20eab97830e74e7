"""Reads parts of tensors straight from a DCP checkpoint's files, without a process group.

DCP writes each chunk (one rank's shard of a tensor) with ``torch.save`` into a ``.distcp`` file
at an offset it records in ``.metadata``. A ``torch.save`` file is an uncompressed zip, so the
chunk's bytes lie contiguously in the file: :class:`SavedCheckpoint` finds them and reads just the
rows asked for. The offline tools (export, reshard) and the optimizer-state conversion on load use
it to touch a few rows of a table at a time, never a whole table.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

from shardrec.checkpoint.safe_read import read_metadata
from shardrec.errors import CheckpointError

Box = tuple[tuple[int, int], ...]
"""A rectangular part of a tensor: one ``(start, stop)`` per dimension."""


@dataclass(frozen=True)
class _Stored:
    """Where a chunk's raw bytes are: file, byte offset of element 0, and the chunk's shape."""

    file: Path
    data_offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class _FileView(io.RawIOBase):
    """The bytes ``[start, start + length)`` of an open file, as a seekable file of their own."""

    def __init__(self, f: IO[bytes], start: int, length: int) -> None:
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence]
        self.pos = base + offset
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


class SavedCheckpoint:
    """A committed DCP checkpoint folder opened for reading parts of its tensors."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        metadata = read_metadata(self.path)
        self.entries: dict[str, Any] = metadata.state_dict_metadata
        self.paths: dict[str, tuple[str, ...]] = metadata.planner_data or {}
        """Each flat key's path in the nested state dict, as DCP recorded it."""
        self._storage: dict[MetadataIndex, Any] = metadata.storage_data
        self._stored: dict[tuple[str, tuple[int, ...]], _Stored] = {}

    @cached_property
    def tensors(self) -> dict[str, TensorStorageMetadata]:
        """Every tensor entry: key -> its global size, dtype and chunks."""
        return {k: v for k, v in self.entries.items() if isinstance(v, TensorStorageMetadata)}

    def check_files(self) -> None:
        """Raises a CheckpointError naming a data file that is missing or shorter than ``.metadata`` says."""
        need: dict[str, int] = {}
        for info in self._storage.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        for name, size in sorted(need.items()):
            file = self.path / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint '{self.path}' is incomplete: data file '{name}' is missing; "
                                      "restore the folder from a copy or resume from an earlier checkpoints/step-N")
            if file.stat().st_size < size:
                raise CheckpointError(
                    f"checkpoint '{self.path}' is truncated: '{name}' has {file.stat().st_size} bytes, its .metadata "
                    f"needs {size}; restore the folder from a copy or resume from an earlier checkpoints/step-N"
                )

    def read(self, key: str, box: Box | None = None) -> torch.Tensor:
        """The part ``box`` (default: all) of tensor ``key``, read from the chunks that overlap it."""
        md = self.tensors.get(key)
        if md is None:
            raise CheckpointError(f"checkpoint '{self.path}' has no tensor '{key}'")
        box = box or tuple((0, n) for n in md.size)
        out = torch.empty([b - a for a, b in box], dtype=md.properties.dtype)
        for chunk in md.chunks:
            part = _intersect(box, chunk)
            if part is not None:
                local = tuple((a - o, b - o) for (a, b), o in zip(part, chunk.offsets))
                target = tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(part, box))
                out[target] = self._read_chunk(key, chunk, local)
        return out

    def read_into(self, key: str, box: Box, dest: torch.Tensor) -> None:
        """Reads the part ``box`` of tensor ``key`` into ``dest`` (shaped like ``box``), straight from
        the file into ``dest``'s memory wherever a chunk's rows land contiguously there."""
        md = self.tensors.get(key)
        if md is None:
            raise CheckpointError(f"checkpoint '{self.path}' has no tensor '{key}'")
        if not box:
            dest.copy_(self.read(key))
            return
        for chunk in md.chunks:
            part = _intersect(box, chunk)
            if part is None:
                continue
            local = tuple((a - o, b - o) for (a, b), o in zip(part, chunk.offsets))
            region = dest[tuple(slice(a - s, b - s) for (a, b), (s, _) in zip(part, box))]
            whole_rows = all(lo == 0 and hi == n for (lo, hi), n in zip(local[1:], chunk.sizes[1:]))
            if whole_rows and region.is_contiguous() and region.dtype == md.properties.dtype:
                self._read_rows_into(key, chunk, local[0], region)
            else:
                region.copy_(self._read_chunk(key, chunk, local))

    def _read_rows_into(self, key: str, chunk: ChunkStorageMetadata, rows: tuple[int, int], dest: torch.Tensor) -> None:
        """Reads whole rows ``rows`` of one chunk from disk into contiguous ``dest``."""
        stored = self._locate(key, chunk)
        buf = dest.view(torch.uint8).reshape(-1).numpy()
        if not buf.nbytes:
            return
        row_bytes = math.prod(stored.shape[1:]) * dest.element_size()
        with open(stored.file, "rb") as f:
            f.seek(stored.data_offset + rows[0] * row_bytes)
            if f.readinto(buf) != buf.nbytes:
                raise CheckpointError(f"checkpoint '{self.path}': '{stored.file.name}' ends inside tensor '{key}'")

    def read_bytes(self, key: str) -> bytes:
        """The stored bytes of non-tensor entry ``key``."""
        info = self._storage[MetadataIndex(key)]
        with open(self.path / info.relative_path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)

    def _read_chunk(self, key: str, chunk: ChunkStorageMetadata, box: Box) -> torch.Tensor:
        """Rows ``box[0]`` of one chunk read from disk, then narrowed to the rest of ``box``."""
        stored = self._locate(key, chunk)
        if not stored.shape:
            return self._load_whole(key, chunk)
        (r0, r1), rest = box[0], box[1:]
        rows = torch.empty([r1 - r0, *stored.shape[1:]], dtype=stored.dtype)
        self._read_rows_into(key, chunk, (r0, r1), rows)
        return rows[(slice(None), *(slice(a, b) for a, b in rest))]

    def _locate(self, key: str, chunk: ChunkStorageMetadata) -> _Stored:
        """Finds where the chunk's element 0 is in its file (cached)."""
        cache_key = (key, tuple(chunk.offsets))
        if cache_key not in self._stored:
            info = self._storage[MetadataIndex(key, chunk.offsets)]
            if info.transform_descriptors:
                raise CheckpointError(f"checkpoint '{self.path}': tensor '{key}' is stored with transforms "
                                      f"{info.transform_descriptors}, which shardrec's offline tools do not read")
            self._stored[cache_key] = find_data(self.path / info.relative_path, info.offset, info.length, key=key)
        return self._stored[cache_key]

    def _load_whole(self, key: str, chunk: ChunkStorageMetadata) -> torch.Tensor:
        info = self._storage[MetadataIndex(key, chunk.offsets)]
        with open(self.path / info.relative_path, "rb") as f:
            return torch.load(_FileView(f, info.offset, info.length), map_location="cpu", weights_only=True)


def _intersect(box: Box, chunk: ChunkStorageMetadata) -> Box | None:
    out = []
    for (a, b), o, n in zip(box, chunk.offsets, chunk.sizes):
        lo, hi = max(a, o), min(b, o + n)
        if lo >= hi and not (a == b == 0 and n == 0):
            return None
        out.append((lo, hi))
    return tuple(out)


def find_data(file: Path, start: int, length: int, *, key: str) -> _Stored:
    """Reads the zip directory and the tensor header of one ``torch.save`` record, not its data."""
    with open(file, "rb") as f:
        view = _FileView(f, start, length)
        try:
            with torch.serialization.skip_data():
                header = torch.load(view, map_location="cpu", weights_only=True)
            view.seek(0)
            with zipfile.ZipFile(view) as z:
                (info,) = [i for i in z.infolist() if i.filename.split("/")[-2:-1] == ["data"]]
                view.seek(info.header_offset)
                local = view.read(30)
                name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        except (zipfile.BadZipFile, ValueError, RuntimeError, EOFError) as e:
            raise CheckpointError(f"checkpoint file '{file}' is damaged at tensor '{key}': {e}") from e
    if not isinstance(header, torch.Tensor) or not header.is_contiguous() or header.storage_offset() != 0:
        raise CheckpointError(f"checkpoint file '{file}': tensor '{key}' is not stored as one contiguous block")
    data = start + info.header_offset + 30 + name_len + extra_len
    return _Stored(file=file, data_offset=data, shape=tuple(header.shape), dtype=header.dtype)
