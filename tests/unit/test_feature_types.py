"""Every feature type from an Arrow table to the Batch, compared value by value with plain Python."""

from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa
import pytest
import torch

from shardrec.config import build
from shardrec.data.decode import Assembler, decode
from shardrec.data.hashing import hash_ids
from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError, DataError

ROWS = {"item": 50, "genre": 20, "tag": 30, "age_b": 4, "user": 97, "cross": 101}

TABLE = pa.table(
    {
        "click": pa.array([1, 0, 1, 0], pa.int8()),
        "buy": pa.array([0, 0, 1, 0], pa.int8()),
        "price": pa.array([1.5, None, 3.0, 0.0], pa.float32()),
        "user": pa.array(["u1", "u2", None, "u1"]),
        "city": pa.array(["paris", "rome", "oslo", None]),
        "item_id": pa.array([3, 7, 7, 49], pa.int64()),
        "genres": pa.array([[1, 2], [], None, [5, None, 6]], pa.list_(pa.int64())),
        "tags": pa.array([[4, 9], [1], None, [2, 3, 5]], pa.list_(pa.int64())),
        "tag_w": pa.array([[0.5, 2.0], [1.0], None, [0.1, 0.2, 0.3]], pa.list_(pa.float32())),
        "hist": pa.array([[1, 2, 3, 4, 5], [9], [], None], pa.list_(pa.int64())),
        "age": pa.array([17.0, 18.0, 49.9, None], pa.float64()),
    }
)


def _schema() -> FeatureSchema:
    return build(
        FeatureSchema,
        {
            "label": ["click", "buy"],
            "dense": [{"name": "price", "fill_missing": -1.0}],
            "sparse": [
                {"name": "user", "table": "user", "hash": True},
                {"name": "item_id", "table": "item"},
                {"name": "genres", "table": "genre"},
                {"name": "tags", "table": "tag", "weights": "tag_w"},
                {"name": "hist_items", "source": "hist", "table": "item", "sequence": True, "max_len": 3},
                {"name": "age_bucket", "source": "age", "table": "age_b", "boundaries": [18, 30, 50]},
                {"name": "user_x_city", "table": "cross", "cross": ["user", "city"]},
            ],
            "tables": [{"name": n, "num_embeddings": r, "embedding_dim": 8} for n, r in ROWS.items()],
        },
        key="features",
    )


def _batch(table: pa.Table = TABLE):
    schema = _schema()
    assembler = Assembler(schema)
    assembler.add(decode(table, schema, "t.parquet row group 0"))
    return assembler.take(table.num_rows)


def _jagged(kjt, key: str) -> list[list[int]]:
    return [row.tolist() for row in kjt[key].to_dense()]


def test_labels_are_stacked_per_task_and_dense_is_filled() -> None:
    batch = _batch()
    assert batch.labels.tolist() == [[1, 0], [0, 0], [1, 1], [0, 0]]
    assert batch.dense_features[:, 0].tolist() == [1.5, -1.0, 3.0, 0.0]


def test_single_and_multi_hot_ids() -> None:
    kjt = _batch().sparse_features
    assert _jagged(kjt, "item_id") == [[3], [7], [7], [49]]
    assert _jagged(kjt, "genres") == [[1, 2], [], [], [5, 6]]  # null list -> empty, null item dropped
    expected_users = hash_ids(pa.array(["u1", "u2", "u1"]), ROWS["user"]).tolist()
    assert _jagged(kjt, "user") == [[expected_users[0]], [expected_users[1]], [], [expected_users[2]]]


def test_weighted_features_carry_their_weights_in_their_own_kjt() -> None:
    batch = _batch()
    assert "tags" not in batch.sparse_features.keys()
    kjt = batch.weighted_features
    assert kjt is not None and kjt.keys() == ["tags"]
    assert _jagged(kjt, "tags") == [[4, 9], [1], [], [2, 3, 5]]
    torch.testing.assert_close(kjt.weights(), torch.tensor([0.5, 2.0, 1.0, 0.1, 0.2, 0.3]))


