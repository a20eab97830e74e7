"""Criteo text -> Parquet conversion: values, layout detection, errors and atomic output."""

from __future__ import annotations

import csv
import gzip
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardrec.data import criteo_convert as criteo
from shardrec.data.criteo_convert import COLUMNS, convert_criteo
from shardrec.errors import DataError

HEADER = COLUMNS
# Three lines: empty I and C fields, a negative count, counts written as "260.0", hex ids.
ROWS = [
    ["0", "", "-1", "260.0", *[""] * 10, "05db9164", "", "ffffffff", *["0000000a"] * 23],
    ["1", "3", "0", "", *[str(i) for i in range(10)], "68fd1e64", "04e09220", "", *["00000001"] * 23],
    ["1", "", "", "", *[""] * 10, *[""] * 26],
]
EXPECTED = [
    {"label": 0, "I1": None, "I2": -1, "I3": 260, **{f"I{i}": None for i in range(4, 14)},
     "C1": 0x05DB9164, "C2": None, "C3": 0xFFFFFFFF, **{f"C{i}": 10 for i in range(4, 27)}},
    {"label": 1, "I1": 3, "I2": 0, "I3": None, **{f"I{i + 4}": i for i in range(10)},
     "C1": 0x68FD1E64, "C2": 0x04E09220, "C3": None, **{f"C{i}": 1 for i in range(4, 27)}},
    {"label": 1, **{f"I{i}": None for i in range(1, 14)}, **{f"C{i}": None for i in range(1, 27)}},
]


