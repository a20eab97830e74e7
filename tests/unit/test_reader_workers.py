"""``num_workers`` 0-3, as processes and as threads: the batch order (contiguous runs per worker,
handed out in turn), the exact resume position and equal batches on every rank; threads give
exactly what processes give."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shardrec.data import loader
from shardrec.data.batch import Batch
from shardrec.data.reader import ParquetReader
from shardrec.data.schema import DenseFeature, FeatureSchema, SparseFeature, TableConfig

SCHEMA = FeatureSchema(
    label="label",
    dense=[DenseFeature(name="rid")],
    sparse=[SparseFeature(name="c", table="t"), SparseFeature(name="hist", table="t", sequence=True, max_len=3),
            SparseFeature(name="tags", table="t", weights="tag_w")],
    tables=[TableConfig(name="t", num_embeddings=50, embedding_dim=2)],
)
ROWS, SHARE, BATCH = 61, 30, 4  # one row left over on 2 ranks; 8 batches per rank, the last of 2 rows
WORKERS = [0, 1, 2, 3]
KINDS = ["process", "thread"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    hist = [rng.integers(0, 50, int(n)).tolist() for n in rng.integers(0, 5, ROWS)]
    tags = [rng.integers(0, 50, int(n)).tolist() for n in rng.integers(0, 3, ROWS)]
    table = pa.table({"label": pa.array(rng.integers(0, 2, ROWS), pa.int8()), "rid": pa.array(np.arange(ROWS), pa.float32()),
                      "c": pa.array(rng.integers(0, 50, ROWS)), "hist": pa.array(hist, pa.list_(pa.int64())),
                      "tags": pa.array(tags, pa.list_(pa.int64())),
                      "tag_w": pa.array([rng.random(len(t)).tolist() for t in tags], pa.list_(pa.float32()))})
    path = tmp_path_factory.mktemp("workers") / "d.parquet"
    pq.write_table(table, path, row_group_size=7)
    return path


def _reader(data: Path, *, workers: int, kind: str, rank: int = 1, **kwargs: object) -> ParquetReader:
    return ParquetReader(data, schema=SCHEMA, batch_size=BATCH, rank=rank, world_size=2, num_workers=workers,
                         worker_kind=kind, prefetch=2, **kwargs)  # type: ignore[arg-type]


def _rids(batches: list[Batch]) -> list[list[int]]:
    return [[int(r) for r in b.dense_features[:, 0]] for b in batches]


def _same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.dense_features, y.dense_features) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.sparse_features.values(), y.sparse_features.values())
        assert torch.equal(x.sparse_features.lengths(), y.sparse_features.lengths())
        assert x.sparse_features.keys() == y.sparse_features.keys() and x.sparse_features.stride() == y.sparse_features.stride()
        wx, wy = x.weighted_features, y.weighted_features
        assert wx is not None and wy is not None and wx.keys() == wy.keys() == ["tags"]
        assert torch.equal(wx.values(), wy.values()) and torch.equal(wx.lengths(), wy.lengths())
        assert torch.equal(wx.weights(), wy.weights())


def _expected_order(workers: int) -> list[list[int]]:
    """Rank 1's batches: its 8 batches cut into max(workers, 1) contiguous runs, taken in turn."""
    batches = [list(range(SHARE + i, min(SHARE + i + BATCH, 2 * SHARE))) for i in range(0, SHARE, BATCH)]
    w = max(workers, 1)
    runs = [batches[len(batches) * k // w : len(batches) * (k + 1) // w] for k in range(w)]
    return [run[i] for i in range(max(len(r) for r in runs)) for run in runs if i < len(run)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("workers", WORKERS)
def test_order_is_each_workers_run_in_turn(data: Path, workers: int, kind: str) -> None:
    batches = list(_reader(data, workers=workers, kind=kind))
    assert _rids(batches) == _expected_order(workers)


@pytest.mark.parametrize("pack_rows", [4, 8, 12, 4096])
def test_packed_hand_off_gives_the_batches_one_by_one(data: Path, monkeypatch: pytest.MonkeyPatch, pack_rows: int) -> None:
    # Packs of 1, 2 and 3 batches and one of the whole share; the worker processes fork with the patched size.
    monkeypatch.setattr(loader, "PACK_ROWS", pack_rows)
    for workers in (1, 2, 3):
        for start in (0, 3):
            _same(list(_reader(data, workers=workers, kind="process", start_batch=start)),
                  list(_reader(data, workers=workers, kind="thread", start_batch=start)))


@pytest.mark.parametrize("workers", WORKERS)
def test_threads_give_what_processes_give(data: Path, workers: int) -> None:
    for shuffle in (0, 9):
        _same(list(_reader(data, workers=workers, kind="thread", shuffle_buffer=shuffle, seed=3)),
              list(_reader(data, workers=workers, kind="process", shuffle_buffer=shuffle, seed=3)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("workers", WORKERS)
def test_every_rank_gets_equal_batches_and_every_row_once(data: Path, workers: int, kind: str) -> None:
    per_rank = [list(_reader(data, workers=workers, kind=kind, rank=r)) for r in range(2)]
    assert [b.size for b in per_rank[0]] == [b.size for b in per_rank[1]] == [BATCH] * 7 + [2]
    assert len(per_rank[0]) == math.ceil(SHARE / BATCH)
    rows = sorted(r for batches in per_rank for rids in _rids(batches) for r in rids)
    assert rows == list(range(2 * SHARE))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("workers", WORKERS)
def test_resume_position_gives_the_uninterrupted_tail(data: Path, workers: int, kind: str) -> None:
    full = list(_reader(data, workers=workers, kind=kind, shuffle_buffer=9, seed=1, epoch=1))
    for k in (1, 3, 5, 8):
        reader = _reader(data, workers=workers, kind=kind, shuffle_buffer=9, seed=1, epoch=1)
        it = iter(reader)
        _same([next(it) for _ in range(k)], full[:k])
        state = reader.state_dict()
        assert state["batches"] == k and state["workers"] == max(workers, 1)
        # A resumed reader of either kind starts exactly where this one stood.
        for other in KINDS:
            resumed = _reader(data, workers=workers, kind=other, shuffle_buffer=9, seed=1, epoch=1)
            resumed.load_state_dict(state)
            _same(list(resumed), full[k:])


def test_stopping_early_ends_the_threads(data: Path) -> None:
    import threading

    def ours() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "shardrec-prefetch" and t.is_alive()}

    before = ours()
    it = iter(_reader(data, workers=3, kind="thread"))
    next(it)
    assert len(ours() - before) == 3
    it.close()  # what the trainer does when it leaves an epoch early
    assert not ours() - before


@pytest.mark.gpu
@pytest.mark.parametrize(("workers", "kind"), [(0, "process"), (2, "process"), (2, "thread")])
def test_cuda_batches_are_pinned_and_copied_without_blocking(data: Path, workers: int, kind: str) -> None:
    plain = list(_reader(data, workers=workers, kind=kind))
    pinned = list(_reader(data, workers=workers, kind=kind, pin_memory=True))
    assert all(b.dense_features.is_pinned() and b.sparse_features.values().is_pinned() for b in pinned)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        on_gpu = [b.to(torch.device("cuda"), non_blocking=True) for b in pinned]
    stream.synchronize()
    _same([b.to(torch.device("cpu")) for b in on_gpu], plain)
