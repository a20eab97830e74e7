"""The MovieLens funnel preparer on the shared MovieLens-100k sample (skips without SHARDREC_SAMPLE_DATA):
row counts, labels, sampled movies, split and schema, checked against the raw ratings."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardrec.config import build, load_yaml
from shardrec.data.datasets import PrepareReport, prepare
from shardrec.data.reader import validate_parquet
from shardrec.errors import ConfigError
from shardrec.job import JobConfig

NEGATIVES = 2


@pytest.fixture(scope="module")
def funnel(tmp_path_factory: pytest.TempPathFactory) -> tuple[PrepareReport, pa.Table, dict[int, dict[int, int]]]:
    """The prepared funnel (K = 2), its train and eval rows together, and each user's raw ratings."""
    # Module-scoped, so it reads SHARDREC_SAMPLE_DATA itself rather than the per-test sample_data fixture.
    if not os.environ.get("SHARDREC_SAMPLE_DATA"):
        pytest.skip("SHARDREC_SAMPLE_DATA is not set")
    src = Path(os.environ["SHARDREC_SAMPLE_DATA"]) / "movielens100k"
    report = prepare("movielens_funnel", input=src, output=tmp_path_factory.mktemp("funnel") / "out", negatives=NEGATIVES, seed=3)
    rows = pa.concat_tables([pq.read_table(report.train.path), pq.read_table(report.eval.path)])
    raw = pq.read_table(src / "ratings.parquet").to_pydict()
    rated: dict[int, dict[int, int]] = defaultdict(dict)
    for u, m, r in zip(raw["user_id"], raw["movie_id"], raw["rating"]):
        rated[u][m] = r
    return report, rows, rated


def test_impressions_are_ratings_times_one_plus_negatives(funnel: tuple[PrepareReport, pa.Table, dict]) -> None:
    report, rows, rated = funnel
    n_ratings = sum(len(movies) for movies in rated.values())
    assert report.train.rows + report.eval.rows == rows.num_rows == n_ratings * (1 + NEGATIVES)
    clicks = report.train.positives["click"] + report.eval.positives["click"]
    assert clicks == n_ratings
    liked = sum(r >= 4 for movies in rated.values() for r in movies.values())
    assert report.train.positives["conversion"] + report.eval.positives["conversion"] == liked


def test_conversion_implies_click(funnel: tuple[PrepareReport, pa.Table, dict]) -> None:
    _, rows, _ = funnel
    click, conversion = rows["click"].to_numpy(), rows["conversion"].to_numpy()
    assert set(np.unique(click)) == {0, 1} and set(np.unique(conversion)) == {0, 1}
    assert not np.any((conversion == 1) & (click == 0))


def test_labels_match_raw_ratings_and_samples_are_unrated(funnel: tuple[PrepareReport, pa.Table, dict]) -> None:
    _, rows, rated = funnel
    cols = rows.select(["user_id", "movie_id", "click", "conversion", "rating"]).to_pydict()
    for u, m, click, conversion, rating in zip(*cols.values()):
        if click:
            assert rated[u][m] == rating and conversion == int(rating >= 4)
        else:
            assert m not in rated[u] and rating is None


def test_sampled_rows_copy_their_ratings_context(funnel: tuple[PrepareReport, pa.Table, dict]) -> None:
    report, _, _ = funnel
    # Eval rows stay in order: each rating's row, then its K sampled movies at its time and history.
    ev = pq.read_table(report.eval.path).slice(0, 30 * (1 + NEGATIVES)).to_pydict()
    for start in range(0, 30 * (1 + NEGATIVES), 1 + NEGATIVES):
        assert ev["click"][start] == 1 and ev["click"][start + 1:start + 1 + NEGATIVES] == [0] * NEGATIVES
        for key in ("user_id", "timestamp", "hist_movie_ids", "age", "zip3"):
            assert len({repr(ev[key][i]) for i in range(start, start + 1 + NEGATIVES)}) == 1, key


def test_eval_is_each_users_last_fifth_of_ratings(funnel: tuple[PrepareReport, pa.Table, dict]) -> None:
    report, _, rated = funnel
    per_user = defaultdict(int)
    for u, click in zip(*pq.read_table(report.eval.path, columns=["user_id", "click"]).to_pydict().values()):
        per_user[u] += click
    assert all(per_user.get(u, 0) == int(len(movies) * 0.2) for u, movies in rated.items())
    assert report.eval.rows == sum(int(len(m) * 0.2) for m in rated.values()) * (1 + NEGATIVES)


def test_schema_has_funnel_labels_and_trains_a_multi_task_job(funnel: tuple[PrepareReport, pa.Table, dict]) -> None:
    report, _, _ = funnel
    assert report.schema.labels == ["click", "conversion"]
    job_file = report.output.parent / "job.yaml"
    job_file.write_text(f"include: [{report.schema_path}]\n")
    job = build(JobConfig, {**load_yaml(job_file), "model": {"name": "mmoe"}}, key="")
    assert job.features.labels == ["click", "conversion"]
    validate_parquet(job.data.train_path, job.features)
    validate_parquet(job.data.eval_path, job.features)


def test_seeded(funnel: tuple[PrepareReport, pa.Table, dict], tmp_path: Path) -> None:
    report, rows, _ = funnel
    src = Path(os.environ["SHARDREC_SAMPLE_DATA"]) / "movielens100k"
    again = prepare("movielens_funnel", input=src, output=tmp_path / "again", negatives=NEGATIVES, seed=3)
    assert pq.read_table(again.eval.path).equals(pq.read_table(report.eval.path))


def test_negatives_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--negatives"):
        prepare("movielens_funnel", input=tmp_path, output=tmp_path / "out", negatives=0)
