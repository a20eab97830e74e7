"""One rank's batches: each worker's rows -> (shuffled) decoded chunks -> batches, in or out of process.

A rank's share of rows is cut into batches and the batches into ``W`` contiguous runs, one per
worker (``W = max(num_workers, 1)``). With ``num_workers > 0`` a torch DataLoader runs the workers
and hands their batches over in round-robin order, which is deterministic, so ``round_robin`` can
tell how far each worker got after ``k`` batches and a resumed DataLoader can start at the right
worker (by rotating which DataLoader worker runs which share).
"""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.batch import Batch
from shardrec.data.decode import Assembler, Chunk, decode
from shardrec.data.schema import FeatureSchema
from shardrec.data.sources import CsvSource, ParquetSource, Part
from shardrec.errors import DataError

Source = ParquetSource | CsvSource
Item = tuple[Batch, int, int]
"""A batch, the worker that made it, and the rows that worker has dropped so far."""


@dataclass(frozen=True)
class Share:
    """One worker's rows ``[lo, hi)``, cut into ``batches`` batches of ``batch_size`` (the last may be short)."""

    lo: int
    hi: int
    batches: int
    batch_size: int

    def size(self, k: int) -> int:
        """Rows of batch ``k``."""
        return min(self.batch_size, self.hi - self.lo - k * self.batch_size)


def split(first: int, end: int, *, batch_size: int, workers: int) -> list[Share]:
    """Rows ``[first, end)`` as ``workers`` runs of whole batches; only the very last batch is short."""
    total = math.ceil((end - first) / batch_size)
    shares = []
    for w in range(workers):
        b0, b1 = total * w // workers, total * (w + 1) // workers
        lo, hi = min(first + b0 * batch_size, end), min(first + b1 * batch_size, end)
        shares.append(Share(lo=lo, hi=hi, batches=b1 - b0, batch_size=batch_size))
    return shares


def round_robin(counts: list[int], k: int) -> tuple[list[int], int]:
    """After the first ``k`` items of a round-robin over workers holding ``counts`` items (the
    exhausted ones skipped, as a DataLoader does): the items each worker gave, and who gives next."""
    r = 0
    while True:
        active = [w for w, c in enumerate(counts) if c > r]
        if not active or k < len(active):
            taken = [min(c, r) for c in counts]
            for w in active[:k]:
                taken[w] = r + 1
            return taken, active[k] if k < len(active) else 0
        k -= len(active)
        r += 1


@dataclass(frozen=True, kw_only=True)
class Order:
    """How a worker orders its rows and treats bad ones."""

    schema: FeatureSchema
    shuffle_buffer: int
    seed: int
    epoch: int
    rank: int
    on_bad_rows: Literal["error", "skip"]


