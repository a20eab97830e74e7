"""ParquetReader and validate_parquet on small Parquet files with tiny row groups."""

from __future__ import annotations

import gc
import math
import re
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shardrec.data.batch import Batch
from shardrec.data.hashing import hash_ids
from shardrec.data.reader import ParquetReader, validate_data, validate_parquet
from shardrec.data.schema import DenseFeature, FeatureSchema, SparseFeature, TableConfig
from shardrec.errors import DataError

_SCHEMA = FeatureSchema(
    label="label",
    dense=[
        DenseFeature(name="rid"),
        DenseFeature(name="d_float", fill_missing=0.5, transform="log1p"),
        DenseFeature(name="d_int", fill_missing=-1.0),
        DenseFeature(name="d_bool"),
    ],
    sparse=[
        SparseFeature(name="s_int", table="t_int"),
        SparseFeature(name="s_str", table="t_str", hash=True),
        SparseFeature(name="s_list", table="t_list", hash=True),
        SparseFeature(name="s_lstr", table="t_str", hash=True),
    ],
    tables=[
        TableConfig(name="t_int", num_embeddings=50, embedding_dim=4),
        TableConfig(name="t_str", num_embeddings=37, embedding_dim=4),
        TableConfig(name="t_list", num_embeddings=101, embedding_dim=4),
    ],
)
_FILE_ROWS = [(23, 7), (17, 5)]  # (rows, row_group_size) per file
_TOTAL = sum(r for r, _ in _FILE_ROWS)


def _maybe_null(rng: np.random.Generator, value: object, p: float = 0.2) -> object:
    return None if rng.random() < p else value


def _random_list(rng: np.random.Generator, make: object) -> list | None:
    if rng.random() < 0.15:
        return None
    return [_maybe_null(rng, make(), 0.15) for _ in range(rng.integers(0, 4))]


def _table(first_rid: int, rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    d_float = [_maybe_null(rng, float(x)) for x in rng.normal(size=rows) * 10]
    d_float[0] = float("nan")
    return pa.table({
        "label": pa.array(rng.integers(0, 2, rows), type=pa.int64()),
        "rid": pa.array(np.arange(first_rid, first_rid + rows), type=pa.int64()),
        "d_float": pa.array(d_float, type=pa.float64()),
        "d_int": pa.array([_maybe_null(rng, int(x)) for x in rng.integers(-5, 100, rows)], type=pa.int32()),
        "d_bool": pa.array(rng.random(rows) < 0.5),
        "s_int": pa.array([_maybe_null(rng, int(x)) for x in rng.integers(0, 50, rows)], type=pa.int64()),
        "s_str": pa.array([_maybe_null(rng, f"v{x}") for x in rng.integers(0, 1000, rows)], type=pa.string()),
        "s_list": pa.array([_random_list(rng, lambda: int(rng.integers(-2**62, 2**62))) for _ in range(rows)], type=pa.list_(pa.int64())),
        "s_lstr": pa.array([_random_list(rng, lambda: f"w{rng.integers(0, 99)}") for _ in range(rows)], type=pa.list_(pa.string())),
        "unused": pa.array(["x"] * rows),
    })


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder, first = tmp_path / "train", 0
    folder.mkdir()
    for i, (rows, group) in enumerate(_FILE_ROWS):
        pq.write_table(_table(first, rows, seed=i), folder / f"part-{i}.parquet", row_group_size=group)
        first += rows
    return folder


def _expected(folder: Path, schema: FeatureSchema) -> tuple[np.ndarray, np.ndarray, dict[str, list[list[int]]]]:
    """Dense, labels and ids per sparse key and row, computed row by row from what pyarrow read."""
    rows = pq.read_table(folder).to_pylist()
    dense = np.zeros((len(rows), len(schema.dense)), dtype=np.float32)
    for r, row in enumerate(rows):
        for i, f in enumerate(schema.dense):
            x = row[f.name]
            x = f.fill_missing if x is None or math.isnan(x) else float(x)
            dense[r, i] = np.log1p(np.float32(max(x, 0))) if f.transform == "log1p" else x
    sparse = {}
    for f in schema.sparse:
        rows_of_table = schema.table(f.table).num_embeddings
        per_row = []
        for row in rows:
            ids = [x for x in (row[f.name] if isinstance(row[f.name], list) else [row[f.name]]) if x is not None]
            per_row.append(hash_ids(pa.array(ids), rows_of_table).tolist() if f.hash and ids else ids)
        sparse[f.name] = per_row
    return dense, np.array([row["label"] for row in rows], dtype=np.float32), sparse


def _collect(batches: list[Batch], keys: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, list[list[int]]]]:
    sparse: dict[str, list[list[int]]] = {k: [] for k in keys}
    for b in batches:
        assert b.dense_features.dtype == torch.float32 and b.labels.dtype == torch.float32
        assert b.sparse_features.values().dtype == torch.int64 and b.sparse_features.lengths().dtype == torch.int32
        assert b.sparse_features.keys() == keys and b.sparse_features.stride() == b.size
        for k, jt in b.sparse_features.to_dict().items():
            sparse[k] += [t.tolist() for t in jt.to_dense()]
    dense = torch.cat([b.dense_features for b in batches]).numpy()
    return dense, torch.cat([b.labels for b in batches]).numpy(), sparse


