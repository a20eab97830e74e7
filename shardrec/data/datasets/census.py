"""UCI KDD Census-Income -> Parquet with two labels, as in the MMoE paper (Ma et al. 2018).

Input (``--input``): a raw ``census-income.data``/``.test`` file: comma-separated, no header,
values with a leading space, 42 fields per line (40 attributes, the instance weight and the income
class), optionally preceded by a row id (43 fields: the id is dropped). The field count of the
first line decides.

Columns are named as in the widely used MMoE census demo (the ``census-income.names`` order):
``age, class_worker, det_ind_code, det_occ_code, education, wage_per_hour, hs_college,
marital_stat, major_ind_code, major_occ_code, race, hisp_origin, sex, union_member, unemp_reason,
full_or_part_emp, capital_gains, capital_losses, stock_dividends, tax_filer_stat,
region_prev_res, state_prev_res, det_hh_fam_stat, det_hh_summ, instance_weight, mig_chg_msa,
mig_chg_reg, mig_move_reg, mig_same, mig_prev_sunbelt, num_emp, fam_under_18, country_father,
country_mother, country_self, citizenship, own_or_self, vet_question, vet_benefits,
weeks_worked, year, income``.

Output columns:

* labels (int8): ``income_50k`` = 1 where the income class is ``50000+.``, 0 where it is
  ``- 50000.``; ``never_married`` = 1 where ``marital_stat`` is ``Never married``. Both source
  columns are dropped: a feature must not give a label away.
* 7 continuous columns, dense (float64, empty -> 0): ``age``, ``num_emp``, ``weeks_worked`` as
  they are; ``wage_per_hour``, ``capital_gains``, ``capital_losses``, ``stock_dividends`` with
  log1p (heavy-tailed).
* the other 32 columns, nominal (also those written as numbers, like the industry codes and
  ``year``), as sparse vocabulary ids: 0..n-1 in sorted order of the whitespace-stripped strings
  (``?`` is a value like any other), one table ``t_<column>`` each; ``vocab/<column>.parquet``
  maps ids back.
* ``instance_weight`` (float64) is kept for weighted evaluation but is no feature (the data's
  documentation says classifiers must not use it).

Split: a seeded (``--seed``) random 10% of the rows is eval, the rest train, both in shuffled order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardrec.data.datasets.common import (
    BaseOptions,
    Layout,
    encode,
    first_line,
    parse_numbers,
    read_csv,
    require_file,
    vocabulary,
    write_parquet,
    write_vocab,
)
from shardrec.data.schema import DenseFeature, SparseFeature
from shardrec.errors import DataError

EXPECTS = "a raw UCI KDD Census-Income file (census-income.data, comma-separated, no header)"
COLUMNS = [
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour", "hs_college",
    "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex", "union_member",
    "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses", "stock_dividends", "tax_filer_stat",
    "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ", "instance_weight", "mig_chg_msa",
    "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt", "num_emp", "fam_under_18", "country_father",
    "country_mother", "country_self", "citizenship", "own_or_self", "vet_question", "vet_benefits",
    "weeks_worked", "year", "income",
]
LOG1P = ["wage_per_hour", "capital_gains", "capital_losses", "stock_dividends"]
CONTINUOUS = ["age", *LOG1P, "num_emp", "weeks_worked"]
LABELS = ["income_50k", "never_married"]
_NOT_FEATURES = {"marital_stat", "income", "instance_weight"}
CATEGORICAL = [c for c in COLUMNS if c not in {*CONTINUOUS, *_NOT_FEATURES}]
_INCOME_CLASSES = ["50000+", "- 50000"]
EVAL_FRACTION = 0.1


@dataclass(kw_only=True)
class CensusOptions(BaseOptions):
    """Options of ``shardrec data prepare census``."""

    seed: int = 0
    """Seed of the random 90/10 train/eval split."""


def prepare_census(src: Path, work: Path, options: CensusOptions) -> Layout:
    """Writes ``work/train.parquet`` and ``work/eval.parquet`` from the census file ``src``."""
    raw = _read(require_file(src, what=EXPECTS))
    table = pa.table({
        "income_50k": _income(raw["income"], src),
        "never_married": _never_married(raw["marital_stat"], src),
        **{c: parse_numbers(raw[c], path=src, column=c, line0=1, integer=False, nullable=True) for c in CONTINUOUS},
        **{c: _categorical(raw[c], c, work) for c in CATEGORICAL},
        "instance_weight": parse_numbers(raw["instance_weight"], path=src, column="instance_weight", line0=1, integer=False, nullable=True),
    })
    n_eval = int(table.num_rows * EVAL_FRACTION)
    if n_eval == 0:
        raise DataError(f"{src} has {table.num_rows} rows, too few to hold out 10% for eval; pass a file of 10 rows or more")
    order = np.random.default_rng(options.seed).permutation(table.num_rows)
    write_parquet(table.take(order[n_eval:]), work / "train.parquet")
    write_parquet(table.take(order[:n_eval]), work / "eval.parquet")
    return _layout(options)


def _read(src: Path) -> dict[str, pa.Array]:
    """The file's fields as whitespace-stripped strings by column name (without a leading id)."""
    fields = len(first_line(src))
    if fields not in (len(COLUMNS), len(COLUMNS) + 1):
        raise DataError(
            f"{src}, line 1: {fields} comma-separated fields, expected {len(COLUMNS)} (the KDD census-income "
            f"columns) or {len(COLUMNS) + 1} (a row id first); is this the raw census-income file?"
        )
    names = COLUMNS if fields == len(COLUMNS) else ["id", *COLUMNS]
    table = read_csv(src, names=names)
    return {c: pc.utf8_trim_whitespace(table[c]).combine_chunks() for c in COLUMNS}


def _income(col: pa.Array, src: Path) -> pa.Array:
    """1 for '50000+.', 0 for '- 50000.' (the trailing dot is optional)."""
    text = pc.utf8_rtrim(col, characters=".")
    known = pc.is_in(text, value_set=pa.array(_INCOME_CLASSES))
    if not pc.all(known).as_py():
        row = int(np.flatnonzero(~known.fill_null(False).to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"{src}, line {row + 1}, column 'income' (the last field): '{col[row].as_py()}' is not an income class; "
            "expected '50000+.' or '- 50000.': fix or drop the line"
        )
    return pc.cast(pc.equal(text, "50000+"), pa.int8())


def _never_married(col: pa.Array, src: Path) -> pa.Array:
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{src}, line {row + 1}, column 'marital_stat': empty value; the never_married label needs it: fix or drop the line")
    return pc.cast(pc.equal(col, "Never married"), pa.int8())


def _categorical(col: pa.Array, name: str, work: Path) -> pa.Array:
    vocab = vocabulary(col)
    write_vocab(work, name, vocab)
    return encode(col, vocab)


def _layout(options: CensusOptions) -> Layout:
    return Layout(
        labels=list(LABELS),
        dense=[DenseFeature(name=c, fill_missing=0.0, transform="log1p" if c in LOG1P else "none") for c in CONTINUOUS],
        sparse=[SparseFeature(name=c, table=f"t_{c}") for c in CATEGORICAL],
        train="train.parquet",
        eval="eval.parquet",
        embedding_dim=options.embedding_dim,
    )
