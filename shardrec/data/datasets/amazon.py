"""Amazon behaviour logs -> DIN samples: target item, behaviour history, click label.

Input (``--input``): a CSV file with a header and the columns ``user_id``, ``item_id``, ``time``
(integer) and ``cate_id``, one row per event (e.g. the Torch-RecHub Amazon-Electronics logs).
Every item must have one category throughout the file.

Ids: ``user_id``, ``item_id`` and ``cate_id`` become vocabulary ids, 0..n-1 in sorted order of the
raw values (``vocab/<column>.parquet`` maps them back).

Samples: each user's events are ordered by (time, item_id). For each event i >= 1 (an event
with some history):

* one positive row: ``user_id``, the event's ``item_id`` and ``cate_id``, ``hist_item_ids`` and
  ``hist_cate_ids`` = the items and categories of the events before i (the last 50, oldest
  first), ``time`` of the event, ``label`` 1;
* ``--negatives`` K rows (default 1) with the same user, history and time, a target item drawn
  uniformly (seeded by ``--seed``) from the items the user never interacted with, its category,
  and ``label`` 0.

Tables: ``user``; ``item`` shared by ``item_id`` and ``hist_item_ids``; ``cate`` shared by
``cate_id`` and ``hist_cate_ids``; both histories are ``sequence: true, max_len: 50``.

Split: per user, the samples of the last event are eval, the others train (a user with two events
has eval samples only). Train rows are shuffled (seeded); eval rows stay in user order.
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
    group_last,
    parse_numbers,
    previous_values,
    read_csv,
    require_file,
    vocabulary,
    write_split,
    write_vocab,
)
from shardrec.data.schema import SparseFeature
from shardrec.errors import ConfigError, DataError

EXPECTS = "an Amazon behaviour log CSV with columns user_id, item_id, time, cate_id"
MAX_HISTORY = 50
_IDS = ["user_id", "item_id", "cate_id"]
_MAX_REJECTION_ROUNDS = 64


@dataclass(kw_only=True)
class AmazonOptions(BaseOptions):
    """Options of ``shardrec data prepare amazon``."""

    negatives: int = 1
    """Negative samples per positive one."""
    seed: int = 0
    """Seed of the negative sampling and of the shuffle of the train rows."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.negatives < 0:
            raise ConfigError(f"--negatives must be >= 0, got {self.negatives}")


@dataclass(kw_only=True)
class _Events:
    """Encoded events sorted by (user, time, item), and the category of every item id."""

    user: np.ndarray
    """User id of each event."""
    item: np.ndarray
    """Item id of each event."""
    time: np.ndarray
    """Time of each event."""
    item_cate: np.ndarray
    """Category id of each item id."""
    users: pa.Array
    """Raw user ids (the user vocabulary), for messages."""
    n_cates: int
    """Size of the category vocabulary."""


def prepare_amazon(src: Path, work: Path, options: AmazonOptions) -> Layout:
    """Writes ``work/train.parquet`` and ``work/eval.parquet`` from the log file ``src``."""
    events = _read(require_file(src, what=EXPECTS), work)
    rng = np.random.default_rng(options.seed)
    positives, last = _positives(events)
    negatives = _negatives(events, positives, rng, k=options.negatives, src=src)
    # Each event's rows back to back, positive first, so the per-event split is one repeat.
    table = pa.concat_tables([positives, negatives]).take(_event_order(positives.num_rows, options.negatives))
    write_split(table, np.repeat(last, options.negatives + 1), work, rng=rng)
    sizes = {"user": len(events.users), "item": len(events.item_cate), "cate": events.n_cates}
    return _layout(options, vocab_sizes=sizes)


def _read(src: Path, work: Path) -> _Events:
    raw = read_csv(src, required=["user_id", "item_id", "time", "cate_id"])
    time = parse_numbers(raw["time"].combine_chunks(), path=src, column="time", line0=2, integer=True, nullable=False).to_numpy()
    ids, vocabs = {}, {}
    for c in _IDS:
        col = _ids(raw[c].combine_chunks(), src, c)
        vocabs[c] = vocabulary(col)
        write_vocab(work, c, vocabs[c])
        ids[c] = encode(col, vocabs[c]).to_numpy()
    _check_one_category(ids["item_id"], ids["cate_id"], raw, src)
    item_cate = np.empty(len(vocabs["item_id"]), dtype=np.int64)
    item_cate[ids["item_id"]] = ids["cate_id"]
    order = np.lexsort((ids["item_id"], time, ids["user_id"]))
    return _Events(
        user=ids["user_id"][order],
        item=ids["item_id"][order],
        time=time[order],
        item_cate=item_cate,
        users=vocabs["user_id"],
        n_cates=len(vocabs["cate_id"]),
    )


def _ids(col: pa.Array, src: Path, column: str) -> pa.Array:
    """Integer ids where every value is one (so the vocabulary sorts numerically), else strings."""
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{src}, line {row + 2}, column '{column}': empty value; fill it in or drop the line")
    try:
        return pc.cast(col, pa.int64())
    except pa.ArrowInvalid:
        return col