def _assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.dense_features, y.dense_features) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.sparse_features.values(), y.sparse_features.values())
        assert torch.equal(x.sparse_features.lengths(), y.sparse_features.lengths())


@pytest.mark.parametrize("batch_size", [6, 64])
def test_values_match_pyarrow(data_dir: Path, batch_size: int) -> None:
    reader = ParquetReader(data_dir, schema=_SCHEMA, batch_size=batch_size)
    batches = list(reader)
    assert len(batches) == len(reader) == math.ceil(_TOTAL / batch_size)
    assert [b.size for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    dense, labels, sparse = _collect(batches, _SCHEMA.sparse_names)
    want_dense, want_labels, want_sparse = _expected(data_dir, _SCHEMA)
    np.testing.assert_allclose(dense, want_dense, rtol=1e-6)
    np.testing.assert_array_equal(labels, want_labels)
    assert sparse == want_sparse
    assert any(len(ids) == 0 for ids in sparse["s_list"]) and any(len(ids) > 1 for ids in sparse["s_list"])


@pytest.mark.parametrize("label", ["label", ["label", "label2"]])
def test_without_labels_reads_unlabeled_data(data_dir: Path, tmp_path: Path, label: str | list[str]) -> None:
    schema = FeatureSchema(label=label, dense=_SCHEMA.dense, sparse=_SCHEMA.sparse, tables=_SCHEMA.tables)
    pq.write_table(pq.read_table(data_dir).drop(["label"]), tmp_path / "unlabeled.parquet", row_group_size=5)
    with pytest.raises(DataError, match=r"has no column 'label' \(configured by features\.label"):
        validate_parquet(tmp_path, schema)
    assert validate_data(tmp_path, schema, labels=False) == [tmp_path / "unlabeled.parquet"]
    batches = list(ParquetReader(tmp_path, schema=schema, batch_size=9, labels=False))
    assert [b.labels.shape for b in batches] == [(9, 0), (9, 0), (9, 0), (9, 0), (4, 0)] and [b.size for b in batches] == [9] * 4 + [4]
    dense, _, sparse = _collect(batches, schema.sparse_names)
    want_dense, _, want_sparse = _expected(data_dir, _SCHEMA)
    np.testing.assert_allclose(dense, want_dense, rtol=1e-6)
    assert sparse == want_sparse
    # Labeled data read without labels: the same features, the label column not read.
    labeled = list(ParquetReader(data_dir, schema=_SCHEMA, batch_size=9, labels=False))
    assert all(b.labels.shape == (b.size, 0) for b in labeled)
    np.testing.assert_allclose(torch.cat([b.dense_features for b in labeled]).numpy(), want_dense, rtol=1e-6)


def test_each_iteration_starts_over(data_dir: Path) -> None:
    reader = ParquetReader(data_dir, schema=_SCHEMA, batch_size=9)
    _assert_same_batches(list(reader), list(reader))


def test_dictionary_encoded_strings_hash_like_plain(tmp_path: Path) -> None:
    schema = FeatureSchema(
        dense=[], sparse=[SparseFeature(name="s", table="t", hash=True)], tables=[TableConfig(name="t", num_embeddings=13, embedding_dim=2)]
    )
    words = ["a", "bb", None, "a", "ccc"]
    pq.write_table(pa.table({"label": [0, 1, 0, 1, 0], "s": pa.array(words).dictionary_encode()}), tmp_path / "d.parquet")
    (batch,) = ParquetReader(tmp_path / "d.parquet", schema=schema, batch_size=8)
    assert batch.sparse_features.lengths().tolist() == [1, 1, 0, 1, 1]
    assert batch.sparse_features.values().tolist() == hash_ids(pa.array(["a", "bb", "a", "ccc"]), 13).tolist()


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_split_reads_each_row_once(data_dir: Path, world_size: int) -> None:
    n = _TOTAL // world_size
    seen = []
    for rank in range(world_size):
        reader = ParquetReader(data_dir, schema=_SCHEMA, batch_size=6, rank=rank, world_size=world_size)
        batches = list(reader)
        assert len(batches) == len(reader) == math.ceil(n / 6)
        rids = torch.cat([b.dense_features[:, 0] for b in batches]).long().tolist()
        assert rids == list(range(rank * n, (rank + 1) * n))
        seen += rids
    assert sorted(seen) == list(range(n * world_size))


def test_start_batch_yields_tail_without_reading_skipped_row_groups(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = list(ParquetReader(data_dir, schema=_SCHEMA, batch_size=6))
    read: list[tuple[int, int]] = []
    original = pq.ParquetFile.read_row_group

    def spy(self: pq.ParquetFile, i: int, *args: object, **kwargs: object) -> pa.Table:
        read.append((self.metadata.num_rows, i))  # files differ in row count, which identifies them
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    for k in range(len(full) + 1):
        read.clear()
        reader = ParquetReader(data_dir, schema=_SCHEMA, batch_size=6, start_batch=k)
        tail = list(reader)
        assert len(reader) == len(tail) == len(full) - k
        _assert_same_batches(tail, full[k:])
        assert read == _row_groups_from(k * 6)


def _row_groups_from(first_row: int) -> list[tuple[int, int]]:
    """(file rows, row group index) of the row groups holding rows >= first_row."""
    out, start = [], 0
    for rows, group in _FILE_ROWS:
        for i in range(math.ceil(rows / group)):
            end = min(start + group, start + rows - i * group)
            if end > first_row:
                out.append((rows, i))
            start = end
    return out


def test_start_batch_past_the_end_is_an_error(data_dir: Path) -> None:
    with pytest.raises(DataError, match=r"start_batch 8 is past the end.*7 batches of 6 rows"):
        ParquetReader(data_dir, schema=_SCHEMA, batch_size=6, start_batch=8)


def test_prefetch_gives_identical_batches(data_dir: Path) -> None:
    plain = list(ParquetReader(data_dir, schema=_SCHEMA, batch_size=5))
    _assert_same_batches(list(ParquetReader(data_dir, schema=_SCHEMA, batch_size=5, prefetch=2)), plain)
    _assert_same_batches(list(ParquetReader(data_dir, schema=_SCHEMA, batch_size=5, prefetch=2, start_batch=3)), plain[3:])


def _write_null_dense_in_row_group_2(tmp_path: Path) -> tuple[Path, FeatureSchema]:
    x = [1.0] * 12
    x[10] = None
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"label": [0] * 12, "x": pa.array(x, type=pa.float32())}), path, row_group_size=4)
    return path, FeatureSchema(dense=[DenseFeature(name="x")])