def write_lines(path: Path, rows: list[list[str]], *, sep: str = "\t", header: bool = False) -> Path:
    lines = ([sep.join(HEADER)] if header else []) + [sep.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("sep", ["\t", ","])
@pytest.mark.parametrize("header", [False, True])
def test_converts_exact_values(tmp_path: Path, sep: str, header: bool) -> None:
    src = write_lines(tmp_path / "day_0", ROWS, sep=sep, header=header)
    stats = convert_criteo(src, tmp_path / "out" / "day_0.parquet")
    table = pq.read_table(tmp_path / "out" / "day_0.parquet")
    assert table.schema == criteo.OUTPUT_SCHEMA
    assert table.schema.field("label").type == pa.int8() and table.schema.field("I1").type == pa.int64()
    assert table.to_pylist() == EXPECTED
    assert (stats.rows, stats.positives) == (3, 2)
    assert stats.null_counts["I1"] == 2 and stats.null_counts["I2"] == 1 and stats.null_counts["C4"] == 1
    assert leftovers(tmp_path / "out") == []


def test_gzip_input_and_row_groups(tmp_path: Path) -> None:
    src = tmp_path / "day_0.gz"
    with gzip.open(src, "wt") as f:
        f.write("\n".join("\t".join(r) for r in ROWS * 3) + "\n")
    stats = convert_criteo(src, tmp_path / "o.parquet", row_group_size=4)
    meta = pq.ParquetFile(tmp_path / "o.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 1]
    assert stats.rows == 9 and pq.read_table(tmp_path / "o.parquet").to_pylist() == EXPECTED * 3


def test_hex_ids_that_are_not_8_digits_take_the_slow_path(tmp_path: Path) -> None:
    row = list(ROWS[0])
    row[14], row[16] = "1F", "0A0B0C0D"
    convert_criteo(write_lines(tmp_path / "in", [row]), tmp_path / "o.parquet")
    out = pq.read_table(tmp_path / "o.parquet").to_pylist()[0]
    assert (out["C1"], out["C3"], out["C4"]) == (0x1F, 0x0A0B0C0D, 10)


def test_line_numbers_across_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(criteo, "_BLOCK_SIZE", 1024)  # a few lines per batch
    bad = list(ROWS[1])
    bad[5] = "x7"
    src = write_lines(tmp_path / "in.csv", [ROWS[0]] * 30 + [bad], sep=",", header=True)
    with pytest.raises(DataError, match=r"in\.csv, line 32, column 6 \(I5\): 'x7' is not an integer"):
        convert_criteo(src, tmp_path / "o.parquet", row_group_size=4)
    assert not (tmp_path / "o.parquet").exists() and leftovers(tmp_path) == []


def _with(row_index: int, column: int, value: str) -> list[list[str]]:
    rows = [list(r) for r in ROWS]
    rows[row_index][column] = value
    return rows


ERRORS = {
    "label outside {0,1}": (_with(1, 0, "2"), r"line 2, column 1 \(label\): label is '2', expected 0 or 1"),
    "non-integer label": (_with(1, 0, "yes"), r"line 2, column 1 \(label\): label is 'yes'"),
    "empty label": (_with(2, 0, ""), r"line 3, column 1 \(label\): label is empty"),
    "non-integer I": (_with(2, 13, "1.5"), r"line 3, column 14 \(I13\): '1.5' is not an integer"),
    "non-numeric I": (_with(0, 1, "abc"), r"line 1, column 2 \(I1\): 'abc' is not an integer"),
    "bad hex id": (_with(1, 39, "xyz"), r"line 2, column 40 \(C26\): 'xyz' is not a hex id"),
    "too few fields": (ROWS + [ROWS[0][:39]], r"line 4: expected 40 TAB-separated fields .* got 39"),
    "too many fields": (ROWS + [ROWS[0] + ["1"]], r"line 4: expected 40 TAB-separated fields .* got 41"),
    "short first line": ([ROWS[0][:30]], r"line 1: expected 40 fields .* got 30"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_name_file_line_and_column(tmp_path: Path, case: str) -> None:
    rows, pattern = ERRORS[case]
    src = write_lines(tmp_path / "day_7.tsv", rows)
    out = tmp_path / "out" / "day_7.parquet"
    with pytest.raises(DataError, match=r"day_7\.tsv, " + pattern) as info:
        convert_criteo(src, out)
    assert "fix" in str(info.value) or "is this a Criteo" in str(info.value)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


def test_header_shifts_line_numbers(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "h.csv", _with(1, 0, "2"), sep=",", header=True)
    with pytest.raises(DataError, match=r"h\.csv, line 3, column 1 \(label\)"):
        convert_criteo(src, tmp_path / "o.parquet")


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.txt does not exist.*Criteo text file"):
        convert_criteo(tmp_path / "nope.txt", tmp_path / "o.parquet")
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    convert_criteo(write_lines(tmp_path / "good", ROWS), out)
    with pytest.raises(DataError):
        convert_criteo(write_lines(tmp_path / "bad", _with(2, 0, "3")), out)
    assert pq.read_table(out).to_pylist() == EXPECTED and leftovers(tmp_path) == []


@pytest.mark.skipif(not os.environ.get("SHARDREC_SAMPLE_DATA"), reason="SHARDREC_SAMPLE_DATA is not set")
def test_real_criteo_sample(tmp_path: Path) -> None:
    src = Path(os.environ["SHARDREC_SAMPLE_DATA"]) / "criteo" / "criteo_sample.txt"
    stats = convert_criteo(src, tmp_path / "sample.parquet")
    assert (stats.rows, stats.positives) == (200, 49)
    table = pq.read_table(tmp_path / "sample.parquet").to_pylist()
    with open(src, newline="") as f:
        reference = list(csv.DictReader(f))
    for i in (0, 1, 57, 199):
        want, got = reference[i], table[i]
        assert got["label"] == int(want["label"])
        for name in ("I1", "I2", "I5", "I13"):
            assert got[name] == (int(float(want[name])) if want[name] else None), (i, name)
        for name in ("C1", "C6", "C19", "C26"):
            assert got[name] == (int(want[name], 16) if want[name] else None), (i, name)
    assert stats.null_counts["I1"] == sum(1 for r in reference if not r["I1"])
