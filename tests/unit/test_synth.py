"""The scalable synthetic data generator: table specs, the files it writes, the id law, determinism, atomicity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from shardrec import cli
from shardrec.config import build, load_yaml
from shardrec.data import synthetic_at_scale as synth, synthetic_signal as synthetic
from shardrec.data.reader import ParquetReader, validate_parquet
from shardrec.data.schema import FeatureSchema, TableConfig
from shardrec.data.synthetic_at_scale import IdShape, Layout, SynthConfig, alias_table, load_layout, parse_spec, write_dataset
from shardrec.errors import ConfigError, DataError
from shardrec.job import default_job_text

# 2 single-id tables, a fixed 3-hot table, a variable ~4-hot table with its own exponent, 2 dense columns.
_SPEC = "2x50:8,1x1000:4:3,1x20000:4:~4:0.9"


def _layout(spec: str = _SPEC, *, dense: int = 2) -> Layout:
    return load_layout(tables=spec, config=None, dense=dense, shape=IdShape())


def _write(out: Path, layout: Layout, **cfg: object) -> synth.SynthResult:
    return write_dataset(SynthConfig(output=out, **{"rows": 6000, "files": 3, "row_group_size": 1000, **cfg}), layout)


def _read(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))])


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthResult]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, _write(out, _layout())


# --- specs -------------------------------------------------------------------------------------


def test_compact_spec() -> None:
    tables = parse_spec("26x100000:16,4x1M:64:~20:1.05,2x10k::3,7")
    assert [t.name for t in tables] == [f"C{i + 1}" for i in range(33)]
    assert (tables[0].rows, tables[0].dim, tables[0].hotness, tables[0].zipf_a) == (100_000, 16, None, None)
    assert (tables[26].rows, tables[26].dim, tables[26].hotness, tables[26].zipf_a) == (1_000_000, 64, "~20", 1.05)
    assert (tables[30].rows, tables[30].dim, tables[30].hotness) == (10_000, 16, "3")
    assert (tables[32].rows, tables[32].dim) == (7, 16)
    layout = load_layout(tables="2x10:4,1x10:4:~2.5:0.8", config=None, dense=3, shape=IdShape().override(hotness="2", zipf_a=1.1))
    assert layout.shapes["t_C1"] == IdShape(hotness=2, fixed=True, zipf_a=1.1)
    assert layout.shapes["t_C3"] == IdShape(hotness=2.5, fixed=False, zipf_a=0.8)
    assert layout.schema.dense_names == ["I1", "I2", "I3"] and layout.schema.table("t_C3").embedding_dim == 4


@pytest.mark.parametrize(
    ("spec", "bad", "why"),
    [
        ("26x100000:16:1:1.2:9", "26x100000:16:1:1.2:9", "more than four"),
        ("0x100:16", "0x100:16", "COUNT '0'"),
        ("ax100:16", "ax100:16", "COUNT 'a'"),
        ("4x100:16,26x:16", "26x:16", "ROWS ''"),
        ("26x1T:16", "26x1T:16", "ROWS '1T'"),
        ("26x100:0", "26x100:0", "DIM '0'"),
        ("26x100:16:1.5", "26x100:16:1.5", "hotness must be an integer"),
        ("26x100:16:~0.5", "26x100:16:~0.5", "got 0.5"),
        ("26x100:16:many", "26x100:16:many", "hotness 'many'"),
        ("26x100:16:2:-1", "26x100:16:2:-1", "zipf_a must be > 0"),
        ("26x100:16:2:steep", "26x100:16:2:steep", "ZIPF_A 'steep'"),
    ],
)
def test_bad_spec_names_the_part_and_the_form(spec: str, bad: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_spec(spec)
    assert f"'{bad}'" in str(e.value) and why in str(e.value)
    assert synth.SPEC_FORM in str(e.value) and "26x100000:16" in str(e.value)


def test_table_files(tmp_path: Path) -> None:
    rows = [{"name": "user", "rows": 1000, "dim": 8, "hotness": "~3", "zipf_a": 1.1}, {"name": "item", "rows": 50}]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(rows))
    (tmp_path / "t.csv").write_text("name,rows,dim,hotness,zipf_a\nuser,1000,8,~3,1.1\nitem,50,,,\n")
    (tmp_path / "bare.csv").write_text("user,1000,8,~3,1.1\nitem,50\n")
    layouts = [_layout(str(tmp_path / f), dense=0) for f in ("t.yaml", "t.csv", "bare.csv")]
    for layout in layouts:
        assert layout == layouts[0]
    assert layouts[0].schema.sparse_names == ["user", "item"]
    assert layouts[0].shapes == {"t_user": IdShape(hotness=3, fixed=False, zipf_a=1.1), "t_item": IdShape()}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump([{"name": "x", "rows": 5, "width": 4}]))
    with pytest.raises(ConfigError, match=r"unknown config key 'bad.yaml\[0\].width'.*dim, hotness, name, rows, zipf_a"):
        _layout(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        _layout(str(tmp_path / "missing.csv"))


def test_layout_from_a_job_config(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(default_job_text())
    layout = load_layout(tables=None, config=job, dense=None, shape=IdShape().override(hotness="~2"))
    assert layout.schema == build(FeatureSchema, load_yaml(job)["features"], key="features")
    assert all(s == IdShape(hotness=2, fixed=False) for s in layout.shapes.values())
    with pytest.raises(ConfigError, match="--dense"):
        load_layout(tables=None, config=job, dense=3, shape=IdShape())
    data = yaml.safe_load(default_job_text())
    data["features"]["sparse"][0]["boundaries"] = [1.0, 2.0]
    job.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"features.sparse\[0\] \('C1'\) sets boundaries"):
        load_layout(tables=None, config=job, dense=None, shape=IdShape())


# --- the data set ------------------------------------------------------------------------------


def test_files_rows_and_row_groups(written: tuple[Path, synth.SynthResult]) -> None:
    out, result = written
    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [2000, 2000, 2000]
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [2, 2, 2]
    assert (result.rows, result.files, result.row_groups) == (6000, 3, 6)
    assert "6000 rows in 3 files" in result.summary() and "rows/s" in result.summary()
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]  # no temporary folder left


def test_columns_ids_and_hotness(written: tuple[Path, synth.SynthResult]) -> None:
    out, _ = written
    table = _read(out)
    assert table.column_names == ["label", "I1", "I2", "C1", "C2", "C3", "C4"]
    assert table.schema.field("C1").type == pa.int64() and table.schema.field("C3").type == pa.list_(pa.int64())
    for name, rows in [("C1", 50), ("C2", 50), ("C3", 1000), ("C4", 20000)]:
        ids = pc.list_flatten(table.column(name)) if name in ("C3", "C4") else table.column(name)
        ids = ids.to_numpy()
        assert ids.min() >= 0 and ids.max() < rows and len(np.unique(ids)) > min(rows, 1000) // 4
    fixed = pc.list_value_length(table.column("C3")).to_numpy()
    mean = pc.list_value_length(table.column("C4")).to_numpy()
    assert (fixed == 3).all()
    assert mean.min() >= 1 and abs(mean.mean() - 4) < 0.1 and mean.std() > 1


def test_schema_yaml_is_a_job_include(written: tuple[Path, synth.SynthResult], tmp_path: Path) -> None:
    out, _ = written
    doc = yaml.safe_load((out / "schema.yaml").read_text())
    assert doc["data"] == {"train_path": str(out)}
    schema = build(FeatureSchema, doc["features"], key="features")
    assert schema == _layout().schema
    assert validate_parquet(out, schema) == sorted(out.glob("*.parquet"))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"include": [str(out / "schema.yaml")], "model": {"name": "dlrm"}}))
    assert load_yaml(job)["data"]["train_path"] == str(out)


def test_the_reader_batches_it(written: tuple[Path, synth.SynthResult]) -> None:
    out, _ = written
    batch = next(iter(ParquetReader(out, schema=_layout().schema, batch_size=2000)))
    kjt = batch.sparse_features
    assert (kjt["C3"].lengths() == 3).all() and abs(kjt["C4"].lengths().float().mean().item() - 4) < 0.2
    assert kjt["C3"].values().tolist() == pc.list_flatten(pq.read_table(out / "part-00000.parquet").column("C3")).to_pylist()
    assert batch.dense_features.shape == (2000, 2)


def test_planted_signal_is_synthetics(tmp_path: Path) -> None:
    """Single-id tables of one exponent get exactly synthetic.py's logit: its oracle ranks the labels."""
    layout = _layout("3x200:4,1x5000:4", dense=3)
    tables = {}
    for signal in (True, False):
        _write(tmp_path / str(signal), layout, rows=20_000, files=2, row_group_size=4096, seed=5, label_signal=signal)
        tables[signal] = _read(tmp_path / str(signal))
    labels = {k: t.column("label").to_numpy() for k, t in tables.items()}
    logit = {k: synthetic.oracle_logit(layout.schema, t, signal_seed=5) for k, t in tables.items()}
    assert abs(labels[True].mean() - 0.3) < 0.03 and abs(labels[False].mean() - 0.3) < 0.03
    assert _auc(labels[True], logit[True]) > 0.75
    assert abs(_auc(labels[False], logit[False]) - 0.5) < 0.03


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    pos = labels.astype(bool)
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def test_same_data_for_any_number_of_processes(tmp_path: Path) -> None:
    layout = _layout()
    one = _write(tmp_path / "p1", layout, processes=1)
    two = _write(tmp_path / "p2", layout, processes=2)
    assert (one.processes, two.processes) == (1, 2)
    for a, b in zip(sorted((tmp_path / "p1").glob("*.parquet")), sorted((tmp_path / "p2").glob("*.parquet")), strict=True):
        assert pq.read_table(a).equals(pq.read_table(b))
    other_seed = _write(tmp_path / "s1", layout, seed=1)
    assert other_seed.rows == one.rows and not _read(tmp_path / "s1").equals(_read(tmp_path / "p1"))


