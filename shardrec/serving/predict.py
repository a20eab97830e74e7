"""``shardrec predict``: streams Parquet through an exported model (``shardrec export``) into a
Parquet file of scores.

The rows are read and preprocessed by the training reader (:class:`ParquetReader`, with the
feature schema the artifact's manifest carries), so hashing, bucketizing and truncation match
training; the id column the user names is read alongside, row for row, and written next to one
score column per task (a two-tower artifact: a ``vector`` column of user vectors, from the user
tower; a multiclass task adds a column with its most likely class). Label columns are neither needed
nor read. The output appears under its name only once complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from shardrec.config import build
from shardrec.data.feature_stats import FeatureStats, apply_stats
from shardrec.data.reader import ParquetReader
from shardrec.data.schema import FeatureSchema
from shardrec.data.sources import DataFile, resolve
from shardrec.errors import ConfigError, DataError
from shardrec.serving.config import PredictConfig
from shardrec.serving.export_model import FORMAT, MANIFEST, tower_schema


@dataclass(frozen=True)
class PredictResult:
    """What a prediction run wrote."""

    out: Path
    rows: int
    seconds: float

    def summary(self) -> str:
        return f"wrote {self.out}: {self.rows} rows in {self.seconds:.1f} s ({self.rows / max(self.seconds, 1e-9):,.0f} rows/s)"


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an exported model, with errors that name the folder."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ConfigError(f"'{folder}' is not an exported model (no {MANIFEST}); pass a folder written by shardrec export")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"'{folder}' has artifact format {manifest.get('format')}, this shardrec reads {FORMAT}: export it again")
    return manifest


def predict(cfg: PredictConfig) -> PredictResult:
    """Scores every row of ``cfg.data`` with the model at ``cfg.model`` and writes ``cfg.out``.

    Raises:
        ConfigError: ``cfg.model`` is not an exported model.
        DataError: the data lack a feature or the id column, or hold one of the wrong type.
    """
    manifest = read_manifest(cfg.model)
    schema = build(FeatureSchema, manifest["features"], key="features")
    if "feature_stats" in manifest:
        stats = FeatureStats.from_json(manifest["feature_stats"], where=str(cfg.model / MANIFEST))
        schema = apply_stats(schema, stats, where=f"'{cfg.model / MANIFEST}'")
    two_tower = manifest["kind"] == "two_tower"
    if two_tower:
        schema = tower_schema(schema, manifest["inputs"]["user"]["sparse"])
    reader = ParquetReader(cfg.data, schema=schema, batch_size=cfg.batch_size, prefetch=1, labels=False)
    files, _ = resolve(cfg.data)
    check_id_column(files, cfg.id_column)
    module = load_artifact(cfg.model / manifest["files"]["user_tower" if two_tower else "model"])
    columns = [cfg.id_column, *(["vector"] if two_tower else manifest["outputs"]["scores"])]
    argmax = [] if two_tower else [(t["argmax_column"], [columns.index(c) - 1 for c in t["columns"]], t["classes"])
                                   for t in manifest["outputs"].get("tasks", []) if "argmax_column" in t]
    if cfg.id_column in columns[1:] + [a[0] for a in argmax]:
        raise ConfigError(f"--id-column '{cfg.id_column}' is also the name of a score column; the scores are {columns[1:]}")
    rows = sum(pq.ParquetFile(_open(f)).metadata.num_rows for f in files)
    start = time.perf_counter()
    with _atomic_parquet(cfg.out) as tmp, tqdm(total=rows, unit="rows", disable=not cfg.progress_bar, mininterval=1.0) as bar:
        writer: pq.ParquetWriter | None = None
        ids = id_chunks(files, cfg.id_column)
        for batch in reader:
            with torch.inference_mode():
                scores = module(batch.dense_features, batch.sparse_features.values(), batch.sparse_features.lengths())
            table = _table(columns, ids.send(batch.size), scores, vector=two_tower, argmax=argmax)
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            bar.update(batch.size)
        if writer is not None:
            writer.close()
    return PredictResult(out=cfg.out, rows=rows, seconds=time.perf_counter() - start)


def _table(columns: list[str], ids: pa.Array, outputs: torch.Tensor, *, vector: bool,
           argmax: list[tuple[str, list[int], list[str]]]) -> pa.Table:
    """The output rows: the id, then the score columns, then each multiclass task's most likely class."""
    values = outputs.float().reshape(len(ids), -1).numpy()
    if vector:
        return pa.table([ids, pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])], names=columns)
    best = [pa.array([classes[i] for i in values[:, cols].argmax(axis=1)]) for _, cols, classes in argmax]
    return pa.table([ids, *(pa.array(values[:, j]) for j in range(values.shape[1])), *best],
                    names=columns + [name for name, _, _ in argmax])


def load_artifact(path: Path) -> torch.jit.ScriptModule:
    """The TorchScript module at ``path``; anything else is a ConfigError naming the file.

    ``torch.jit.load`` reads only TorchScript archives (zip files of TorchScript code and tensors);
    it does not unpickle arbitrary Python objects, so a crafted pickle in their place runs nothing.
    """
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # not a zip, not TorchScript, truncated: each a different error type
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"'{path}' is not a TorchScript model written by shardrec export ({reason}); nothing in it "
                          "ran. Export the checkpoint again with shardrec export") from e


def check_id_column(files: list[DataFile], column: str) -> None:
    """Raises a DataError unless every file has ``column`` with one value per row."""
    for f in files:
        schema = pq.ParquetFile(_open(f)).schema_arrow
        if column not in schema.names:
            raise DataError(f"'{f.name}' has no column '{column}' (--id-column); its columns are: {', '.join(schema.names)}")
        t = schema.field(column).type
        if pa.types.is_nested(t):
            raise DataError(f"'{f.name}' column '{column}' (--id-column) has type {t}; an id column needs one value per row")


def id_chunks(files: list[DataFile], column: str) -> Iterator[pa.Array]:
    """A generator that, sent ``n``, returns the next ``n`` values of ``column`` across ``files``."""

    def gen() -> Iterator[pa.Array]:
        pending: list[pa.Array] = []
        have = 0
        want = yield pa.array([])
        for f in files:
            for part in pq.ParquetFile(_open(f)).iter_batches(columns=[column], batch_size=65536):
                pending.append(part.column(0))
                have += len(part)
                while have >= want:
                    joined = pa.concat_arrays(pending)
                    pending, have = [joined.slice(want)], have - want
                    want = yield joined.slice(0, want)
        if have:
            yield pa.concat_arrays(pending)

    chunks = gen()
    next(chunks)
    return chunks


def _open(f: DataFile) -> Any:
    return f.path if f.fs is None else f.fs.open(f.path, "rb")


@contextmanager
def _atomic_parquet(out: Path) -> Iterator[Path]:
    """A hidden temporary path beside ``out``: renamed to ``out`` when the block ends normally,
    removed when it raises, so ``out`` never exists half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
