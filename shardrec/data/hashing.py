"""Stable, vectorized hashing of raw ids (strings or integers) into table rows ``[0, rows)``.

Strings and bytes use 64-bit FNV-1a over their UTF-8 bytes; integers use the splitmix64 finalizer
of their 64-bit two's-complement pattern. Both are pure functions of the id, so every process,
rank and run maps an id to the same row (Python's ``hash()`` is salted per process and is never
used).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_OFFSET_TYPES = {pa.string(): np.int32, pa.binary(): np.int32, pa.large_string(): np.int64, pa.large_binary(): np.int64}


def is_string_type(t: pa.DataType) -> bool:
    """Whether ``t`` holds strings or bytes that ``fnv1a64`` can hash."""
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_string_view(t)
        or pa.types.is_binary_view(t)
    )


def fnv1a64(arr: pa.Array) -> np.ndarray:
    """64-bit FNV-1a of each string's UTF-8 bytes (or each binary value's bytes).

    Runs one numpy step per byte position over the strings still that long, so the work is the
    total byte count plus the longest length. Null entries hash whatever bytes back them: drop
    them first.

    Args:
        arr: string, large_string, binary, large_binary (or view) array.

    Returns:
        uint64 array of ``len(arr)`` hashes.
    """
    if arr.type not in _OFFSET_TYPES:
        arr = arr.cast(pa.large_binary())
    offsets, data = _offsets_and_data(arr)
    lengths = np.diff(offsets)
    # Longest first: at byte position j the strings still active are a prefix of this order.
    order = np.argsort(-lengths, kind="stable")
    starts = offsets[:-1][order]
    active_per_position = len(arr) - np.searchsorted(np.sort(lengths), np.arange(int(lengths.max(initial=0))), side="right")
    hashes = np.full(len(arr), _FNV_OFFSET, dtype=np.uint64)
    for j, n in enumerate(active_per_position):
        h = hashes[:n]
        h ^= data[starts[:n] + j]
        h *= _FNV_PRIME
    out = np.empty_like(hashes)
    out[order] = hashes
    return out


def _offsets_and_data(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The ``len(arr) + 1`` value offsets (honouring a slice offset) and the byte buffer."""
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=_OFFSET_TYPES[arr.type])[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    return offsets.astype(np.int64), data


def splitmix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer of each value's 64-bit two's-complement pattern.

    Args:
        values: any integer numpy array; narrower ints hash like the same int64 value.

    Returns:
        uint64 array of the same shape.
    """
    z = values.astype(np.int64, copy=False).view(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def hash_ids(arr: pa.Array, rows: int) -> np.ndarray:
    """Hashes non-null ids into ``[0, rows)``.

    Args:
        arr: integer array (splitmix64) or string/binary array (FNV-1a), without nulls.
        rows: number of table rows, > 0.

    Returns:
        int64 array of ``len(arr)`` row indices.
    """
    if is_string_type(arr.type):
        hashes = fnv1a64(arr)
    elif pa.types.is_integer(arr.type):
        hashes = splitmix64(arr.to_numpy())
    else:
        raise TypeError(f"hash_ids: cannot hash ids of type {arr.type}; expected integers or strings")
    return (hashes % np.uint64(rows)).astype(np.int64)