# --- the id law --------------------------------------------------------------------------------


@pytest.mark.parametrize("zipf_a", [0.8, 1.2])
def test_power_law_shape(tmp_path: Path, zipf_a: float) -> None:
    layout = _layout(f"1x2000:4:1:{zipf_a}", dense=0)
    _write(tmp_path / "d", layout, rows=200_000, files=1, row_group_size=50_000, label_signal=False)
    counts = np.sort(np.bincount(_read(tmp_path / "d").column("C1").to_numpy()))[::-1]
    # Frequency of rank r ~ r**-a: rank 1 over rank 10 is 10**a, and the log-log slope is -a.
    assert counts[0] / counts[9] == pytest.approx(10**zipf_a, rel=0.15)
    slope = np.polyfit(np.log(np.arange(1, 51)), np.log(counts[:50]), 1)[0]
    assert slope == pytest.approx(-zipf_a, abs=0.08)


def test_ids_follow_synthetics_permutation_and_tail() -> None:
    """The hottest ids are synthetic.py's; a table longer than the alias head gets its tail's share."""
    rng = np.random.default_rng(0)
    for rows in (300, 2_000_000):
        draw = synthetic._table_draw(TableConfig(name="t", num_embeddings=rows, embedding_dim=4), 1.05, rng)
        ours, _ = synth._Sampler.build(draw, IdShape(zipf_a=1.05)).sample(np.random.default_rng(1), 100_000)
        theirs = synthetic._draw_ids(draw, np.random.default_rng(2), 100_000)
        top = [np.argsort(np.bincount(x, minlength=rows))[::-1][:5].tolist() for x in (ours, theirs)]
        assert top[0] == top[1]
        assert ours.min() >= 0 and ours.max() < rows
    head = (np.arange(len(draw.head_cdf), dtype=np.uint64) * np.uint64(draw.perm_mul) + np.uint64(draw.perm_add)) % np.uint64(rows)
    in_tail = ~np.isin(ours, head.astype(np.int64))
    assert in_tail.mean() == pytest.approx(1.0 - draw.head_cdf[-1], abs=0.01) and in_tail.mean() > 0.1


