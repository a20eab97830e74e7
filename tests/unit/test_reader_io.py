"""ParquetReader sources (fsspec URLs, globs, CSV), rank x worker split, shuffle, exact resume, bad input."""

from __future__ import annotations

import gzip
import io
import math
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from shardrec.data.batch import Batch
from shardrec.data.loader import round_robin
from shardrec.data.reader import ParquetReader, validate_data, validate_parquet
from shardrec.data.schema import DenseFeature, FeatureSchema, SparseFeature, TableConfig
from shardrec.errors import DataError

_SCHEMA = FeatureSchema(
    label="label",
    dense=[DenseFeature(name="rid"), DenseFeature(name="x", fill_missing=0.5)],
    sparse=[
        SparseFeature(name="c", table="t_c"),
        SparseFeature(name="s", table="t_s", hash=True),
        SparseFeature(name="h", table="t_h", hash=True),
    ],
    tables=[
        TableConfig(name="t_c", num_embeddings=20, embedding_dim=2),
        TableConfig(name="t_s", num_embeddings=31, embedding_dim=2),
        TableConfig(name="t_h", num_embeddings=17, embedding_dim=2),
    ],
)
_FILES = [(23, 5), (20, 4)]  # (rows, row group size) per file: 43 rows, one left over on 2 ranks
_SHARE = 21  # rows per rank on 2 ranks


def _table(first_rid: int, rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    maybe = rng.random(rows) < 0.2
    return pa.table({
        "label": pa.array(rng.integers(0, 2, rows), pa.int64()),
        "rid": pa.array(np.arange(first_rid, first_rid + rows), pa.int64()),
        "x": pa.array([None if m else float(v) for m, v in zip(maybe, rng.normal(size=rows))], pa.float64()),
        "c": pa.array([None if m else int(v) for m, v in zip(maybe[::-1], rng.integers(0, 20, rows))], pa.int64()),
        "s": pa.array([None if v % 7 == 0 else f"v{v}" for v in rng.integers(0, 100, rows)], pa.string()),
        "h": pa.array(rng.integers(-(2**40), 2**40, rows), pa.int64()),
    })


def _tables() -> Iterator[tuple[int, pa.Table, int]]:
    first = 0
    for i, (rows, group) in enumerate(_FILES):
        yield i, _table(first, rows, seed=i), group
        first += rows


@pytest.fixture
def parquet_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "parquet"
    folder.mkdir()
    for i, table, group in _tables():
        pq.write_table(table, folder / f"part-{i}.parquet", row_group_size=group)
    return folder


@pytest.fixture
def csv_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "csv"
    folder.mkdir()
    for i, table, _ in _tables():
        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        if i == 0:
            (folder / f"part-{i}.csv").write_bytes(buf.getvalue())
        else:
            (folder / f"part-{i}.csv.gz").write_bytes(gzip.compress(buf.getvalue()))
    return folder


@pytest.fixture
def memory_url() -> Iterator[str]:
    url = f"memory://shardrec-test-{uuid.uuid4().hex}"
    for i, table, group in _tables():
        with fsspec.open(f"{url}/part-{i}.parquet", "wb") as f:
            pq.write_table(table, f, row_group_size=group)
    yield url
    fsspec.filesystem("memory").rm(url, recursive=True)


def _read(path: str | Path, **kwargs: object) -> list[Batch]:
    return list(ParquetReader(path, schema=kwargs.pop("schema", _SCHEMA), batch_size=kwargs.pop("batch_size", 4), **kwargs))


def _rids(batches: list[Batch]) -> list[int]:
    return [int(r) for b in batches for r in b.dense_features[:, 0]]


def _rows(batches: list[Batch]) -> dict[int, tuple]:
    """Every row by its rid: dense values, label and ids per sparse key."""
    out = {}
    for b in batches:
        ids = {k: [t.tolist() for t in jt.to_dense()] for k, jt in b.sparse_features.to_dict().items()}
        for i in range(b.size):
            out[int(b.dense_features[i, 0])] = (b.dense_features[i].tolist(), float(b.labels[i]), {k: v[i] for k, v in ids.items()})
    return out


def _assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.dense_features, y.dense_features) and torch.equal(x.labels, y.labels)
        assert x.sparse_features.keys() == y.sparse_features.keys()
        assert torch.equal(x.sparse_features.values(), y.sparse_features.values())
        assert torch.equal(x.sparse_features.lengths(), y.sparse_features.lengths())