@pytest.mark.parametrize("prefetch", [0, 1])
def test_errors_mid_stream_reach_the_consumer(tmp_path: Path, prefetch: int) -> None:
    path, schema = _write_null_dense_in_row_group_2(tmp_path)
    it = iter(ParquetReader(path, schema=schema, batch_size=4, prefetch=prefetch))
    assert next(it).size == 4 and next(it).size == 4
    message = rf"'{re.escape(str(path))}' row group 2: column 'x' has 1 null or NaN values; set features\.dense\[0\]\.fill_missing"
    with pytest.raises(DataError, match=message):
        next(it)


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "shardrec-prefetch"]


def test_prefetch_thread_stops_when_iterator_is_abandoned(data_dir: Path) -> None:
    before = set(_prefetch_threads())
    it = iter(ParquetReader(data_dir, schema=_SCHEMA, batch_size=2, prefetch=1))
    next(it)
    (thread,) = set(_prefetch_threads()) - before
    del it
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_prefetch_close_stops_thread(data_dir: Path) -> None:
    before = set(_prefetch_threads())
    it = iter(ParquetReader(data_dir, schema=_SCHEMA, batch_size=2, prefetch=1))
    next(it)
    (thread,) = set(_prefetch_threads()) - before
    it.close()
    assert not thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)


# ---------------------------------------------------------------------------------------------
# DataError cases.


def _write(path: Path, **columns: pa.Array) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=4)
    return path


def _one_sparse(*, hash_ids_: bool = False, rows: int = 10) -> FeatureSchema:
    return FeatureSchema(
        dense=[DenseFeature(name="x", fill_missing=0.0)],
        sparse=[SparseFeature(name="c", table="t", hash=hash_ids_)],
        tables=[TableConfig(name="t", num_embeddings=rows, embedding_dim=2)],
    )


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'.*nowhere' does not exist; set data\.train_path"):
        validate_parquet(tmp_path / "nowhere", _SCHEMA)


