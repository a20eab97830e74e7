"""Ali-CCP (Alibaba click and conversion prediction) -> Parquet with two labels, click and purchase.

Input (``--input``): the Torch-RecHub CSV layout, with a header line: ``click``, ``purchase``, 23
sparse id columns (``101``, ``121``, ... ``150_14``) and 8 dense ``D*`` columns. Either a folder
holding ``*train*.csv``, and optionally ``*val*.csv`` and ``*test*.csv`` (e.g.
``ali_ccp_train.csv``), or one CSV file.

* Folder: train = the train file, plus the val file when a test file is there; eval = the test
  file, or else the val file. Each becomes its own Parquet file: ``train/train.parquet``,
  ``train/val.parquet``, ``eval/test.parquet``.
* One file: a seeded (``--seed``) random 10% of its rows is ``eval/<name>.parquet``, the rest
  ``train/<name>.parquet``.

Output columns: ``click``, ``purchase`` (int8, checked to be 0 or 1), the 23 sparse columns as
vocabulary ids (0..n-1 in numeric order of the raw ids, over all files; ``vocab/<column>.parquet``
maps them back; one table ``t_<column>`` each) and the 8 dense columns as float64 (empty -> 0, no
transform: they are already scaled to [0, 1]). Files are read whole into memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from shardrec.data.datasets.common import (
    BaseOptions,
    Layout,
    encode,
    parse_labels,
    parse_numbers,
    read_csv,
    vocabulary,
    write_parquet,
    write_vocab,
)
from shardrec.data.schema import DenseFeature, SparseFeature
from shardrec.errors import DataError

EXPECTS = "an Ali-CCP CSV file, or a folder with *train*.csv and optionally *val*.csv and *test*.csv"
LABELS = ["click", "purchase"]
SPARSE = [
    "101", "121", "122", "124", "125", "126", "127", "128", "129", "205", "206", "207", "210", "216", "508",
    "509", "702", "853", "301", "109_14", "110_14", "127_14", "150_14",
]
DENSE = ["D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"]
ROLES = ["train", "val", "test"]
EVAL_FRACTION = 0.1


@dataclass(kw_only=True)
class AliCCPOptions(BaseOptions):
    """Options of ``shardrec data prepare aliccp``."""

    seed: int = 0
    """Seed of the random 90/10 split of a single input file (unused for a folder of split files)."""


def prepare_aliccp(src: Path, work: Path, options: AliCCPOptions) -> Layout:
    """Writes ``work/train/*.parquet`` and ``work/eval/*.parquet`` from ``src``."""
    files = _find(src)
    raw = {role: _read(path) for role, path in files.items()}
    vocabs = {c: vocabulary(*(t[c] for t in raw.values())) for c in SPARSE}
    for name, vocab in vocabs.items():
        write_vocab(work, name, vocab)
    tables = {role: _encode(t, vocabs) for role, t in raw.items()}
    if len(tables) == 1:
        _split(tables["train"], work, name=files["train"].name.split(".")[0], seed=options.seed)
    else:
        held_out = "test" if "test" in tables else "val"
        for role, table in tables.items():
            write_parquet(table, work / ("eval" if role == held_out else "train") / f"{role}.parquet")
    return _layout(options)


def _find(src: Path) -> dict[str, Path]:
    """The input files by role; a single file is the train file."""
    if src.is_file():
        return {"train": src}
    found = {}
    csvs = sorted(p for p in src.iterdir() if p.name.endswith((".csv", ".csv.gz")) and not p.name.startswith("."))
    for role in ROLES:
        matches = [p for p in csvs if role in p.name]
        if len(matches) > 1:
            raise DataError(f"folder '{src}' holds several {role} files ({', '.join(p.name for p in matches)}); keep one")
        if matches:
            found[role] = matches[0]
    if "train" not in found:
        raise DataError(f"folder '{src}' holds no *train*.csv file; pass {EXPECTS}")
    return found


def _read(path: Path) -> pa.Table:
    """Labels as int8, sparse ids as int64, dense columns as float64, with errors naming the line."""
    table = read_csv(path, required=LABELS + SPARSE + DENSE)
    return pa.table({
        **{c: parse_labels(table[c].combine_chunks(), path=path, column=c, line0=2) for c in LABELS},
        **{c: parse_numbers(table[c].combine_chunks(), path=path, column=c, line0=2, integer=True, nullable=True) for c in SPARSE},
        **{c: parse_numbers(table[c].combine_chunks(), path=path, column=c, line0=2, integer=False, nullable=True) for c in DENSE},
    })


def _encode(table: pa.Table, vocabs: dict[str, pa.Array]) -> pa.Table:
    for c, vocab in vocabs.items():
        table = table.set_column(table.schema.get_field_index(c), c, encode(table[c], vocab))
    return table


def _split(table: pa.Table, work: Path, *, name: str, seed: int) -> None:
    n_eval = int(table.num_rows * EVAL_FRACTION)
    if n_eval == 0:
        raise DataError(f"the input has {table.num_rows} rows, too few to hold out 10% for eval; pass 10 rows or more, or a folder with a test file")
    order = np.random.default_rng(seed).permutation(table.num_rows)
    write_parquet(table.take(order[n_eval:]), work / "train" / f"{name}.parquet")
    write_parquet(table.take(order[:n_eval]), work / "eval" / f"{name}.parquet")


def _layout(options: AliCCPOptions) -> Layout:
    return Layout(
        labels=list(LABELS),
        dense=[DenseFeature(name=c, fill_missing=0.0) for c in DENSE],
        sparse=[SparseFeature(name=c, table=f"t_{c}") for c in SPARSE],
        train="train",
        eval="eval",
        embedding_dim=options.embedding_dim,
    )
