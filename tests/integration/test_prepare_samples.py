"""Real data: every dataset preparer on the shared samples (skips without SHARDREC_SAMPLE_DATA).

Counts are checked against a direct count of the raw files, histories against a reference
computed here from the raw events.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from shardrec.config import build, load_yaml
from shardrec.data.datasets import PrepareReport, prepare
from shardrec.data.reader import validate_parquet
from shardrec.job import JobConfig

DLRM = {"name": "dlrm", "dense_arch_layer_sizes": [32, 16]}


def job_from(report: PrepareReport, model: dict[str, Any]) -> JobConfig:
    """The job a user gets by including the written schema.yaml and adding a model section."""
    job = report.output.parent / "job.yaml"
    job.write_text(f"include: [{report.schema_path}]\n")
    data = {**load_yaml(job), "model": model}
    if isinstance(data["features"]["label"], list):  # single-task zoo models train on one of the labels
        data["features"]["label"] = data["features"]["label"][0]
    return build(JobConfig, data, key="")


def csv_rows(path: Path, *, header: bool = True) -> list[list[str]]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[1:] if header else rows


def test_criteo_sample(sample_data: Path, tmp_path: Path) -> None:
    report = prepare("criteo", input=sample_data / "criteo" / "criteo_sample.txt", output=tmp_path / "out")
    assert (report.train.rows, report.eval.rows) == (180, 20)
    assert report.train.positives["label"] + report.eval.positives["label"] == 49
    job = job_from(report, {"name": "deepfm", "deep_layer_sizes": [32, 16]})
    assert [t.num_embeddings for t in job.features.tables] == [max(16, 16 * -(-2 * report.cardinalities[f"C{i}"] // 16)) for i in range(1, 27)]
    validate_parquet(job.data.train_path, job.features)
    validate_parquet(job.data.eval_path, job.features)


def _ml_order(sample_data: Path) -> dict[int, list[tuple[int, int]]]:
    """Per user, (timestamp, movie_id) sorted: the documented order of a user's ratings."""
    r = pq.read_table(sample_data / "movielens100k" / "ratings.parquet").to_pydict()
    by_user: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for u, m, t in zip(r["user_id"], r["movie_id"], r["timestamp"]):
        by_user[u].append((t, m))
    return {u: sorted(v) for u, v in by_user.items()}