def test_folder_without_parquet_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"holds no \*\.parquet files"):
        ParquetReader(tmp_path, schema=_SCHEMA, batch_size=4)


def test_file_that_is_not_parquet(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_text("not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet' is not a readable Parquet file"):
        validate_parquet(tmp_path, _SCHEMA)


def test_missing_column_names_file_column_key_and_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.parquet", label=pa.array([0, 1]), x=pa.array([1.0, 2.0]))
    schema = FeatureSchema(dense=[DenseFeature(name="x"), DenseFeature(name="y")])
    with pytest.raises(DataError, match=r"a\.parquet' has no column 'y' \(configured by features\.dense\[1\]\); its columns are: label, x"):
        validate_parquet(path, schema)


def test_dense_column_of_strings(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.parquet", label=pa.array([0, 1]), x=pa.array(["1", "2"]), c=pa.array([1, 2]))
    with pytest.raises(DataError, match=r"a\.parquet' column 'x' \(features\.dense\[0\]\) has type string; a dense column must be numeric"):
        validate_parquet(path, _one_sparse())


def test_label_column_of_strings(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.parquet", label=pa.array(["y", "n"]), x=pa.array([1.0, 2.0]), c=pa.array([1, 2]))
    with pytest.raises(DataError, match=r"column 'label' \(features\.label\) has type string"):
        validate_parquet(path, _one_sparse())


def test_sparse_column_of_floats(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.parquet", label=pa.array([0, 1]), x=pa.array([1.0, 2.0]), c=pa.array([[1.5], [2.0]]))
    with pytest.raises(DataError, match=r"column 'c' \(features\.sparse\[0\]\) has type list<.*double>; a sparse column must hold integers"):
        validate_parquet(path, _one_sparse())


def test_string_sparse_column_needs_hash(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.parquet", label=pa.array([0, 1]), x=pa.array([1.0, 2.0]), c=pa.array(["u", "v"]))
    with pytest.raises(DataError, match=r"column 'c' \(features\.sparse\[0\]\) holds strings.*set features\.sparse\[0\]\.hash: true"):
        validate_parquet(path, _one_sparse())
    assert validate_parquet(path, _one_sparse(hash_ids_=True)) == [path]


def test_files_with_different_types(tmp_path: Path) -> None:
    _write(tmp_path / "d" / "a.parquet", label=pa.array([0, 1]), x=pa.array([1.0, 2.0]), c=pa.array([1, 2], pa.int64()))
    _write(tmp_path / "d" / "b.parquet", label=pa.array([0, 1]), x=pa.array([1.0, 2.0]), c=pa.array([1, 2], pa.int32()))
    with pytest.raises(DataError, match=r"column 'c' \(features\.sparse\[0\]\) is int32 in '.*b\.parquet' but int64 in '.*a\.parquet'"):
        validate_parquet(tmp_path / "d", _one_sparse())


def test_fewer_rows_than_ranks(tmp_path: Path) -> None:
    path = _write(tmp_path / "tiny.parquet", label=pa.array([0, 1, 1]), x=pa.array([1.0, 2.0, 3.0]), c=pa.array([1, 2, 3]))
    with pytest.raises(DataError, match=r"tiny\.parquet' has 3 rows, fewer than the world size 4"):
        ParquetReader(path, schema=_one_sparse(), batch_size=2, world_size=4)


@pytest.mark.parametrize(("bad", "shown"), [(2, "2.0"), (None, "null/NaN")])
def test_label_outside_zero_one(tmp_path: Path, bad: int | None, shown: str) -> None:
    labels = [0, 1, 0, 1, 1, bad]
    path = _write(tmp_path / "l.parquet", label=pa.array(labels, pa.int64()), x=pa.array([1.0] * 6), c=pa.array([1] * 6))
    with pytest.raises(DataError, match=rf"l\.parquet' row group 1: label column 'label' holds {shown}; labels must be 0 or 1"):
        list(ParquetReader(path, schema=_one_sparse(), batch_size=4))


def test_id_out_of_range_without_hash(tmp_path: Path) -> None:
    path = _write(tmp_path / "ids.parquet", label=pa.array([0] * 6), x=pa.array([1.0] * 6), c=pa.array([[1], [2], [3], [4], [9, 10], []]))
    message = (
        r"ids\.parquet' row group 1: feature 'c' \(features\.sparse\[0\]\) has id 10, outside \[0, 10\) of table 't'; "
        r"set features\.sparse\[0\]\.hash: true to hash raw ids, or raise num_embeddings of table 't'"
    )
    with pytest.raises(DataError, match=message):
        list(ParquetReader(path, schema=_one_sparse(), batch_size=4))