@pytest.mark.parametrize(("size", "uniform"), [(1, False), (2, False), (7, False), (5000, False), (49, True)])
def test_alias_table_is_exact(size: int, uniform: bool) -> None:
    probs = np.full(size, 1 / size) if uniform else np.random.default_rng(size).random(size) ** 4  # 49 * (1/49) < 1
    probs /= probs.sum()
    keep, alias = alias_table(probs)
    got = keep.copy()
    np.add.at(got, alias, 1.0 - keep)
    np.testing.assert_allclose(got / size, probs, rtol=1e-9, atol=1e-15)


# --- config, atomicity and the command ---------------------------------------------------------


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--files \(9\) must not exceed --rows \(5\)"):
        SynthConfig(output=tmp_path, rows=5, files=9)
    with pytest.raises(ConfigError, match="--processes must be > 0"):
        SynthConfig(output=tmp_path, rows=5, processes=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConfigError, match="already exists and is not an empty folder"):
        _write(tmp_path / "full", _layout())
    (tmp_path / "empty").mkdir()
    assert _write(tmp_path / "empty", _layout(), rows=30, files=1).rows == 30


def test_unwritable_output_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match="choose a writable --output"):
        _write(tmp_path / "a_file" / "data", _layout())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunk = synth._Plan.chunk
    calls = []

    def failing(self: synth._Plan, rng: np.random.Generator, n: int) -> pa.Table:
        calls.append(n)
        if len(calls) == 3:
            raise OSError("disk full")
        return chunk(self, rng, n)

    monkeypatch.setattr(synth._Plan, "chunk", failing)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "data", _layout())
    assert list(tmp_path.iterdir()) == []


def test_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    argv = ["data", "synth", "--output", str(out), "--rows", "500", "--tables", "3x100:4:2", "--files", "2", "--dense", "1", "--no-label-signal"]
    assert cli.main(argv) == 0
    assert "wrote" in capsys.readouterr().out and validate_parquet(out, _layout("3x100:4:2", dense=1).schema)
    assert cli.main(["data", "synth", "--output", str(tmp_path / "e"), "--rows", "10", "--tables", "3y100"]) == 2
    assert "bad part '3y100'" in capsys.readouterr().err and not (tmp_path / "e").exists()