# ---------------------------------------------------------------------------------------------
# Sources.


@pytest.mark.parametrize("rank", [0, 1])
def test_memory_url_glob_file_url_and_csv_give_the_local_parquet_batches(
    parquet_dir: Path, csv_dir: Path, memory_url: str, rank: int
) -> None:
    local = _read(parquet_dir, rank=rank, world_size=2)
    assert _rids(local) == list(range(rank * _SHARE, (rank + 1) * _SHARE))
    for path in (memory_url, f"{memory_url}/part-*.parquet", str(parquet_dir / "part-*.parquet"), f"file://{parquet_dir}", csv_dir):
        _assert_same(_read(path, rank=rank, world_size=2), local)


def test_csv_shuffled_like_parquet(parquet_dir: Path, csv_dir: Path) -> None:
    _assert_same(_read(csv_dir, shuffle_buffer=9, seed=3), _read(parquet_dir, shuffle_buffer=9, seed=3))


def test_validate_data_lists_files_of_either_format(parquet_dir: Path, csv_dir: Path, memory_url: str) -> None:
    assert validate_data(parquet_dir, _SCHEMA) == validate_parquet(parquet_dir, _SCHEMA) == sorted(parquet_dir.iterdir())
    assert validate_data(csv_dir, _SCHEMA) == [csv_dir / "part-0.csv", csv_dir / "part-1.csv.gz"]
    assert validate_data(memory_url, _SCHEMA) == [f"memory:///{memory_url.removeprefix('memory://')}/part-{i}.parquet" for i in range(2)]
    with pytest.raises(DataError, match=r"names CSV files where Parquet is expected"):
        validate_parquet(csv_dir, _SCHEMA)


def test_folder_mixing_formats_and_glob_matching_nothing(parquet_dir: Path, csv_dir: Path) -> None:
    (parquet_dir / "extra.csv").write_bytes((csv_dir / "part-0.csv").read_bytes())
    with pytest.raises(DataError, match=r"holds both \*\.parquet and \*\.csv files; .* with a glob such as '.*/\*\.parquet'"):
        validate_data(parquet_dir, _SCHEMA)
    with pytest.raises(DataError, match=r"'.*/nothing-\*\.parquet' matches no files"):
        validate_data(str(parquet_dir / "nothing-*.parquet"), _SCHEMA)
    with pytest.raises(DataError, match=r"'nope://x' cannot be opened: .*; install the fsspec package of its protocol"):
        validate_data("nope://x", _SCHEMA)


# ---------------------------------------------------------------------------------------------
# Split over ranks and workers.


def test_round_robin_matches_a_simulation() -> None:
    for counts in ([3, 1, 2], [2, 2, 2], [0, 4, 1], [5]):
        order = [w for r in range(max(counts)) for w in range(len(counts)) if counts[w] > r]
        for k in range(len(order) + 1):
            taken, nxt = round_robin(counts, k)
            assert taken == [order[:k].count(w) for w in range(len(counts))]
            if k < len(order):
                assert nxt == order[k]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_two_ranks_two_workers_read_every_row_once_with_equal_batches(parquet_dir: Path, csv_dir: Path, fmt: str) -> None:
    path = parquet_dir if fmt == "parquet" else csv_dir
    seen, sizes = [], []
    for rank in range(2):
        reader = ParquetReader(path, schema=_SCHEMA, batch_size=4, rank=rank, world_size=2, num_workers=2)
        batches = list(reader)
        assert len(batches) == len(reader) == math.ceil(_SHARE / 4)
        sizes.append([b.size for b in batches])
        seen += _rids(batches)
        # The in-process batches, handed over alternately from the two workers' halves.
        plain = _read(parquet_dir, rank=rank, world_size=2)
        half = len(plain) // 2
        _assert_same(batches, [b for pair in zip(plain[:half], plain[half:]) for b in pair])
    assert sizes[0] == sizes[1]
    assert sorted(seen) == list(range(2 * _SHARE))


