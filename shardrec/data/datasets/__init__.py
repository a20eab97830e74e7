"""Dataset preparers: public recommendation datasets -> Parquet files plus ``schema.yaml``.

``prepare(name, input=..., output=DIR)`` writes ``DIR/train``, ``DIR/eval`` (Parquet) and
``DIR/schema.yaml``, whose ``features`` and ``data`` sections make a job once a ``model``
section is added::

    report = prepare("movielens", input="ml-100k/", output="data/ml", split="leave_last_out")
    print(report.summary())

    # job.yaml
    include: [data/ml/schema.yaml]
    model: {name: dlrm}

Everything is written into a staging folder next to ``DIR`` and renamed to ``DIR`` at the end, so
a failure leaves no ``DIR``. Each dataset's module docstring describes its input, columns and split.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardrec.config import build
from shardrec.data.datasets import aliccp, amazon, census, criteo, movielens
from shardrec.data.datasets import movielens_funnel
from shardrec.data.datasets.common import Layout, PrepareReport, finish, staging
from shardrec.errors import ConfigError, DataError


@dataclass(frozen=True)
class Preparer:
    """A registered dataset: its options and the function that writes its Parquet files."""

    options: type
    """Dataclass of the dataset's options (``embedding_dim``, ``seed``, ...)."""
    run: Callable[..., Layout]
    """``run(src, work, options) -> Layout``: reads ``src``, writes Parquet files under ``work``."""
    expects: str
    """What ``--input`` must be, for error messages."""


_PREPARERS: dict[str, Preparer] = {
    "criteo": Preparer(options=criteo.CriteoOptions, run=criteo.prepare_criteo, expects=criteo.EXPECTS),
    "movielens": Preparer(options=movielens.MovieLensOptions, run=movielens.prepare_movielens, expects=movielens.EXPECTS),
    "census": Preparer(options=census.CensusOptions, run=census.prepare_census, expects=census.EXPECTS),
    "aliccp": Preparer(options=aliccp.AliCCPOptions, run=aliccp.prepare_aliccp, expects=aliccp.EXPECTS),
    "amazon": Preparer(options=amazon.AmazonOptions, run=amazon.prepare_amazon, expects=amazon.EXPECTS),
    "movielens_funnel": Preparer(
        options=movielens_funnel.MovieLensFunnelOptions, run=movielens_funnel.prepare_movielens_funnel,
        expects=movielens_funnel.EXPECTS,
    ),
}


def names() -> list[str]:
    """Names of every registered dataset, sorted."""
    return sorted(_PREPARERS)


def prepare(name: str, *, input: str | os.PathLike[str], output: str | os.PathLike[str], **options: Any) -> PrepareReport:
    """Converts dataset ``name`` at ``input`` into Parquet files and ``schema.yaml`` in ``output``.

    Args:
        name: a registered dataset (see :func:`names`).
        input: the raw data: a file or folder, as the dataset's module describes.
        output: folder to create; it must not exist, or be empty.
        **options: the dataset's options, e.g. ``embedding_dim=16``, ``seed=0``, ``split="time"``.

    Returns:
        Rows and label balance per split, distinct ids per sparse feature, and the schema written.

    Raises:
        ConfigError: unknown dataset or option, or a bad option value.
        DataError: the input is missing or malformed; the message names the file, column and line.
    """
    preparer = _get(name)
    opts = _options(name, preparer, options)
    src = Path(input)
    if not src.exists():
        raise DataError(f"input '{src}' does not exist; pass --input {preparer.expects}")
    dst = Path(output).absolute()
    with staging(dst) as work:
        layout = preparer.run(src, work, opts)
        return finish(layout, work=work, output=dst, dataset=name)


def _get(name: str) -> Preparer:
    if name not in _PREPARERS:
        raise ConfigError(f"unknown dataset '{name}'; known datasets: {', '.join(names())}")
    return _PREPARERS[name]


def _options(name: str, preparer: Preparer, options: dict[str, Any]) -> Any:
    valid = [f.name for f in dataclasses.fields(preparer.options)]
    for key in options:
        if key not in valid:
            flags = ", ".join(f"--{v.replace('_', '-')}" for v in valid)
            raise ConfigError(f"dataset '{name}' has no option --{key.replace('_', '-')}; its options are: {flags}")
    return build(preparer.options, options, key="")


__all__ = ["PrepareReport", "Preparer", "names", "prepare"]
