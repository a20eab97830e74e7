"""Criteo click logs -> Parquet: the 1TB set's day files, the Kaggle ``train.txt`` or the CSV sample.

Input (``--input``): one Criteo text file (TSV without header, ``.gz`` too, or the comma-separated
sample with a header line), or a folder of day files. Every file goes through
:func:`shardrec.data.criteo_convert.convert_criteo`, which documents the columns.

* A folder: each non-hidden file, in natural order (``day_2`` before ``day_10``), becomes
  ``train/<name>.parquet``, except the eval file, which becomes ``eval/<name>.parquet``: the last
  file, or the one ``--eval-file`` names (a file of the folder, or any path).
* One file: the first 90% of its rows are ``train/<name>.parquet``, the last 10%
  ``eval/<name>.parquet``. Criteo lines are in time order, so eval follows train in time, as
  between day files. With ``--eval-file`` the whole file is train and that other file is eval.

Schema: :func:`shardrec.data.schema.criteo_schema`: ``label``, ``I1..I13`` dense (missing -> 0,
log1p), ``C1..C26`` hashed into one table each, of ``--hash-rows`` rows (default: twice the
distinct ids of the column over all files, rounded up to a multiple of 16, at least 16).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from shardrec.data.criteo_convert import OUTPUT_SCHEMA, convert_criteo
from shardrec.data.datasets.common import BaseOptions, Layout
from shardrec.data.schema import criteo_schema
from shardrec.errors import ConfigError, DataError

EXPECTS = "a Criteo text file (day_N, day_N.gz, train.txt, the CSV sample) or a folder of day files"
_COMPRESSED = (".gz", ".bz2", ".zst")


@dataclass(kw_only=True)
class CriteoOptions(BaseOptions):
    """Options of ``shardrec data prepare criteo``."""

    hash_rows: int | None = None
    """Rows of each C table; None: twice the column's distinct ids, rounded up to a multiple of 16."""
    eval_file: str | None = None
    """Eval file: a file of the input folder or any path; None: the last day file (folder) or the
    last 10% of the rows (one file)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hash_rows is not None and self.hash_rows <= 0:
            raise ConfigError(f"--hash-rows must be > 0, got {self.hash_rows}")


def prepare_criteo(src: Path, work: Path, options: CriteoOptions) -> Layout:
    """Converts ``src`` (a file or a folder of day files) into ``work/train`` and ``work/eval``."""
    train, held_out = _plan(src, options.eval_file)
    if held_out is None:
        _convert_and_split(train[0], work)
    else:
        for day in train:
            convert_criteo(day, work / "train" / f"{_stem(day)}.parquet")
        convert_criteo(held_out, work / "eval" / f"{_stem(held_out)}.parquet")
    schema = criteo_schema(dim=options.embedding_dim)
    return Layout(
        labels=schema.labels,
        dense=schema.dense,
        sparse=schema.sparse,
        train="train",
        eval="eval",
        embedding_dim=options.embedding_dim,
        hash_rows=options.hash_rows,
    )


def _plan(src: Path, eval_file: str | None) -> tuple[list[Path], Path | None]:
    """Train files and the eval file; no eval file: split the one train file 90/10."""
    held_out = _eval_path(src, eval_file) if eval_file else None
    if src.is_file():
        return [src], held_out
    days = sorted((p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")), key=_natural_key)
    if not days:
        raise DataError(f"folder '{src}' holds no files; pass {EXPECTS}")
    held_out = held_out or days[-1]
    train = [d for d in days if d.resolve() != held_out.resolve()]
    if not train:
        raise DataError(
            f"folder '{src}' holds only the eval file {held_out.name}; add day files for training, or pass the file "
            "itself as --input to split it 90/10"
        )
    return train, held_out


def _eval_path(src: Path, eval_file: str) -> Path:
    inside = src / eval_file if src.is_dir() else None
    path = inside if inside is not None and inside.is_file() else Path(eval_file)
    if not path.is_file():
        where = f" (looked in '{src}' too)" if inside is not None else ""
        raise DataError(f"--eval-file '{eval_file}' is not a file{where}; name a Criteo day file")
    return path


def _natural_key(path: Path) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _stem(path: Path) -> str:
    name = path.name
    for ext in _COMPRESSED:
        name = name.removesuffix(ext)
    return Path(name).stem if Path(name).suffix in (".txt", ".tsv", ".csv") else name


def _convert_and_split(src: Path, work: Path) -> None:
    """Converts one file, then streams its first 90% of rows to train and the rest to eval."""
    full = work / f".{_stem(src)}.full.parquet"
    convert_criteo(src, full)
    pf = pq.ParquetFile(full)
    rows = pf.metadata.num_rows
    n_eval = rows // 10
    if n_eval == 0:
        raise DataError(f"{src} has {rows} rows, too few to hold out 10% for eval; use a file of 10 rows or more, or pass --eval-file")
    (work / "train").mkdir()
    (work / "eval").mkdir()
    name = f"{_stem(src)}.parquet"
    with pq.ParquetWriter(work / "train" / name, OUTPUT_SCHEMA) as train, pq.ParquetWriter(work / "eval" / name, OUTPUT_SCHEMA) as held_out:
        seen = 0
        for batch in pf.iter_batches(batch_size=pf.metadata.row_group(0).num_rows):
            cut = min(max(rows - n_eval - seen, 0), batch.num_rows)
            if cut:
                train.write_batch(batch.slice(0, cut))
            if cut < batch.num_rows:
                held_out.write_batch(batch.slice(cut))
            seen += batch.num_rows
    pf.close()
    full.unlink()