class WorkerStream:
    """One worker's batches from batch ``start`` of its share on.

    Rows are decoded a part (row group slice, CSV block) at a time, or, with a shuffle buffer of
    ``S`` rows, a window at a time: the share's rows ``[lo + jS, lo + (j+1)S)`` are read whole and
    decoded in the order of a permutation seeded by (seed, epoch, rank, worker, j). With
    ``on_bad_rows="skip"`` a part (or a window's rows of it) that fails to read or decode is dropped
    whole and counted, and the share is read again from its start to fill the planned batches
    with as many rows.
    """

    def __init__(self, source: Source, share: Share, order: Order, *, worker: int, start: int) -> None:
        self.source, self.share, self.order = source, share, order
        self.worker, self.start = worker, start
        self.skipped = 0

    @property
    def count(self) -> int:
        """Batches this stream yields."""
        return self.share.batches - self.start

    def __iter__(self) -> Iterator[Item]:
        self.skipped = 0
        # Dropped rows move every later batch, so a skip-mode resume replays the share from its start.
        first = 0 if self.order.on_bad_rows == "skip" else self.start
        chunks = self._chunks(first * self.share.batch_size)
        assembler = Assembler(self.order.schema)
        for k in range(first, self.share.batches):
            size = self.share.size(k)
            while assembler.rows < size:
                chunk = next(chunks, None)
                assert chunk is not None, "the share ran out of rows before its last batch"
                assembler.add(chunk)
            batch = assembler.take(size)
            if k >= self.start:
                yield batch, self.worker, self.skipped

    def _chunks(self, first_row: int) -> Iterator[Chunk]:
        yield from self._pass(first_row, count=True)
        if self.order.on_bad_rows == "error":
            return
        while True:
            rows = 0
            for chunk in self._pass(0, count=False):
                rows += chunk.rows
                yield chunk
            if not rows:
                raise DataError(
                    f"rank {self.order.rank}: every row of its share (rows {self.share.lo}-{self.share.hi - 1} of the data set, "
                    f"worker {self.worker}) failed to read or decode, so its {self.share.batches} batches cannot be filled; fix the data"
                )

    def _pass(self, first_row: int, *, count: bool) -> Iterator[Chunk]:
        if self.order.shuffle_buffer:
            yield from self._windows(first_row, count=count)
            return
        for part in self.source.read(self.share.lo + first_row, self.share.hi):
            chunk = self._decode(part, count=count)
            if chunk is not None:
                yield chunk

    def _decode(self, part: Part, *, count: bool) -> Chunk | None:
        try:
            if part.error is not None:
                raise part.error
            return decode(part.table, self.order.schema, part.where)
        except DataError as e:
            self._drop(part, e, count=count)
            return None

    def _drop(self, part: Part, error: DataError, *, count: bool) -> None:
        if self.order.on_bad_rows == "error":
            raise error
        if count:
            self.skipped += part.rows

    def _windows(self, first_row: int, *, count: bool) -> Iterator[Chunk]:
        size, o = self.order.shuffle_buffer, self.order
        lo, hi = self.share.lo, self.share.hi
        for j in range(first_row // size, math.ceil((hi - lo) / size)):
            a, b = lo + j * size, min(lo + (j + 1) * size, hi)
            perm = np.random.default_rng([o.seed, o.epoch, o.rank, self.worker, j]).permutation(b - a)
            perm = perm[max(first_row - j * size, 0) :]
            chunk = self._shuffled(list(self.source.read(a, b)), perm, where=f"shuffled rows {a}-{b - 1} of the data set", count=count)
            if chunk is not None:
                yield chunk

    def _shuffled(self, parts: list[Part], perm: np.ndarray, *, where: str, count: bool) -> Chunk | None:
        """Decodes the window's rows in ``perm`` order; bad parts raise or are left out."""
        bad: set[int] = set()
        for i, p in enumerate(parts):
            if p.error is not None:
                self._drop(p, p.error, count=count)
                bad.add(i)
        table = _gather(parts, bad, perm)
        try:
            return decode(table, self.order.schema, where) if table is not None else None
        except DataError as e:
            # Name the row group (or CSV rows) at fault: decode each part on its own.
            culprits = list(_culprits(parts, bad, self.order.schema))
            if not culprits:
                raise e
            for i, err in culprits:
                self._drop(parts[i], err, count=count)
                bad.add(i)
        table = _gather(parts, bad, perm)
        return decode(table, self.order.schema, where) if table is not None else None


def _gather(parts: list[Part], bad: set[int], perm: np.ndarray) -> pa.Table | None:
    """The window's rows in ``perm`` order (positions in the window), without the ``bad`` parts."""
    keep = np.concatenate([np.full(p.rows, i not in bad) for i, p in enumerate(parts)]) if parts else np.zeros(0, bool)
    chosen = perm[keep[perm]]
    if not len(chosen):
        return None
    tables = [p.table for i, p in enumerate(parts) if i not in bad]
    position = np.cumsum(keep) - 1
    return pa.concat_tables(tables, promote_options="permissive").take(position[chosen])


def _culprits(parts: list[Part], bad: set[int], schema: FeatureSchema) -> Iterator[tuple[int, DataError]]:
    for i, p in enumerate(parts):
        if i not in bad:
            try:
                decode(p.table, schema, p.where)
            except DataError as e:
                yield i, e


# ---------------------------------------------------------------------------------------------
# Running the workers: in process (optionally prefetched by a thread) or through a DataLoader.


PACK_ROWS = 16_384
"""Rows a worker process hands over at once. Every tensor crossing to the training process costs a
shared-memory segment and a file descriptor (about as much as decoding a few thousand rows), so a
worker packs consecutive batches into a few large tensors and the training process cuts them apart."""


@dataclass
class _Pack:
    """Consecutive batches of one DataLoader worker, their tensors concatenated."""

    slot: int
    """The DataLoader worker that made it."""
    items: list[tuple[int, int, int, int]]
    """Per batch: rows, ids of its unweighted KJT, ids of its weighted KJT, rows skipped so far."""
    worker: int
    keys: list[str]
    weighted_keys: list[str] | None
    tensors: dict[str, torch.Tensor]

    def pin_memory(self) -> _Pack:
        return _Pack(self.slot, self.items, self.worker, self.keys, self.weighted_keys,
                     {k: t.pin_memory() for k, t in self.tensors.items()})


def _pack(slot: int, items: list[Item]) -> _Pack:
    batches = [b for b, _, _ in items]
    weighted = batches[0].weighted_features
    tensors = {
        "dense": torch.cat([b.dense_features for b in batches]),
        "labels": torch.cat([b.labels for b in batches]),
        "values": torch.cat([b.sparse_features.values() for b in batches]),
        "lengths": torch.cat([b.sparse_features.lengths() for b in batches]),
    }
    if weighted is not None:
        for name, get in (("w_values", KeyedJaggedTensor.values), ("w_lengths", KeyedJaggedTensor.lengths),
                          ("w_weights", KeyedJaggedTensor.weights)):
            tensors[name] = torch.cat([get(b.weighted_features) for b in batches])  # type: ignore[arg-type]
    meta = [(b.size, b.sparse_features.values().numel(),
             b.weighted_features.values().numel() if b.weighted_features is not None else 0, skipped)
            for b, (_, _, skipped) in zip(batches, items)]
    return _Pack(slot, meta, items[0][1], list(batches[0].sparse_features.keys()),
                 list(weighted.keys()) if weighted is not None else None, tensors)


def _unpack(pack: _Pack) -> Iterator[Item]:
    t = pack.tensors
    row = ids = wids = 0
    nkeys, nweighted = len(pack.keys), len(pack.weighted_keys or [])
    for rows, n, wn, skipped in pack.items:
        weighted = None
        if pack.weighted_keys is not None:
            wl = t["w_lengths"][row * nweighted : (row + rows) * nweighted]
            weighted = KeyedJaggedTensor(keys=pack.weighted_keys, values=t["w_values"][wids : wids + wn], lengths=wl,
                                         weights=t["w_weights"][wids : wids + wn], stride=rows)
        batch = Batch(
            dense_features=t["dense"][row : row + rows],
            sparse_features=KeyedJaggedTensor(keys=pack.keys, values=t["values"][ids : ids + n],
                                              lengths=t["lengths"][row * nkeys : (row + rows) * nkeys], stride=rows),
            labels=t["labels"][row : row + rows],
            weighted_features=weighted,
        )
        yield batch, pack.worker, skipped
        row, ids, wids = row + rows, ids + n, wids + wn


class _Shares(IterableDataset):
    """The worker streams as a DataLoader dataset; DataLoader worker ``i`` runs share ``(rotation + i) % W``
    and hands its batches over in packs of about PACK_ROWS rows."""

    def __init__(self, streams: list[WorkerStream], rotation: int) -> None:
        super().__init__()
        self.streams, self.rotation = streams, rotation

    def __iter__(self) -> Iterator[_Pack]:
        info = get_worker_info()
        slot = 0 if info is None else info.id
        stream = self.streams[(self.rotation + slot) % len(self.streams)]
        per_pack = max(1, PACK_ROWS // stream.share.batch_size)
        items: list[Item] = []
        for item in stream:
            items.append(item)
            if len(items) == per_pack:
                yield _pack(slot, items)
                items = []
        if items:
            yield _pack(slot, items)


class _Unpacked:
    """The packs' batches in the order the DataLoader would hand single batches over: one from each
    worker in turn, skipping those that are done (each worker's count of batches is known)."""

    def __init__(self, packs: Iterator[_Pack], counts: list[int]) -> None:
        self._packs = packs
        self._remaining = list(counts)
        self._pending: list[deque[Item]] = [deque() for _ in counts]
        self._next = 0

    def __iter__(self) -> _Unpacked:
        return self

    def __next__(self) -> Item:
        n = len(self._remaining)
        slot = next((j % n for j in range(self._next, self._next + n) if self._remaining[j % n] > 0), None)
        if slot is None:
            raise StopIteration
        while not self._pending[slot]:
            pack = next(self._packs)  # StopIteration here: a worker gave fewer batches than its share
            self._pending[pack.slot].extend(_unpack(pack))
        self._remaining[slot] -= 1
        self._next = slot + 1
        return self._pending[slot].popleft()

    def close(self) -> None:
        """Stops the worker processes."""
        shutdown = getattr(self._packs, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


WorkerKind = Literal["process", "thread"]


def run_workers(
    streams: list[WorkerStream], *, rotation: int, num_workers: int, prefetch: int, pin_memory: bool,
    worker_kind: WorkerKind = "process",
) -> Iterator[Item]:
    """The workers' items in round-robin order, starting at share ``rotation``.

    Args:
        streams: one per share; a single one when ``num_workers`` is 0.
        rotation: the share that gives the first item.
        num_workers: workers; 0 runs the one stream in this process.
        prefetch: in process, batches a thread prepares ahead (0: none); with workers, batches
            each worker prepares ahead (at least 1).
        pin_memory: pin batches in page-locked memory; only done when CUDA is available.
        worker_kind: ``process``: DataLoader worker processes, whose batches come back through
            shared memory; ``thread``: threads of this process (no hand-off copy; they run in
            parallel only where reading and decoding release the GIL). Both give the same
            batches in the same order.
    """
    pin = pin_memory and torch.cuda.is_available()
    if num_workers and worker_kind == "thread":
        order = [streams[(rotation + i) % len(streams)] for i in range(len(streams))]
        threads = [_Prefetcher(_pinned(iter(st)) if pin else iter(st), depth=max(prefetch, 1)) for st in order]
        return _RoundRobin(threads)
    if num_workers:
        loader = DataLoader(
            _Shares(streams, rotation),
            batch_size=None,
            num_workers=num_workers,
            prefetch_factor=max(prefetch, 1),
            pin_memory=pin,
        )
        counts = [streams[(rotation + i) % len(streams)].count for i in range(len(streams))]
        return _Unpacked(iter(loader), counts)
    items = _pinned(iter(streams[0])) if pin else iter(streams[0])
    return _Prefetcher(items, depth=prefetch) if prefetch else items


def _pinned(items: Iterator[Item]) -> Generator[Item, None, None]:
    for batch, worker, skipped in items:
        yield batch.pin_memory(), worker, skipped


class _RoundRobin:
    """Items of several prefetching threads, one from each in turn, skipping those that ended: the
    order a DataLoader gives its workers' items in."""

    def __init__(self, sources: list[_Prefetcher]) -> None:
        self._sources = sources
        self._next = 0

    def __iter__(self) -> _RoundRobin:
        return self

    def __next__(self) -> Item:
        while self._sources:
            i = self._next % len(self._sources)
            try:
                item = next(self._sources[i])
            except StopIteration:
                del self._sources[i]
                self._next = i
                continue
            except BaseException:
                self.close()
                raise
            self._next = i + 1
            return item
        raise StopIteration

    def close(self) -> None:
        """Stops every thread."""
        for source in self._sources:
            source.close()
        self._sources = []


# ---------------------------------------------------------------------------------------------
# Prefetching in a background thread.


_END = object()


@dataclass
class _Failure:
    error: BaseException


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Puts ``item`` unless ``stop`` is set first; returns whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(items: Iterator[Item], q: queue.Queue, stop: threading.Event) -> None:
    # Holds no reference to the _Prefetcher, so dropping the consumer's iterator collects it and
    # its __del__ sets ``stop``.
    try:
        for item in items:
            if not _put(q, item, stop):
                return
        last: object = _END
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
        last = _Failure(e)
    finally:
        if isinstance(items, Generator):
            items.close()
    _put(q, last, stop)


class _Prefetcher:
    """Iterator over items made ahead by a daemon thread into a queue of ``depth`` items."""

    def __init__(self, items: Iterator[Item], *, depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_produce, args=(items, self._queue, self._stop), name="shardrec-prefetch", daemon=True)
        self._thread.start()
        self._done = False

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> Item:
        if self._done:
            raise StopIteration
        item = self._get()
        if item is _END or isinstance(item, _Failure):
            self.close()
            if isinstance(item, _Failure):
                raise item.error
            raise StopIteration
        return item  # type: ignore[return-value]

    def _get(self) -> object:
        while True:
            try:
                return self._queue.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("shardrec prefetch thread ended without a result") from None

    def close(self) -> None:
        """Stops the background thread and waits briefly for it to end."""
        self._done = True
        self._stop.set()
        self._thread.join(timeout=5.0)

    def __del__(self) -> None:
        self._stop.set()