def test_pin_memory_is_a_no_op_without_cuda(parquet_dir: Path) -> None:
    batches = _read(parquet_dir, pin_memory=True)
    _assert_same(batches, _read(parquet_dir))
    assert all(b.dense_features.is_pinned() == torch.cuda.is_available() for b in batches)


# ---------------------------------------------------------------------------------------------
# Shuffle.


def test_shuffle_is_a_deterministic_permutation_within_windows(parquet_dir: Path) -> None:
    def rids(**kwargs: object) -> list[int]:
        return _rids(_read(parquet_dir, rank=1, world_size=2, shuffle_buffer=8, **kwargs))

    plain = _read(parquet_dir, rank=1, world_size=2)
    shuffled = _read(parquet_dir, rank=1, world_size=2, shuffle_buffer=8, seed=1)
    order = _rids(shuffled)
    assert order != _rids(plain) and sorted(order) == _rids(plain)
    assert [sorted(order[i : i + 8]) for i in range(0, _SHARE, 8)] == [_rids(plain)[i : i + 8] for i in range(0, _SHARE, 8)]
    assert [b.size for b in shuffled] == [b.size for b in plain]
    assert _rows(shuffled) == _rows(plain)
    assert rids(seed=1) == order
    assert rids(seed=1, epoch=1) != order and rids(seed=2) != order


# ---------------------------------------------------------------------------------------------
# Exact resume.


@pytest.mark.parametrize(("shuffle", "workers", "positions"), [(0, 0, None), (7, 0, None), (0, 2, [3, 5]), (7, 2, [3])])
def test_resume_mid_epoch_yields_the_uninterrupted_tail(parquet_dir: Path, shuffle: int, workers: int, positions: list[int] | None) -> None:
    kwargs = dict(schema=_SCHEMA, batch_size=3, rank=1, world_size=2, shuffle_buffer=shuffle, num_workers=workers, epoch=2, seed=5)
    full = list(ParquetReader(parquet_dir, **kwargs))
    for k in positions or range(len(full) + 1):
        reader = ParquetReader(parquet_dir, **kwargs)
        it = iter(reader)
        _assert_same([next(it) for _ in range(k)], full[:k])
        state = reader.state_dict()
        assert (state["epoch"], state["batches"]) == (2, k)
        resumed = ParquetReader(parquet_dir, **kwargs)
        resumed.load_state_dict(state)
        assert len(resumed) == len(full) - k
        _assert_same(list(resumed), full[k:])
        _assert_same(list(ParquetReader(parquet_dir, start_batch=k, **kwargs)), full[k:])


def test_state_of_another_layout_is_refused(parquet_dir: Path) -> None:
    reader = ParquetReader(parquet_dir, schema=_SCHEMA, batch_size=4)
    with pytest.raises(DataError, match=r"\(batch_size 3 then, 4 now; shuffle_buffer 8 then, 0 now\); resume with the data, batch size"):
        reader.load_state_dict({**reader.state_dict(), "batch_size": 3, "shuffle_buffer": 8})
    with pytest.raises(DataError, match=r"batch 12 is past the end"):
        reader.load_state_dict({**reader.state_dict(), "batches": 12})


# ---------------------------------------------------------------------------------------------
# Bad input.


def _bad_label(folder: Path, rid: int) -> Path:
    """The Parquet data set with label 2 at row ``rid`` (row group 1 of part-0 for rid 5-9)."""
    folder.mkdir()
    for i, table, group in _tables():
        labels = [2 if r == rid else y for r, y in zip(table["rid"].to_pylist(), table["label"].to_pylist())]
        pq.write_table(table.set_column(0, "label", pa.array(labels, pa.int64())), folder / f"part-{i}.parquet", row_group_size=group)
    return folder