def test_movielens_time_split(sample_data: Path, tmp_path: Path) -> None:
    report = prepare("movielens", input=sample_data / "movielens100k", output=tmp_path / "out")
    assert report.train.rows + report.eval.rows == 100_000
    order = _ml_order(sample_data)
    held_out = pq.read_table(tmp_path / "out" / "eval.parquet", columns=["user_id", "movie_id", "timestamp"]).to_pydict()
    per_user: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for u, m, t in zip(held_out["user_id"], held_out["movie_id"], held_out["timestamp"]):
        per_user[u].append((t, m))
    for u, seq in order.items():
        assert sorted(per_user[u]) == seq[len(seq) - len(seq) // 5 :]  # the last 20% of each user's ratings
    assert 0.19 < report.eval.rows / 100_000 < 0.2
    positives = sum(1 for r in pq.read_table(sample_data / "movielens100k" / "ratings.parquet", columns=["rating"])["rating"].to_pylist() if r >= 4)
    assert report.train.positives["label"] + report.eval.positives["label"] == positives
    assert report.cardinalities["user_id"] == 943 and report.cardinalities["movie_id"] == 1682
    job = job_from(report, DLRM)
    assert job.features.table("movie").num_embeddings == 1683 and job.features.features_of("movie") == ["movie_id", "hist_movie_ids"]


def test_movielens_histories_are_the_previous_50_ratings(sample_data: Path, tmp_path: Path) -> None:
    report = prepare("movielens", input=sample_data / "movielens100k", output=tmp_path / "out", split="leave_last_out")
    assert report.eval.rows == 943 and report.train.rows == 100_000 - 943
    order = _ml_order(sample_data)
    train = pq.read_table(tmp_path / "out" / "train.parquet", columns=["user_id", "movie_id", "timestamp", "hist_movie_ids"])
    lengths = np.array([len(h) for h in train["hist_movie_ids"].to_pylist()])
    assert lengths.max() == 50 and lengths.min() == 0
    rows = train.take(np.random.default_rng(0).choice(train.num_rows, 2000, replace=False)).to_pylist()
    for row in rows:
        seq = order[row["user_id"]]
        i = seq.index((row["timestamp"], row["movie_id"]))
        assert row["hist_movie_ids"] == [m for _, m in seq[max(0, i - 50) : i]]


def test_movielens_user_rows_text_and_catalogue(sample_data: Path, tmp_path: Path) -> None:
    report = prepare("movielens", input=sample_data / "movielens100k", output=tmp_path / "out", split="leave_last_out",
                     rows="user", max_history=200, title_tokens=6, sampled_negatives=32)
    assert report.train.rows == report.eval.rows == 943
    order = _ml_order(sample_data)
    out = tmp_path / "out"
    items = pq.read_table(out / "items.parquet").to_pylist()
    assert len(items) == 1682 and all(len(i["title_tokens"]) == 6 for i in items)
    tokens = {i["movie_id"]: i["title_tokens"] for i in items}
    vocab = pq.read_table(out / "vocab" / "token.parquet")["value"].to_pylist()
    assert [vocab[t] for t in tokens[1] if t] == ["toy", "story", "1995", "genre:animation", "genre:children's", "genre:comedy"]
    for split, back in (("train", 2), ("eval", 1)):
        for row in pq.read_table(out / f"{split}.parquet").to_pylist()[:50]:
            seq = order[row["user_id"]]
            assert (row["timestamp"], row["movie_id"]) == seq[-back]
            before = seq[: len(seq) - back][-200:]
            assert row["hist_movie_ids"] == [m for _, m in before]
            assert row["hist_timestamps"] == [t for t, _ in before]
            assert row["hist_title_tokens"] == [t for _, m in before for t in tokens[m]]
    job = job_from(report, {"name": "dssm"})
    assert job.data.items_path == str(out / "items.parquet")
    assert [f.name for f in job.features.sparse if f.raw] == ["hist_timestamps", "timestamp"]
    assert job.features.sparse[-1].negatives.num == 32  # type: ignore[union-attr]
    validate_parquet(out / "eval.parquet", job.features)


def test_census_sample(sample_data: Path, tmp_path: Path) -> None:
    src = sample_data / "census_income" / "census_income_kdd_sample.csv"
    report = prepare("census", input=src, output=tmp_path / "out")
    raw = csv_rows(src, header=False)
    assert report.train.rows + report.eval.rows == len(raw) == 200 and report.eval.rows == 20
    income = sum(r[-1].strip() == "50000+." for r in raw)
    never = sum(r[8].strip() == "Never married" for r in raw)
    assert (income, never) == (12, 84)
    assert report.train.positives["income_50k"] + report.eval.positives["income_50k"] == income
    assert report.train.positives["never_married"] + report.eval.positives["never_married"] == never
    assert report.cardinalities["education"] == len({r[5].strip() for r in raw})
    assert load_yaml(report.schema_path)["features"]["label"] == ["income_50k", "never_married"]
    job = job_from(report, {"name": "deepfm", "deep_layer_sizes": [32, 16]})
    validate_parquet(job.data.train_path, job.features)
    validate_parquet(job.data.eval_path, job.features)


def test_aliccp_sample(sample_data: Path, tmp_path: Path) -> None:
    folder = sample_data / "ali_ccp"
    report = prepare("aliccp", input=folder, output=tmp_path / "out")
    raw = {s: csv_rows(folder / f"ali_ccp_{s}_sample.csv") for s in ("train", "val", "test")}
    assert [len(raw[s]) for s in ("train", "val", "test")] == [100, 50, 50]
    assert (report.train.rows, report.eval.rows) == (150, 50)
    for i, label in enumerate(["click", "purchase"]):
        assert report.train.positives[label] == sum(int(r[i]) for r in raw["train"] + raw["val"])
        assert report.eval.positives[label] == sum(int(r[i]) for r in raw["test"])
    job = job_from(report, DLRM)
    validate_parquet(job.data.train_path, job.features)
    validate_parquet(job.data.eval_path, job.features)


def test_amazon_sample(sample_data: Path, tmp_path: Path) -> None:
    src = sample_data / "amazon_electronics" / "amazon_electronics_sample.csv"
    raw = [list(map(int, r)) for r in csv_rows(src)]
    report = prepare("amazon", input=src, output=tmp_path / "out", negatives=2)
    users = {r[0] for r in raw}
    positives = len(raw) - len(users)
    assert report.train.positives["label"] + report.eval.positives["label"] == positives == 83
    assert report.train.rows + report.eval.rows == 3 * positives
    # Histories strictly earlier: the targets and histories, mapped back to raw ids, follow the
    # per-user (time, item) order of the raw events.
    vocab = {c: pq.read_table(tmp_path / "out" / "vocab" / f"{c}.parquet")["value"].to_pylist() for c in ("user_id", "item_id")}
    events: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for u, item, t, _ in raw:
        events[u].append((t, item))
    table = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist() + pq.read_table(tmp_path / "out" / "eval.parquet").to_pylist()
    for row in table:
        seq = sorted(events[vocab["user_id"][row["user_id"]]])
        history = [vocab["item_id"][i] for i in row["hist_item_ids"]]
        assert history and history == [item for _, item in seq[max(0, len(history) - 50) : len(history)]]
        target = vocab["item_id"][row["item_id"]]
        if row["label"] == 1:
            assert seq[len(history)][1] == target
        else:
            assert target not in {item for _, item in seq}
    assert report.eval.positives["label"] == sum(1 for u in users if len(events[u]) > 1)
    job_from(report, DLRM)