def test_sequence_keeps_the_most_recent_max_len_ids() -> None:
    assert _jagged(_batch().sparse_features, "hist_items") == [[3, 4, 5], [9], [], []]


def test_bucketized_ids_count_boundaries_at_or_below_the_value() -> None:
    expected = [[bisect.bisect_right([18, 30, 50], x)] for x in (17.0, 18.0, 49.9)] + [[]]
    assert _jagged(_batch().sparse_features, "age_bucket") == expected == [[0], [1], [2], []]


def test_combo_crosses_both_columns_and_skips_rows_with_a_null_part() -> None:
    rows = _jagged(_batch().sparse_features, "user_x_city")
    assert [len(r) for r in rows] == [1, 1, 0, 0]
    assert rows[0] != rows[1] and all(0 <= r[0] < ROWS["cross"] for r in rows[:2])
    again = _jagged(_batch(TABLE.slice(0, 2)).sparse_features, "user_x_city")
    assert again == rows[:2]  # the cross depends on the values only, not on the batch


def test_keys_are_in_schema_order_without_weighted_features() -> None:
    assert _batch().sparse_features.keys() == ["user", "item_id", "genres", "hist_items", "age_bucket", "user_x_city"]


def _replace(column: str, values: pa.Array) -> pa.Table:
    return TABLE.set_column(TABLE.schema.get_field_index(column), column, values)


def test_sequence_column_that_is_not_a_list_is_an_error() -> None:
    with pytest.raises(DataError, match=r"t.parquet row group 0: feature 'hist_items' \(features.sparse\[4\]\).*not a list"):
        _batch(_replace("hist", pa.array([1, 2, 3, 4], pa.int64())))


def test_weights_that_do_not_align_with_ids_are_an_error() -> None:
    bad = pa.array([[0.5], [1.0], None, [0.1, 0.2, 0.3]], pa.list_(pa.float32()))
    with pytest.raises(DataError, match=r"feature 'tags'.*row 0 has 2 ids but 1 weights in 'tag_w'"):
        _batch(_replace("tag_w", bad))


def test_label_outside_zero_one_names_the_column() -> None:
    with pytest.raises(DataError, match=r"label column 'buy' holds 2.0"):
        _batch(_replace("buy", pa.array([0, 2, 1, 0], pa.int8())))


@pytest.mark.parametrize(
    "feature, message",
    [
        ({"name": "a", "table": "t", "boundaries": [3, 1]}, "strictly increasing"),
        ({"name": "a", "table": "t", "cross": ["x"]}, "two or more columns"),
        ({"name": "a", "table": "t", "max_len": 0}, "max_len must be > 0"),
        ({"name": "a", "table": "t", "sequence": True, "weights": "w"}, "cannot be weighted"),
        ({"name": "a", "table": "t", "boundaries": [1, 2, 3, 4]}, "4 boundaries make 5 buckets"),
    ],
)
def test_bad_feature_configs(feature: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build(
            FeatureSchema,
            {"sparse": [feature], "tables": [{"name": "t", "num_embeddings": 4, "embedding_dim": 4}]},
            key="features",
        )


def test_batches_cut_across_chunks_keep_values() -> None:
    schema = _schema()
    assembler = Assembler(schema)
    for start in (0, 2):
        assembler.add(decode(TABLE.slice(start, 2), schema, "t"))
    first, second = assembler.take(3), assembler.take(1)
    whole = _batch()
    for key in whole.sparse_features.keys():
        assert _jagged(first.sparse_features, key) + _jagged(second.sparse_features, key) == _jagged(whole.sparse_features, key)
    assert np.allclose(np.concatenate([first.weighted_features.weights(), second.weighted_features.weights()]), whole.weighted_features.weights())