@pytest.mark.parametrize("shuffle", [0, 100])
def test_row_error_names_file_row_group_and_column_even_shuffled(tmp_path: Path, shuffle: int) -> None:
    folder = _bad_label(tmp_path / "d", rid=7)
    message = rf"'{re.escape(str(folder))}/part-0\.parquet' row group 1: label column 'label' holds 2\.0; labels must be 0 or 1"
    with pytest.raises(DataError, match=message):
        _read(folder, shuffle_buffer=shuffle)


@pytest.mark.parametrize(("shuffle", "workers"), [(0, 0), (8, 0), (0, 2)])
def test_skip_mode_drops_bad_row_groups_and_keeps_equal_batches(tmp_path: Path, shuffle: int, workers: int) -> None:
    folder = _bad_label(tmp_path / "d", rid=7)
    readers = [
        ParquetReader(folder, schema=_SCHEMA, batch_size=4, rank=r, world_size=2, shuffle_buffer=shuffle, num_workers=workers, on_bad_rows="skip")
        for r in range(2)
    ]
    batches = [list(r) for r in readers]
    assert [b.size for b in batches[0]] == [b.size for b in batches[1]] == [4] * 5 + [1]
    # Dropped: the part of row group 1 (rows 5-9) decoded together with row 7; shuffled, its part in window [0, 8).
    dropped = set(range(5, 10) if not shuffle else range(5, 8))
    assert [r.skipped_rows for r in readers] == [len(dropped), 0]
    rids = Counter(_rids(batches[0]))
    assert set(rids) == set(range(_SHARE)) - dropped
    assert sum(rids.values()) == _SHARE and sum(n - 1 for n in rids.values()) == len(dropped)  # as many re-read to fill in
    assert sorted(_rids(batches[1])) == list(range(_SHARE, 2 * _SHARE))


def test_skip_mode_resume_replays_to_the_same_tail(tmp_path: Path) -> None:
    folder = _bad_label(tmp_path / "d", rid=7)
    kwargs = dict(schema=_SCHEMA, batch_size=4, on_bad_rows="skip", shuffle_buffer=6)
    full = list(ParquetReader(folder, **kwargs))
    for k in (1, 4):
        reader = ParquetReader(folder, start_batch=k, **kwargs)
        _assert_same(list(reader), full[k:])
        assert reader.skipped_rows == 4  # rows 6-9: row group 1 (rows 5-9) within shuffle window [6, 12)


def _damage_row_group(path: Path, group: int, column: int) -> None:
    offset = pq.ParquetFile(path).metadata.row_group(group).column(column).data_page_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 12)


@pytest.mark.parametrize("shuffle", [0, 8])
def test_damaged_row_group_names_file_row_group_and_column_or_is_skipped(tmp_path: Path, shuffle: int) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(_table(0, 20, seed=0), path, row_group_size=5, use_dictionary=False, compression="none")
    _damage_row_group(path, group=2, column=2)  # column 'x'
    with pytest.raises(DataError, match=r"d\.parquet' row group 2: column 'x' cannot be read \(.*\); the file is damaged"):
        _read(path, shuffle_buffer=shuffle)
    reader = ParquetReader(path, schema=_SCHEMA, batch_size=4, shuffle_buffer=shuffle, on_bad_rows="skip")
    rids = _rids(list(reader))
    assert reader.skipped_rows == 5 and len(rids) == 20 and not set(rids) & set(range(10, 15))


def test_truncated_parquet_names_the_file(parquet_dir: Path) -> None:
    path = parquet_dir / "part-1.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"part-1\.parquet' is not a readable Parquet file .*: it is truncated, damaged or not Parquet"):
        ParquetReader(parquet_dir, schema=_SCHEMA, batch_size=4)


def _empty_parquet(path: Path) -> None:
    pq.write_table(_table(0, 3, seed=0).slice(0, 0), path)


