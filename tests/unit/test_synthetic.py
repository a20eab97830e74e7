"""Synthetic data: schema conformance, determinism, the planted signal and the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardrec.data import synthetic_signal as synthetic
from shardrec.data.config import DataConfig, SyntheticConfig
from shardrec.data.schema import DenseFeature, FeatureSchema, SparseFeature, TableConfig, criteo_schema
from shardrec.data.synthetic_signal import ensure_synthetic, generate, oracle_logit
from shardrec.errors import ConfigError


def small_schema() -> FeatureSchema:
    """Dense with and without fill_missing, tables of very different sizes, two features on one table."""
    return FeatureSchema(
        label="click",
        dense=[DenseFeature(name="d0", fill_missing=0.0, transform="log1p"), DenseFeature(name="d1")],
        sparse=[
            SparseFeature(name="s_big", table="big"),
            SparseFeature(name="s_small", table="small"),
            SparseFeature(name="s_small2", table="small"),
            SparseFeature(name="s_one", table="one"),
        ],
        tables=[
            TableConfig(name="big", num_embeddings=200_000, embedding_dim=4),
            TableConfig(name="small", num_embeddings=1000, embedding_dim=4),
            TableConfig(name="one", num_embeddings=1, embedding_dim=4),
        ],
    )


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula, ties averaged."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    pos = labels.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, pa.Table]:
    """A train and an eval file: other row seeds, one signal seed."""
    d = tmp_path_factory.mktemp("syn")
    schema = small_schema()
    generate(schema, rows=20_000, path=d / "train.parquet", seed=0, signal_seed=7, row_group_size=8192)
    generate(schema, rows=20_000, path=d / "eval.parquet", seed=1, signal_seed=7, row_group_size=8192)
    return pq.read_table(d / "train.parquet"), pq.read_table(d / "eval.parquet")


def test_columns_match_schema(files: tuple[pa.Table, pa.Table]) -> None:
    train, _ = files
    schema = small_schema()
    assert train.column_names == ["click", "d0", "d1", "s_big", "s_small", "s_small2", "s_one"]
    assert train.schema.field("click").type == pa.int8()
    assert all(train.schema.field(n).type == pa.float32() for n in ("d0", "d1"))
    for f in schema.sparse:
        ids = train.column(f.name).to_numpy()
        assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < schema.table(f.table).num_embeddings
    assert 0.03 < train.column("d0").null_count / train.num_rows < 0.07
    assert train.column("d1").null_count == 0
    d1 = train.column("d1").to_numpy()
    assert d1.min() == 0 and np.all(d1 == np.floor(d1)) and d1.max() > 100 * np.median(d1)  # heavy-tailed counts
    assert 0.25 < train.column("click").to_numpy().mean() < 0.35
    assert set(np.unique(train.column("click").to_numpy())) == {0, 1}


def test_row_groups(tmp_path: Path) -> None:
    generate(small_schema(), rows=2500, path=tmp_path / "f.parquet", seed=3, row_group_size=1000)
    meta = pq.ParquetFile(tmp_path / "f.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1000, 1000, 500]
    assert [p.name for p in tmp_path.iterdir()] == ["f.parquet"]


def test_ids_follow_a_permuted_power_law(files: tuple[pa.Table, pa.Table]) -> None:
    ids = files[0].column("s_small").to_numpy()
    freq = np.sort(np.bincount(ids, minlength=1000))[::-1] / len(ids)
    expected = np.arange(1, 1001) ** -1.2
    expected /= expected.sum()
    np.testing.assert_allclose(freq[:5], expected[:5], rtol=0.15)
    hottest = np.argsort(np.bincount(ids, minlength=1000))[::-1][:5]
    assert sorted(hottest.tolist()) != [0, 1, 2, 3, 4]
    # s_small and s_small2 share a table, hence the same hot ids.
    assert np.bincount(files[0].column("s_small2").to_numpy()).argmax() == hottest[0]


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    schema = small_schema()
    a = pq.read_table(generate(schema, rows=3000, path=tmp_path / "a.parquet", seed=11))
    b = pq.read_table(generate(schema, rows=3000, path=tmp_path / "b.parquet", seed=11))
    c = pq.read_table(generate(schema, rows=3000, path=tmp_path / "c.parquet", seed=12))
    assert a.equals(b)
    assert not a.column("s_small").equals(c.column("s_small"))


def test_train_and_eval_share_the_planted_signal(files: tuple[pa.Table, pa.Table]) -> None:
    train, eval_ = files
    schema = small_schema()
    for table in files:
        assert auc(table.column("click").to_numpy(), oracle_logit(schema, table, signal_seed=7)) > 0.75
    wrong = oracle_logit(schema, eval_, signal_seed=8)
    assert auc(eval_.column("click").to_numpy(), wrong) < 0.7
    # Something learnt on train carries over: the mean label per id of one feature, scored on eval.
    ids, labels = train.column("s_small").to_numpy(), train.column("click").to_numpy()
    rate = (np.bincount(ids, weights=labels, minlength=1000) + 0.3) / (np.bincount(ids, minlength=1000) + 1.0)
    assert auc(eval_.column("click").to_numpy(), rate[eval_.column("s_small").to_numpy()]) > 0.55


def test_criteo_shaped(tmp_path: Path) -> None:
    schema = criteo_schema(num_dense=13, num_sparse=26, rows=[10 ** (2 + i % 4) for i in range(26)])
    table = pq.read_table(generate(schema, rows=5000, path=tmp_path / "c.parquet", seed=0))
    assert table.column_names == ["label", *[f"I{i}" for i in range(1, 14)], *[f"C{i}" for i in range(1, 27)]]
    assert auc(table.column("label").to_numpy(), oracle_logit(schema, table, signal_seed=0)) > 0.75


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="zipf_a must be > 0"):
        generate(small_schema(), rows=10, path=tmp_path / "x.parquet", seed=0, zipf_a=0.0)
    with pytest.raises(ConfigError, match="rows"):
        generate(small_schema(), rows=0, path=tmp_path / "x.parquet", seed=0)
    with pytest.raises(ConfigError, match="data.synthetic is not set"):
        ensure_synthetic(DataConfig(train_path="x"), small_schema())


def _cfg(cache: Path, seed: int = 0) -> DataConfig:
    return DataConfig(cache_dir=str(cache), synthetic=SyntheticConfig(train_rows=3000, eval_rows=1000, seed=seed))


def test_ensure_synthetic_caches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema = small_schema()
    train, eval_ = ensure_synthetic(_cfg(tmp_path), schema)
    assert "generated synthetic data" in capsys.readouterr().out
    assert train.parent.parent == tmp_path / "synthetic"
    assert pq.read_metadata(train).num_rows == 3000 and pq.read_metadata(eval_).num_rows == 1000
    assert not pq.read_table(eval_).slice(0, 1000).equals(pq.read_table(train).slice(0, 1000))
    mtimes = (train.stat().st_mtime_ns, eval_.stat().st_mtime_ns)

    assert ensure_synthetic(_cfg(tmp_path), schema) == (train, eval_)
    assert capsys.readouterr().out == ""
    assert (train.stat().st_mtime_ns, eval_.stat().st_mtime_ns) == mtimes

    other, _ = ensure_synthetic(_cfg(tmp_path, seed=1), schema)
    assert other.parent != train.parent
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == sorted([train.parent.name, other.parent.name])


def test_ensure_synthetic_shares_the_signal(tmp_path: Path) -> None:
    schema = small_schema()
    for path in ensure_synthetic(_cfg(tmp_path, seed=4), schema):
        table = pq.read_table(path)
        assert auc(table.column("click").to_numpy(), oracle_logit(schema, table, signal_seed=4)) > 0.75


def test_loser_of_a_creation_race_uses_the_winner(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema, cfg = small_schema(), _cfg(tmp_path)
    train, _ = ensure_synthetic(cfg, schema)
    capsys.readouterr()
    mtime = train.stat().st_mtime_ns
    assert cfg.synthetic is not None
    # Replay the creation as a second process that finishes after the first one renamed its folder.
    synthetic._populate(train.parent, synthetic._cache_spec(schema, cfg.synthetic), schema, cfg.synthetic)
    assert train.stat().st_mtime_ns == mtime and capsys.readouterr().out == ""
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == [train.parent.name]