def _check_one_category(items: np.ndarray, cates: np.ndarray, raw: pa.Table, src: Path) -> None:
    """Raises a DataError naming two lines that give one item two categories."""
    first_row = np.full(items.max() + 1, len(items), dtype=np.int64)
    np.minimum.at(first_row, items, np.arange(len(items)))
    clash = cates != cates[first_row[items]]
    if clash.any():
        row = int(np.flatnonzero(clash)[0])
        other = int(first_row[items[row]])
        raise DataError(
            f"{src}, line {row + 2}: item_id {raw['item_id'][row].as_py()} has cate_id {raw['cate_id'][row].as_py()}, "
            f"but {raw['cate_id'][other].as_py()} on line {other + 2}; every item needs one category: fix its rows"
        )


def _positives(ev: _Events) -> tuple[pa.Table, np.ndarray]:
    """One row per event with a history (all but each user's first), label 1; and which rows are
    their user's last event."""
    hist_items = previous_values(ev.user, ev.item, max_len=MAX_HISTORY)
    hist_cates = previous_values(ev.user, ev.item_cate[ev.item], max_len=MAX_HISTORY)
    keep = pc.greater(pc.list_value_length(hist_items), 0).to_numpy(zero_copy_only=False)
    table = pa.table({
        "label": pa.array(np.ones(len(ev.user), np.int8)),
        "user_id": pa.array(ev.user),
        "item_id": pa.array(ev.item),
        "cate_id": pa.array(ev.item_cate[ev.item]),
        "hist_item_ids": hist_items,
        "hist_cate_ids": hist_cates,
        "time": pa.array(ev.time),
    })
    return table.filter(pa.array(keep)), group_last(ev.user, count=1)[keep]


def _negatives(ev: _Events, positives: pa.Table, rng: np.random.Generator, *, k: int, src: Path) -> pa.Table:
    """``k`` rows per positive row: same user and history, an item the user never touched, label 0."""
    rows = np.repeat(np.arange(positives.num_rows), k)
    items = _sample_unseen(ev, positives["user_id"].to_numpy()[rows], rng, src=src)
    replaced = {"label": pa.array(np.zeros(len(rows), np.int8)), "item_id": pa.array(items), "cate_id": pa.array(ev.item_cate[items])}
    table = positives.take(pa.array(rows, pa.int64()))
    for name, values in replaced.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def _sample_unseen(ev: _Events, users: np.ndarray, rng: np.random.Generator, *, src: Path) -> np.ndarray:
    """For each entry of ``users``, an item drawn uniformly from those that user never interacted with."""
    n_items = len(ev.item_cate)
    seen = np.unique(ev.user * n_items + ev.item)
    out = rng.integers(0, n_items, size=len(users))
    todo = np.flatnonzero(_is_seen(seen, users * n_items + out))
    # Rejection sampling is uniform over the unseen items; a user who saw almost every item
    # could need many rounds, so what is left after a few is drawn exactly below.
    for _ in range(_MAX_REJECTION_ROUNDS):
        if not todo.size:
            return out
        out[todo] = rng.integers(0, n_items, size=todo.size)
        todo = todo[_is_seen(seen, users[todo] * n_items + out[todo])]
    for i in todo:
        unseen = np.setdiff1d(np.arange(n_items), ev.item[ev.user == users[i]])
        if not unseen.size:
            raise DataError(
                f"{src}: user_id {ev.users[int(users[i])]} interacted with every one of the {n_items} items, so no "
                "negative item can be drawn for them; drop that user's rows or pass --negatives 0"
            )
        out[i] = rng.choice(unseen)
    return out


def _is_seen(seen: np.ndarray, keys: np.ndarray) -> np.ndarray:
    pos = np.minimum(np.searchsorted(seen, keys), len(seen) - 1)
    return seen[pos] == keys


def _event_order(n_positives: int, k: int) -> np.ndarray:
    """Indices into [positives, negatives (k per positive, in order)] giving each event's rows together, positive first."""
    per_event = np.empty((n_positives, k + 1), dtype=np.int64)
    per_event[:, 0] = np.arange(n_positives)
    per_event[:, 1:] = n_positives + np.arange(n_positives * k).reshape(n_positives, k)
    return per_event.ravel()


def _layout(options: AmazonOptions, *, vocab_sizes: dict[str, int]) -> Layout:
    return Layout(
        labels=["label"],
        dense=[],
        sparse=[
            SparseFeature(name="user_id", table="user"),
            SparseFeature(name="item_id", table="item"),
            SparseFeature(name="cate_id", table="cate"),
            SparseFeature(name="hist_item_ids", table="item", sequence=True, max_len=MAX_HISTORY),
            SparseFeature(name="hist_cate_ids", table="cate", sequence=True, max_len=MAX_HISTORY),
        ],
        train="train.parquet",
        eval="eval.parquet",
        embedding_dim=options.embedding_dim,
        vocab_sizes=vocab_sizes,
    )
