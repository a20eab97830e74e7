"""The decoder's whole-row-group fast paths give bit for bit what decoding one column at a time
gives: dense columns transformed together, single-id columns stacked and bounds-checked together;
columns the fast path cannot take (nulls, out-of-range ids, hashed, lists) go the general way."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from shardrec.data.decode import _to_float32, decode, transform_dense
from shardrec.data.schema import DenseFeature, DenseStats, FeatureSchema, SparseFeature, TableConfig
from shardrec.data.sparse import decode_sparse
from shardrec.errors import DataError

ROWS = 500


def _stats(f: DenseFeature, x: np.ndarray) -> None:
    v = x[~np.isnan(x)]
    f.stats = DenseStats(count=len(v), missing=int(np.isnan(x).sum()), raw_mean=float(v.mean()), mean=float(v.mean()) / 3,
                         std=float(v.std()), min=float(v.min()), max=float(v.max()))


def _data(rng: np.random.Generator) -> tuple[FeatureSchema, pa.Table]:
    dense = [
        DenseFeature(name="a", fill_missing=0.0),
        DenseFeature(name="b", fill_missing="mean", transform="log1p"),
        DenseFeature(name="c", normalize="zscore", clip=[-1.0, 2.5], fill_missing=-0.5),
        DenseFeature(name="d", normalize="minmax"),
        DenseFeature(name="e", normalize="log_zscore", fill_missing="mean"),
        DenseFeature(name="f"),
    ]
    x = {n: rng.normal(2, 3, ROWS) for n in "abcdef"}
    cols = {n: pa.array(v, pa.float64()) for n, v in x.items()}
    cols["b"] = pa.array([None if i % 7 == 0 else float(v) for i, v in enumerate(x["b"])], pa.float64())
    cols["c"] = pa.array([None if i % 11 == 0 else float(v) for i, v in enumerate(x["c"])], pa.float32())
    cols["e"] = pa.array(np.where(np.arange(ROWS) % 5 == 0, np.nan, np.abs(x["e"])), pa.float64())
    cols["f"] = pa.array(rng.integers(-5, 5, ROWS), pa.int32())
    sparse = [
        SparseFeature(name="i", table="t"),
        SparseFeature(name="j", table="u"),
        SparseFeature(name="k", table="t", hash=True),
        SparseFeature(name="m", table="u"),  # nulls: the general path
        SparseFeature(name="hist", table="t", sequence=True, max_len=3),
        SparseFeature(name="n", table="t"),
    ]
    cols |= {
        "i": pa.array(rng.integers(0, 40, ROWS)), "j": pa.array(rng.integers(0, 9, ROWS), pa.int32()),
        "k": pa.array(rng.integers(-(2**40), 2**40, ROWS)),
        "m": pa.array([None if i % 3 == 0 else int(v) for i, v in enumerate(rng.integers(0, 9, ROWS))], pa.int64()),
        "hist": pa.array([rng.integers(0, 40, int(n)).tolist() for n in rng.integers(0, 6, ROWS)], pa.list_(pa.int64())),
        "n": pa.array(rng.integers(0, 40, ROWS), pa.int16()),
    }
    schema = FeatureSchema(dense=dense, sparse=sparse, tables=[TableConfig(name="t", num_embeddings=40, embedding_dim=2),
                                                               TableConfig(name="u", num_embeddings=9, embedding_dim=2)])
    for f in schema.dense:
        _stats(f, _to_float32(pa.chunked_array([cols[f.name]])))
    return schema, pa.table(cols)


def test_dense_fast_path_equals_one_column_at_a_time() -> None:
    schema, table = _data(np.random.default_rng(0))
    chunk = decode(table, schema, "t")
    for i, f in enumerate(schema.dense):
        one = transform_dense(f, _to_float32(table.column(f.name)), where="t", index=i)
        assert np.array_equal(chunk.dense[:, i], one, equal_nan=True), f.name
    assert chunk.dense.dtype == np.float32 and chunk.dense.shape == (ROWS, len(schema.dense))


def test_sparse_fast_path_equals_the_general_decoder() -> None:
    schema, table = _data(np.random.default_rng(1))
    chunk = decode(table, schema, "t")
    for i, f in enumerate(schema.sparse):
        general = decode_sparse(table, f, i, schema, "t")
        assert np.array_equal(chunk.sparse[i].lengths, general.lengths), f.name
        assert np.array_equal(chunk.sparse[i].values, general.values) and chunk.sparse[i].values.dtype == np.int64, f.name
        assert np.array_equal(chunk.offsets[i], np.concatenate(([0], np.cumsum(general.lengths)))), f.name
    # Not every feature is one id per row, so no key-major stack of ids.
    assert chunk.plain_values is None and chunk.plain_lengths.shape == (len(schema.sparse), ROWS)


def test_all_single_ids_are_stacked_key_major() -> None:
    rng = np.random.default_rng(2)
    schema = FeatureSchema(sparse=[SparseFeature(name="i", table="t"), SparseFeature(name="j", table="t")],
                           tables=[TableConfig(name="t", num_embeddings=10, embedding_dim=2)])
    i, j = rng.integers(0, 10, ROWS), rng.integers(0, 10, ROWS)
    chunk = decode(pa.table({"i": i, "j": j}), schema, "t")
    assert np.array_equal(chunk.plain_values, np.stack([i, j])) and (chunk.plain_lengths == 1).all()


@pytest.mark.parametrize("bad", [-1, 10])
def test_an_id_out_of_range_is_named_by_the_general_path(bad: int) -> None:
    schema = FeatureSchema(sparse=[SparseFeature(name="i", table="t"), SparseFeature(name="j", table="t")],
                           tables=[TableConfig(name="t", num_embeddings=10, embedding_dim=2)])
    j = np.arange(ROWS) % 10
    j[123] = bad
    with pytest.raises(DataError, match=rf"feature 'j' \(features.sparse\[1\]\) has id {bad}, outside \[0, 10\) of table 't'"):
        decode(pa.table({"i": np.zeros(ROWS, np.int64), "j": j}), schema, "t")


def test_missing_dense_without_fill_names_the_first_such_column() -> None:
    schema = FeatureSchema(dense=[DenseFeature(name="a", fill_missing=1.0), DenseFeature(name="b"), DenseFeature(name="c")])
    table = pa.table({"a": [None, 1.0], "b": [2.0, None], "c": [None, None]})
    with pytest.raises(DataError, match=r"column 'b' has 1 null or NaN values; set features.dense\[1\].fill_missing"):
        decode(table, schema, "t")


def test_keep_last_cuts_each_row_to_its_most_recent_ids() -> None:
    from shardrec.data.sparse import SparseColumn, _keep_last

    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 9, 300).astype(np.int32)
    values = rng.integers(0, 1000, int(lengths.sum()))
    weights = rng.random(int(lengths.sum())).astype(np.float32)
    cut = _keep_last(SparseColumn(lengths, values, weights), 4)
    rows = np.split(np.arange(len(values)), np.cumsum(lengths)[:-1])
    kept = np.concatenate([r[-4:] for r in rows])
    assert np.array_equal(cut.lengths, np.minimum(lengths, 4))
    assert np.array_equal(cut.values, values[kept]) and np.array_equal(cut.weights, weights[kept])
