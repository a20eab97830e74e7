"""Dataset preparers on small hand-made inputs: values, splits, histories, schema.yaml and errors."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardrec.cli import main as cli_main
from shardrec.config import build, load_yaml
from shardrec.data.datasets import PrepareReport, names, prepare
from shardrec.data.datasets import census as census_mod
from shardrec.data.datasets.aliccp import DENSE as ALI_DENSE
from shardrec.data.datasets.aliccp import SPARSE as ALI_SPARSE
from shardrec.data.datasets.movielens import GENRES
from shardrec.data.reader import validate_parquet
from shardrec.errors import ConfigError, DataError
from shardrec.job import JobConfig


def load_job(report: PrepareReport, model: dict[str, Any] | None = None) -> JobConfig:
    """The job a user gets by including the written schema.yaml and adding a model section."""
    job = report.output.parent / f"{report.output.name}-job.yaml"
    job.write_text(f"include: [{report.schema_path}]\nmodel: {{name: dlrm, dense_arch_layer_sizes: [32, 16]}}\n")
    data = load_yaml(job)
    if model is not None:
        data["model"] = model
    if isinstance(data["features"]["label"], list):  # single-task zoo models train on one of the labels
        data["features"]["label"] = data["features"]["label"][0]
    return build(JobConfig, data, key="")


def rows_of(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def no_leftovers(folder: Path) -> bool:
    return not any(p.name.startswith(".") for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# Registry and options.


def test_registry_lists_every_dataset_and_rejects_unknown_names(tmp_path: Path) -> None:
    assert names() == ["aliccp", "amazon", "census", "criteo", "movielens", "movielens_funnel"]
    with pytest.raises(ConfigError, match="unknown dataset 'netflix'; known datasets: aliccp, amazon, census, criteo, movielens"):
        prepare("netflix", input=tmp_path, output=tmp_path / "out")


def test_unknown_or_bad_option_names_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset 'census' has no option --negatives; its options are: --embedding-dim, --seed"):
        prepare("census", input=tmp_path, output=tmp_path / "out", negatives=2)
    with pytest.raises(ConfigError, match="valid choices: time, leave_last_out"):
        prepare("movielens", input=tmp_path, output=tmp_path / "out", split="random")
    with pytest.raises(ConfigError, match="--embedding-dim must be > 0"):
        prepare("amazon", input=tmp_path, output=tmp_path / "out", embedding_dim=0)
    with pytest.raises(ConfigError, match="--negatives must be >= 0"):
        prepare("amazon", input=tmp_path, output=tmp_path / "out", negatives=-1)


def test_missing_input_and_existing_output_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"input '.*nowhere' does not exist; pass --input a raw UCI KDD Census-Income file"):
        prepare("census", input=tmp_path / "nowhere", output=tmp_path / "out")
    src = write_census(tmp_path / "census.csv", CENSUS_ROWS)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="output '.*out' already exists; remove it"):
        prepare("census", input=src, output=tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# ---------------------------------------------------------------------------------------------
# Criteo.


def criteo_lines(n: int, *, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        ints = [str(v) if v % 4 else "" for v in rng.integers(0, 50, 13)]
        cats = [f"{v:08x}" for v in rng.integers(0, 6, 26)]
        lines.append("\t".join([str(i % 2), *ints, *cats]))
    return lines


def test_criteo_single_file_splits_90_10_in_order_and_sizes_hashed_tables(tmp_path: Path) -> None:
    src = tmp_path / "day_0"
    src.write_text("\n".join(criteo_lines(30, seed=0)) + "\n")
    report = prepare("criteo", input=src, output=tmp_path / "out")
    train, held_out = pq.read_table(tmp_path / "out" / "train" / "day_0.parquet"), pq.read_table(tmp_path / "out" / "eval" / "day_0.parquet")
    assert (train.num_rows, held_out.num_rows) == (27, 3)
    assert train["label"].to_pylist() == [i % 2 for i in range(27)] and held_out["label"].to_pylist() == [1, 0, 1]
    assert (report.train.rows, report.train.positives, report.eval.rows, report.eval.positives) == (27, {"label": 13}, 3, {"label": 2})
    c1 = len(set(pq.read_table(tmp_path / "out" / "train", columns=["C1"])["C1"].to_pylist()) | set(held_out["C1"].to_pylist()))
    assert report.cardinalities["C1"] == c1 and report.schema.table("t_C1").num_embeddings == 16  # 2 * <=6, at least 16
    job = load_job(report)
    assert job.features.sparse[0].hash and job.features.dense[0].transform == "log1p"
    assert job.data.train_path == str(tmp_path / "out" / "train") and job.data.eval_path == str(tmp_path / "out" / "eval")
    validate_parquet(Path(job.data.train_path), job.features)
    validate_parquet(Path(job.data.eval_path), job.features)
    assert no_leftovers(tmp_path / "out") and no_leftovers(tmp_path)


def test_criteo_folder_holds_out_the_last_day_in_natural_order(tmp_path: Path) -> None:
    days = tmp_path / "days"
    days.mkdir()
    for i, name in enumerate(["day_0", "day_2", "day_10"]):
        (days / name).write_text("\n".join(criteo_lines(5 + i, seed=i)) + "\n")
    with gzip.open(days / "day_1.gz", "wt") as f:
        f.write("\n".join(criteo_lines(4, seed=9)) + "\n")
    report = prepare("criteo", input=days, output=tmp_path / "out", hash_rows=1000, embedding_dim=8)
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["day_0.parquet", "day_1.parquet", "day_2.parquet"]
    assert [p.name for p in (tmp_path / "out" / "eval").iterdir()] == ["day_10.parquet"]
    assert (report.train.rows, report.eval.rows) == (5 + 4 + 6, 7)
    assert {(t.num_embeddings, t.embedding_dim) for t in report.schema.tables} == {(1000, 8)}
    other = prepare("criteo", input=days, output=tmp_path / "out2", eval_file="day_2")
    assert [p.name for p in (tmp_path / "out2" / "eval").iterdir()] == ["day_2.parquet"]
    assert other.train.rows == 5 + 4 + 7


def test_criteo_bad_line_names_the_file_and_leaves_no_output(tmp_path: Path) -> None:
    days = tmp_path / "days"
    days.mkdir()
    (days / "day_0").write_text("\n".join(criteo_lines(5, seed=0)) + "\n")
    lines = criteo_lines(5, seed=1)
    lines[3] = "2" + lines[3][1:]
    (days / "day_1").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"day_1, line 4, column 1 \(label\): label is '2'"):
        prepare("criteo", input=days, output=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["days"]


# ---------------------------------------------------------------------------------------------
# MovieLens.


def write_movielens(folder: Path, ratings: list[tuple[int, int, int, int]], *, drop: str | None = None) -> Path:
    """users 1..3, movies 1..60 (movie m has genres m % 19 and, for even m, Drama), and ``ratings``."""
    folder.mkdir()
    r = dict(zip(["user_id", "movie_id", "rating", "timestamp"], map(list, zip(*ratings))))
    users = {"user_id": [1, 2, 3], "age": [17, 30, 60], "gender": ["M", "F", "M"], "occupation": ["writer", "artist", "writer"],
             "zip_code": ["12345", "T8H1N", "99999"]}
    items: dict[str, list[Any]] = {"movie_id": list(range(1, 61)), "movie_title": [f"m{m}" for m in range(1, 61)]}
    for g, genre in enumerate(GENRES):
        items[genre] = [int(m % 19 == g or (genre == "Drama" and m % 2 == 0)) for m in range(1, 61)]
    for name, cols in (("ratings", r), ("users", users), ("items", items)):
        pq.write_table(pa.table({k: v for k, v in cols.items() if k != drop}), folder / f"{name}.parquet")
    return folder


def ml_ratings() -> list[tuple[int, int, int, int]]:
    """User 1: 55 ratings (histories cut at 50), user 2: 10 in pairs of one second, user 3: 5 in reverse."""
    out = [(1, m, 1 + m % 5, 1000 + m) for m in range(1, 56)]
    out += [(2, m, 5, 2000 + m // 2) for m in range(10, 0, -1)]
    out += [(3, m, 4, 3000 - m) for m in range(1, 6)]
    return out


def ordered(ratings: list[tuple[int, int, int, int]]) -> dict[int, list[tuple[int, int]]]:
    """Per user, (timestamp, movie) in the documented order."""
    by_user: dict[int, list[tuple[int, int]]] = {}
    for u, m, _, t in ratings:
        by_user.setdefault(u, []).append((t, m))
    return {u: sorted(v) for u, v in by_user.items()}


def test_movielens_rows_histories_and_time_split(tmp_path: Path) -> None:
    ratings = ml_ratings()
    report = prepare("movielens", input=write_movielens(tmp_path / "ml", ratings), output=tmp_path / "out")
    train, held_out = rows_of(tmp_path / "out" / "train.parquet"), rows_of(tmp_path / "out" / "eval.parquet")
    assert len(train) + len(held_out) == len(ratings)
    order = ordered(ratings)
    assert sorted((r["user_id"], r["timestamp"], r["movie_id"]) for r in held_out) == sorted(
        (u, t, m) for u, seq in order.items() for t, m in seq[len(seq) - len(seq) // 5 :]
    )
    for row in train + held_out:
        seq = order[row["user_id"]]
        i = seq.index((row["timestamp"], row["movie_id"]))
        assert row["hist_movie_ids"] == [m for _, m in seq[max(0, i - 50) : i]]
        assert row["label"] == int(row["rating"] >= 4)
        m = row["movie_id"]
        assert row["genres"] == sorted({m % 19} | ({GENRES.index("Drama")} if m % 2 == 0 else set()))
    by_user = {r["user_id"]: r for r in held_out}
    assert len(by_user[1]["hist_movie_ids"]) == 50
    assert [(r["age"], r["gender"], r["occupation"], r["zip3"]) for r in (by_user[1], by_user[2], by_user[3])] == [
        (17, 1, 1, 0), (30, 0, 0, 2), (60, 1, 1, 1)]  # vocabularies: F < M, artist < writer, 123 < 999 < T8H
    assert report.cardinalities["age_bucket"] == 3 and report.schema.table("age_bucket").num_embeddings == 7
    assert report.schema.table("movie").num_embeddings == 61 and report.schema.features_of("movie") == ["movie_id", "hist_movie_ids"]
    assert report.schema.table("genre").num_embeddings == 19
    job = load_job(report)
    hist = next(f for f in job.features.sparse if f.name == "hist_movie_ids")
    assert hist.sequence and hist.max_len == 50
    assert [f.name for f in job.features.sparse if f.raw] == ["hist_timestamps", "timestamp"]
    assert job.data.items_path == str(tmp_path / "out" / "items.parquet")
    assert pq.read_table(tmp_path / "out" / "vocab" / "zip3.parquet").to_pylist()[2] == {"id": 2, "value": "T8H"}


def test_movielens_leave_last_out_and_shuffled_train(tmp_path: Path) -> None:
    ratings = ml_ratings()
    prepare("movielens", input=write_movielens(tmp_path / "ml", ratings), output=tmp_path / "out", split="leave_last_out", seed=3)
    held_out = rows_of(tmp_path / "out" / "eval.parquet")
    assert [(r["user_id"], r["movie_id"]) for r in held_out] == [(1, 55), (2, 10), (3, 1)]
    train = pq.read_table(tmp_path / "out" / "train.parquet")
    assert train.num_rows == len(ratings) - 3
    assert train["user_id"].to_pylist() != sorted(train["user_id"].to_pylist())


@pytest.mark.parametrize(("drop", "file"), [("timestamp", "ratings"), ("zip_code", "users"), ("Western", "items")])
def test_movielens_missing_column_names_file_and_column(tmp_path: Path, drop: str, file: str) -> None:
    src = write_movielens(tmp_path / "ml", ml_ratings(), drop=drop)
    with pytest.raises(DataError, match=rf"{file}.parquet has no column '{drop}'; its columns are"):
        prepare("movielens", input=src, output=tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_movielens_missing_or_unreadable_file_is_named(tmp_path: Path) -> None:
    src = write_movielens(tmp_path / "ml", ml_ratings())
    (src / "items.parquet").write_text("movie_id,title\n1,x\n")
    with pytest.raises(DataError, match=r"items.parquet is not a readable Parquet file .*; rewrite it as Parquet"):
        prepare("movielens", input=src, output=tmp_path / "out")
    (src / "users.parquet").unlink()
    with pytest.raises(DataError, match=r"users.parquet does not exist or is not a file; expected users.parquet in a MovieLens-100k folder"):
        prepare("movielens", input=src, output=tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_movielens_rating_of_unknown_user_is_an_error(tmp_path: Path) -> None:
    src = write_movielens(tmp_path / "ml", [*ml_ratings(), (7, 1, 5, 5000)])
    with pytest.raises(DataError, match=r"ratings.parquet: user_id 7 is not in .*users.parquet"):
        prepare("movielens", input=src, output=tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Census.

_CENSUS_TEMPLATE = (
    "{age}, Private,43,23, High school graduate,{wage}, Not in universe, {marital}, Education, Adm support including clerical,"
    " White, All other, {sex}, Not in universe, Not in universe, Full-time schedules,{gains},0,0, Joint both under 65,"
    " Not in universe, Not in universe, Householder, Householder,1819.08, ?, ?, ?, Not in universe under 1 year old, ?,4,"
    " Not in universe, United-States, United-States, United-States, Native- Born in the United States,0, Not in universe,2,52,95,"
    " {income}"
)
CENSUS_ROWS = [
    {"age": 20 + i, "wage": i * 10, "marital": "Never married" if i % 3 == 0 else "Divorced", "sex": "Female" if i % 2 else "Male",
     "gains": 0 if i % 4 else 9000, "income": "50000+." if i % 5 == 0 else "- 50000."}
    for i in range(20)
]


def write_census(path: Path, rows: list[dict[str, Any]], *, with_id: bool = True) -> Path:
    lines = [(f"{100 + i}," if with_id else "") + _CENSUS_TEMPLATE.format(**r) for i, r in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("with_id", [True, False])
def test_census_labels_features_and_seeded_split(tmp_path: Path, with_id: bool) -> None:
    report = prepare("census", input=write_census(tmp_path / "c.csv", CENSUS_ROWS, with_id=with_id), output=tmp_path / "out", seed=1)
    train, held_out = rows_of(tmp_path / "out" / "train.parquet"), rows_of(tmp_path / "out" / "eval.parquet")
    assert (len(train), len(held_out)) == (18, 2)
    by_age = {r["age"]: r for r in train + held_out}
    assert sorted(by_age) == [20 + i for i in range(20)]
    for i, raw in enumerate(CENSUS_ROWS):
        row = by_age[20 + i]
        assert (row["income_50k"], row["never_married"]) == (int(i % 5 == 0), int(i % 3 == 0))
        assert (row["wage_per_hour"], row["capital_gains"], row["sex"], row["year"]) == (raw["wage"], raw["gains"], int(i % 2 == 0), 0)
    assert "marital_stat" not in train[0] and "income" not in train[0] and train[0]["instance_weight"] == 1819.08
    total = {label: report.train.positives[label] + report.eval.positives[label] for label in census_mod.LABELS}
    assert total == {"income_50k": 4, "never_married": 7}
    schema = report.schema
    assert schema.label == ["income_50k", "never_married"] and len(schema.sparse) == 32 and len(schema.dense) == 7
    assert {f.name for f in schema.dense if f.transform == "log1p"} == {"wage_per_hour", "capital_gains", "capital_losses", "stock_dividends"}
    assert schema.table("t_sex").num_embeddings == 2 and schema.table("t_class_worker").num_embeddings == 1
    load_job(report, model={"name": "deepfm", "deep_layer_sizes": [16]})
    validate_parquet(tmp_path / "out" / "train.parquet", schema)
    again = prepare("census", input=tmp_path / "c.csv", output=tmp_path / "again", seed=1)
    assert rows_of(tmp_path / "again" / "eval.parquet") == held_out and again.eval == dataclasses.replace(report.eval, path=again.eval.path)


def test_census_bad_income_and_field_count_name_the_line(tmp_path: Path) -> None:
    rows = [dict(r) for r in CENSUS_ROWS]
    rows[6]["income"] = "lots"
    with pytest.raises(DataError, match=r"c.csv, line 7, column 'income' .*'lots' is not an income class"):
        prepare("census", input=write_census(tmp_path / "c.csv", rows), output=tmp_path / "out")
    (tmp_path / "short.csv").write_text("1,2,3\n")
    with pytest.raises(DataError, match=r"short.csv, line 1: 3 comma-separated fields, expected 42"):
        prepare("census", input=tmp_path / "short.csv", output=tmp_path / "out")
    lines = (tmp_path / "c.csv").read_text().splitlines()
    lines[4] = lines[4] + ",extra"
    (tmp_path / "ragged.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ragged.csv, line 5: expected 43 comma-separated fields, got 44"):
        prepare("census", input=tmp_path / "ragged.csv", output=tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# Ali-CCP.


def write_aliccp(path: Path, n: int, *, seed: int, bad: tuple[int, str, str] | None = None) -> Path:
    rng = np.random.default_rng(seed)
    header = ["click", "purchase", *ALI_SPARSE, *ALI_DENSE]
    lines = [",".join(header)]
    for i in range(n):
        click = int(i % 3 == 0)
        row = {"click": click, "purchase": int(click and i % 2 == 0)}
        row |= {c: int(rng.integers(0, 4)) * 100 for c in ALI_SPARSE} | {c: round(float(rng.random()), 3) for c in ALI_DENSE}
        if bad is not None and bad[0] == i:
            row[bad[1]] = bad[2]
        lines.append(",".join(str(row[c]) for c in header))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_aliccp_folder_trains_on_train_and_val_and_evaluates_on_test(tmp_path: Path) -> None:
    src = tmp_path / "ali"
    src.mkdir()
    for name, n, seed in (("train", 12, 0), ("val", 6, 1), ("test", 9, 2)):
        write_aliccp(src / f"ali_ccp_{name}.csv", n, seed=seed)
    report = prepare("aliccp", input=src, output=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == ["train.parquet", "val.parquet"]
    assert (report.train.rows, report.eval.rows) == (18, 9)
    assert report.train.positives == {"click": 4 + 2, "purchase": 2 + 1} and report.eval.positives == {"click": 3, "purchase": 2}
    test = pq.read_table(tmp_path / "out" / "eval" / "test.parquet")
    assert set(test["101"].to_pylist()) <= {0, 1, 2, 3}  # raw 0, 100, 200, 300 -> vocabulary ids
    assert test.schema.field("D508").type == pa.float64() and test.schema.field("click").type == pa.int8()
    assert report.schema.label == ["click", "purchase"] and len(report.schema.sparse) == 23 and len(report.schema.dense) == 8
    job = load_job(report)
    validate_parquet(Path(job.data.train_path), job.features)
    (src / "ali_ccp_test.csv").unlink()
    report = prepare("aliccp", input=src, output=tmp_path / "out2")
    assert (report.train.rows, report.eval.rows) == (12, 6)


def test_aliccp_single_file_is_split_90_10(tmp_path: Path) -> None:
    report = prepare("aliccp", input=write_aliccp(tmp_path / "a.csv", 30, seed=0), output=tmp_path / "out")
    assert (report.train.rows, report.eval.rows) == (27, 3)
    assert report.train.positives["click"] + report.eval.positives["click"] == 10


@pytest.mark.parametrize(("column", "value", "message"), [
    ("purchase", "2", r"line 5, column 'purchase': label is '2', expected 0 or 1"),
    ("D702", "x", r"line 5, column 'D702': 'x' is not a number"),
    ("205", "1.5", r"line 5, column '205': '1.5' is not an integer"),
])
def test_aliccp_bad_values_name_file_line_and_column(tmp_path: Path, column: str, value: str, message: str) -> None:
    src = tmp_path / "ali"
    src.mkdir()
    write_aliccp(src / "ali_ccp_train.csv", 8, seed=0)
    write_aliccp(src / "ali_ccp_test.csv", 8, seed=1, bad=(3, column, value))
    with pytest.raises(DataError, match=rf"ali_ccp_test.csv, {message}"):
        prepare("aliccp", input=src, output=tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_aliccp_missing_column_and_missing_train_file(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("click,purchase,101\n0,0,1\n")
    with pytest.raises(DataError, match=r"a.csv has no column '121'; its columns are: click, purchase, 101"):
        prepare("aliccp", input=tmp_path / "a.csv", output=tmp_path / "out")
    (tmp_path / "ali").mkdir()
    write_aliccp(tmp_path / "ali" / "x_test.csv", 5, seed=0)
    with pytest.raises(DataError, match=r"holds no \*train\*.csv file"):
        prepare("aliccp", input=tmp_path / "ali", output=tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Amazon.

# (user, item, time, cate): user u1 has 4 events (two at one time), u2 has 3, u3 only 1.
AMAZON_EVENTS = [
    ("u1", 10, 5, 100), ("u1", 12, 1, 102), ("u1", 11, 5, 101), ("u1", 13, 9, 100),
    ("u2", 12, 2, 102), ("u2", 14, 3, 101), ("u2", 10, 4, 100),
    ("u3", 15, 1, 103),
]


def write_amazon(path: Path, events: list[tuple[Any, ...]]) -> Path:
    path.write_text("user_id,item_id,time,cate_id\n" + "".join(",".join(map(str, e)) + "\n" for e in events))
    return path


def test_amazon_din_samples_histories_negatives_and_split(tmp_path: Path) -> None:
    report = prepare("amazon", input=write_amazon(tmp_path / "a.csv", AMAZON_EVENTS), output=tmp_path / "out", negatives=2)
    train, held_out = rows_of(tmp_path / "out" / "train.parquet"), rows_of(tmp_path / "out" / "eval.parquet")
    # Vocabularies: users u1, u2, u3 -> 0, 1, 2; items 10..15 -> 0..5; cates 100..103 -> 0..3.
    positives = sorted((r["user_id"], r["item_id"], r["cate_id"], tuple(r["hist_item_ids"]), tuple(r["hist_cate_ids"]))
                       for r in train + held_out if r["label"] == 1)
    assert positives == [
        (0, 0, 0, (2,), (2,)), (0, 1, 1, (2, 0), (2, 0)), (0, 3, 0, (2, 0, 1), (2, 0, 1)),
        (1, 0, 0, (2, 4), (2, 1)), (1, 4, 1, (2,), (2,)),
    ]
    seen = {0: {0, 1, 2, 3}, 1: {2, 4, 0}}
    item_cate = {0: 0, 1: 1, 2: 2, 3: 0, 4: 1, 5: 3}
    negatives = [r for r in train + held_out if r["label"] == 0]
    assert len(negatives) == 2 * len(positives)
    for r in negatives:
        assert r["item_id"] not in seen[r["user_id"]] and r["cate_id"] == item_cate[r["item_id"]]
    assert [(r["user_id"], r["item_id"], r["label"]) for r in held_out if r["label"] == 1] == [(0, 3, 1), (1, 0, 1)]
    assert [r["label"] for r in held_out] == [1, 0, 0, 1, 0, 0]
    assert (report.train.rows, report.eval.rows) == (9, 6) and report.train.positives == {"label": 3}
    schema = load_job(report).features
    assert schema.features_of("item") == ["item_id", "hist_item_ids"] and schema.features_of("cate") == ["cate_id", "hist_cate_ids"]
    assert schema.table("item").num_embeddings == 6 and schema.sequence_tables() == ["cate", "item"]


def test_amazon_negative_sampling_is_seeded(tmp_path: Path) -> None:
    src = write_amazon(tmp_path / "a.csv", AMAZON_EVENTS)
    prepare("amazon", input=src, output=tmp_path / "a", seed=5)
    prepare("amazon", input=src, output=tmp_path / "b", seed=5)
    assert rows_of(tmp_path / "a" / "train.parquet") == rows_of(tmp_path / "b" / "train.parquet")


def test_amazon_item_with_two_categories_and_bad_time_are_errors(tmp_path: Path) -> None:
    src = write_amazon(tmp_path / "a.csv", [*AMAZON_EVENTS, ("u3", 12, 7, 101)])
    with pytest.raises(DataError, match=r"a.csv, line 10: item_id 12 has cate_id 101, but 102 on line 3"):
        prepare("amazon", input=src, output=tmp_path / "out")
    src = write_amazon(tmp_path / "b.csv", [*AMAZON_EVENTS, ("u3", 12, "soon", 102)])
    with pytest.raises(DataError, match=r"b.csv, line 10, column 'time': 'soon' is not an integer"):
        prepare("amazon", input=src, output=tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_amazon_user_who_saw_every_item_cannot_get_negatives(tmp_path: Path) -> None:
    src = write_amazon(tmp_path / "a.csv", [("u", 1, 1, 1), ("u", 2, 2, 1)])
    with pytest.raises(DataError, match="user_id u interacted with every one of the 2 items.*--negatives 0"):
        prepare("amazon", input=src, output=tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# The command line.


def test_cli_prepare_prints_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_census(tmp_path / "c.csv", CENSUS_ROWS)
    assert cli_main(["data", "prepare", "census", "--input", str(src), "--output", str(tmp_path / "out"), "--embedding-dim", "8"]) == 0
    out = capsys.readouterr().out
    assert "train: 18 rows" in out and "eval: 2 rows" in out
    assert "income_50k:" in out and "never_married:" in out and "sex: 2 -> t_sex [2 x 8]" in out
    assert cli_main(["data", "prepare", "census", "--input", str(src), "--output", str(tmp_path / "o2"), "--negatives", "3"]) == 2
    assert "has no option --negatives" in capsys.readouterr().err