def _header_only_csv(path: Path) -> None:
    path.write_text("label,rid,x,c,s,h\n")


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("part-2.parquet", lambda p: p.write_bytes(b""), r"part-2\.parquet' is empty \(0 bytes\); remove it"),
        ("part-2.parquet", _empty_parquet, r"part-2\.parquet' holds no rows; remove the empty file"),
        ("part-2.csv", lambda p: p.write_bytes(b""), r"part-2\.csv' is empty \(no header row\)"),
        ("part-2.csv", _header_only_csv, r"part-2\.csv' has a header but no rows; remove the empty file"),
    ],
)
def test_empty_file_names_the_file(parquet_dir: Path, csv_dir: Path, name: str, write: object, message: str) -> None:
    folder = csv_dir if name.endswith(".csv") else parquet_dir
    write(folder / name)  # type: ignore[operator]
    with pytest.raises(DataError, match=message):
        validate_data(folder, _SCHEMA)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_schema_drift_names_file_and_column(tmp_path: Path, fmt: str) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    for i, table, group in _tables():
        table = table.drop_columns(["s"]) if i == 1 else table
        if fmt == "parquet":
            pq.write_table(table, folder / f"part-{i}.parquet", row_group_size=group)
        else:
            pacsv.write_csv(table, folder / f"part-{i}.csv")
    message = rf"part-1\.{fmt}' has no column 's' \(configured by features\.sparse\[1\]\); its columns are: label, rid, x, c, h"
    with pytest.raises(DataError, match=message):
        ParquetReader(folder, schema=_SCHEMA, batch_size=4)


def _one_feature(**feature: object) -> FeatureSchema:
    return FeatureSchema(
        sparse=[SparseFeature(name="c", table="t", **feature)],  # type: ignore[arg-type]
        tables=[TableConfig(name="t", num_embeddings=20, embedding_dim=2)],
    )


def test_sequence_column_that_is_not_a_list(parquet_dir: Path, csv_dir: Path) -> None:
    message = (
        r"part-0\.parquet' column 'c' \(features\.sparse\[0\]\) has type int64 in every row group, not a list; a sequence "
        r"feature needs a list column \(one history per row, oldest first\): write it as list<int64> or set features\.sparse\[0\]\.sequence: false"
    )
    with pytest.raises(DataError, match=message):
        validate_data(parquet_dir, _one_feature(sequence=True))
    with pytest.raises(DataError, match=r"part-0\.csv' column 'c' \(features\.sparse\[0\]\) is a CSV column, .* write the data as Parquet"):
        validate_data(csv_dir, _one_feature(sequence=True))


def test_weights_that_are_not_a_list_of_numbers(tmp_path: Path) -> None:
    path = tmp_path / "w.parquet"
    pq.write_table(pa.table({"label": [0, 1], "c": pa.array([[1, 2], [3]]), "w": pa.array([["a", "b"], ["c"]])}), path)
    message = (
        r"w\.parquet' column 'w' \(features\.sparse\[0\]\.weights\) has type list<.*string> in every row group; weights must be "
        r"numbers, one per id of column 'c'"
    )
    with pytest.raises(DataError, match=message):
        validate_data(path, _one_feature(weights="w"))
    pq.write_table(pa.table({"label": [0, 1], "c": pa.array([[1, 2], [3]]), "w": pa.array([1.0, 2.0])}), path)
    with pytest.raises(DataError, match=r"column 'w' \(features\.sparse\[0\]\.weights\) has type double"):
        validate_data(path, _one_feature(weights="w"))


def test_csv_value_that_is_not_a_number_names_file_and_column(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("label,x,c\n0,1.5,3\n1,abc,4\n")
    schema = FeatureSchema(dense=[DenseFeature(name="x")], sparse=[SparseFeature(name="c", table="t")], tables=[TableConfig(name="t", num_embeddings=9, embedding_dim=2)])
    with pytest.raises(DataError, match=r"a\.csv' column 'x' holds a value that is not a number \(.*'abc'"):
        validate_data(path, schema)
    path.write_text("label,x,c\n0,1.5,3\n1,2.5,u7\n")
    with pytest.raises(DataError, match=r"a\.csv' column 'c' holds a value that is not an integer id \(set hash: true"):
        validate_data(path, schema)
