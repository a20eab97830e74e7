"""MovieLens-100k -> Parquet rows of (user, movie, side features, watch history, label).

Input (``--input``): a folder holding ``ratings.parquet`` (user_id, movie_id, rating, timestamp),
``users.parquet`` (user_id, age, gender, occupation, zip_code) and ``items.parquet`` (movie_id and
the 19 one-hot genre columns ``unknown``, ``Action``, ... ``Western``).

One output row per rating, with columns:

* ``label`` (int8): 1 when ``rating >= 4``; ``rating`` and ``timestamp`` are kept as they are.
* ``user_id``, ``movie_id``: the raw ids, already dense (1..943, 1..1682), so kept; tables
  ``user`` and ``movie`` have max id + 1 rows.
* ``age``: years, read twice: as a dense feature (``transform: log1p``) and, through ``age_bucket``
  (``source: age``, boundaries 18, 25, 35, 45, 50, 56), as one of 7 bucket ids.
* ``gender``, ``occupation``, ``zip3`` (first 3 characters of the zip code): vocabulary ids,
  0..n-1 in sorted order of the raw strings (``vocab/<column>.parquet`` maps them back).
* ``genres``: list of genre ids, 0..18 in the column order above (multi-hot, table ``genre``).
* ``hist_movie_ids``: the user's movies rated before this one, oldest first, at most the last 50
  (``sequence: true, max_len: 50``); it shares table ``movie`` (``pooling: mean``, so a model that
  pools the history gets its average) with ``movie_id``. "Before" is in
  the user's order by (timestamp, movie_id): ratings of one second are ordered by movie id.

* ``hist_timestamps``, ``timestamp``: the history's and the rating's unix times, as raw features
  (no table: HSTU turns them into time-gap biases; other models do not see them).
* with ``--title-tokens T``: ``title_tokens``, the movie's title words, release year and genre
  names as T token ids (0 pads; table ``token``, vocabulary ``vocab/token.parquet``), and
  ``hist_title_tokens``, the history movies' tokens one after another (for HLLM).
* with ``--sampled-negatives N``: a feature ``neg_movie_ids`` with no column whose N ids per batch
  are drawn during training (uniform over the movie table), for sampled-softmax retrieval.

``items.parquet`` is the item catalogue that retrieval models rank every eval row against
(``data.items_path``): one row per movie with ``movie_id``, ``genres``, the text columns ``title`` and
``genre_names`` (what HLLM's language model reads), and ``title_tokens`` with ``--title-tokens``.

Splits (``--split``), per user, in that same order:

* ``time`` (default): the last 20% (rounded down) of each user's ratings are eval, the rest train.
* ``leave_last_out``: each user's last rating is eval, the rest train (for sequence models).

Rows (``--rows``): ``rating`` (default) writes a row per rating; ``user`` (with leave_last_out)
one train and one eval row per user, the sequential recommenders' layout: the train row predicts
the user's second-to-last movie from all before it (a model trained on every position learns each
next movie of the history from it), the eval row the last movie from all before it.

Histories are built over all of a user's ratings, so an eval row's history may hold earlier eval
ratings: each row sees exactly what came before it. Train rows are shuffled (``--seed``), as the
reader reads in file order; eval rows stay in (user, time) order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardrec.data.datasets.common import (
    BaseOptions,
    Layout,
    encode,
    group_last,
    previous_values,
    read_parquet,
    require_file,
    vocabulary,
    write_parquet,
    write_split,
    write_vocab,
)
from shardrec.data.schema import DenseFeature, NegativeSampling, SparseFeature
from shardrec.errors import ConfigError, DataError

ITEMS_FILE = "items.parquet"
EXPECTS = "a MovieLens-100k folder with ratings.parquet, users.parquet and items.parquet"
GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
AGE_BOUNDARIES = [18.0, 25.0, 35.0, 45.0, 50.0, 56.0]
MAX_HISTORY = 50
TEST_FRACTION = 0.2
_CATEGORIES = ["gender", "occupation", "zip3"]


@dataclass(kw_only=True)
class MovieLensOptions(BaseOptions):
    """Options of ``shardrec data prepare movielens``."""

    split: Literal["time", "leave_last_out"] = "time"
    """``time``: each user's last 20% of ratings are eval; ``leave_last_out``: each user's last one."""
    rows: Literal["rating", "user"] = "rating"
    """``rating``: a row per rating; ``user``: a train and an eval row per user (leave_last_out only)."""
    max_history: int = MAX_HISTORY
    """Movies kept in each history (the most recent)."""
    title_tokens: int = 0
    """Tokens per movie title (0: no text features)."""
    sampled_negatives: int = 0
    """Ids drawn per training batch for a sampled softmax (0: no negatives feature)."""
    seed: int = 0
    """Seed of the shuffle of the train rows."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rows not in ("rating", "user"):
            raise ConfigError(f"--rows must be 'rating' or 'user', got '{self.rows}'")
        if self.rows == "user" and self.split != "leave_last_out":
            raise ConfigError("--rows user needs --split leave_last_out (one train and one eval row per user)")
        if self.max_history <= 0 or self.title_tokens < 0 or self.sampled_negatives < 0:
            raise ConfigError("--max-history must be > 0, --title-tokens and --sampled-negatives >= 0")


def prepare_movielens(src: Path, work: Path, options: MovieLensOptions) -> Layout:
    """Writes ``work/train.parquet`` and ``work/eval.parquet`` from the MovieLens folder ``src``."""
    if not src.is_dir():
        raise DataError(f"input '{src}' is not a folder; pass {EXPECTS}")
    ratings = _ratings(src / "ratings.parquet")
    users = _users(src / "users.parquet")
    vocabs = {name: vocabulary(users[name]) for name in _CATEGORIES}
    for name, vocab in vocabs.items():
        write_vocab(work, name, vocab)
    genres, n_movies = _genres_of(ratings["movie_id"], src / "items.parquet")
    table = _join_users(ratings, users, vocabs, src).append_column("genres", genres)
    history = {"hist_movie_ids": "movie_id", "hist_timestamps": "timestamp"}
    for name, column in history.items():
        table = table.append_column(name, previous_values(ratings["user_id"], ratings[column], max_len=options.max_history))
    catalogue = _catalogue(src / "items.parquet")
    sizes = {"user": pc.max(users["user_id"]).as_py() + 1, "movie": n_movies, "genre": len(GENRES)}
    if options.title_tokens:
        catalogue, table, sizes["token"] = _add_title_tokens(src / "items.parquet", catalogue, table, options.title_tokens, work)
    write_parquet(catalogue, work / ITEMS_FILE)
    is_eval = _eval_mask(ratings["user_id"], options.split)
    if options.rows == "user":
        keep = group_last(ratings["user_id"], count=2)
        table, is_eval = table.filter(pa.array(keep)), is_eval[keep]
    write_split(table, is_eval, work, rng=np.random.default_rng(options.seed))
    return _layout(options, vocab_sizes=sizes | {name: len(vocab) for name, vocab in vocabs.items()})


def _catalogue(path: Path) -> pa.Table:
    """One row per movie: movie_id, its genre ids, and its text for a language model (``title``,
    e.g. "Toy Story (1995)", and ``genre_names``, e.g. "Animation, Children's, Comedy")."""
    items = read_parquet(path, columns=["movie_id", "movie_title", *GENRES])
    ids = _int_column(items, "movie_id", path)
    genres, _ = _genres_of(ids, path)
    names = [", ".join(g for g in GENRES if row[g]) for row in items.select(GENRES).to_pylist()]
    titles = pc.fill_null(items["movie_title"].cast(pa.string()), "")
    return pa.table({"movie_id": pa.array(ids), "genres": genres, "title": titles, "genre_names": pa.array(names, pa.string())})


def _add_title_tokens(src: Path, catalogue: pa.Table, table: pa.Table, length: int, work: Path) -> tuple[pa.Table, pa.Table, int]:
    """Adds ``title_tokens`` to the catalogue and ``title_tokens``/``hist_title_tokens`` to the rows;
    returns both and the token table's rows (vocabulary size, padding included)."""
    items = read_parquet(src, columns=["movie_id", "movie_title", *GENRES])
    words = [_title_words(t, [g for g in GENRES if row[g]]) for t, row in zip(items["movie_title"].to_pylist(), items.select(GENRES).to_pylist())]
    vocab = ["<pad>", *sorted({w for ws in words for w in ws})]
    index = {w: i for i, w in enumerate(vocab)}
    tokens = np.zeros((len(words), length), dtype=np.int64)
    for i, ws in enumerate(words):
        ids = [index[w] for w in ws[:length]]
        tokens[i, : len(ids)] = ids
    write_vocab(work, "token", pa.array(vocab))
    ids = _int_column(items, "movie_id", src)
    rows_of = np.full(int(ids.max()) + 1, -1)
    rows_of[ids] = np.arange(len(ids))
    catalogue = catalogue.append_column("title_tokens", _fixed_lists(tokens[rows_of[catalogue["movie_id"].to_numpy()]].reshape(-1), length))
    hist = table["hist_movie_ids"].combine_chunks()
    hist_tokens = tokens[rows_of[pc.list_flatten(hist).to_numpy()]].reshape(-1)
    offsets = np.asarray(hist.offsets) * length
    table = table.append_column("title_tokens", _fixed_lists(tokens[rows_of[table["movie_id"].to_numpy()]].reshape(-1), length))
    table = table.append_column("hist_title_tokens", pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(hist_tokens)))
    return catalogue, table, len(vocab)


def _title_words(title: str | None, genres: list[str]) -> list[str]:
    """Lower-case words of a title (the year in parentheses becomes a word) and its genre names."""
    return re.findall(r"[a-z0-9']+", (title or "").lower()) + [f"genre:{g.lower()}" for g in genres]


def _fixed_lists(values: np.ndarray, length: int) -> pa.ListArray:
    """Consecutive runs of ``length`` values as a list column."""
    offsets = np.arange(0, len(values) + 1, length, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _ratings(path: Path) -> dict[str, np.ndarray]:
    """The ratings as numpy columns, sorted by (user, timestamp, movie)."""
    table = read_parquet(require_file(path, what=f"ratings.parquet in {EXPECTS}"), columns=["user_id", "movie_id", "rating", "timestamp"])
    cols = {name: _int_column(table, name, path) for name in table.column_names}
    order = np.lexsort((cols["movie_id"], cols["timestamp"], cols["user_id"]))
    return {name: values[order] for name, values in cols.items()}


def _int_column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    col = table.column(name)
    if not pa.types.is_integer(col.type):
        raise DataError(f"{path}, column '{name}': type {col.type}, expected integers; rewrite the column as int64")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}, row {row}, column '{name}': empty value; fill it in or drop the row")
    return col.to_numpy().astype(np.int64)


def _users(path: Path) -> pa.Table:
    table = read_parquet(require_file(path, what=f"users.parquet in {EXPECTS}"), columns=["user_id", "age", "gender", "occupation", "zip_code"])
    _int_column(table, "user_id", path)
    _int_column(table, "age", path)
    zip3 = pc.utf8_slice_codeunits(pc.cast(table["zip_code"], pa.string()), 0, 3)
    return table.drop_columns(["zip_code"]).append_column("zip3", zip3)


def _join_users(ratings: dict[str, np.ndarray], users: pa.Table, vocabs: dict[str, pa.Array], src: Path) -> pa.Table:
    """The rating columns plus each rating's user columns (categories as vocabulary ids)."""
    rows = _lookup(ratings["user_id"], users["user_id"].to_numpy(), src / "ratings.parquet", "user_id", src / "users.parquet")
    table = pa.table({
        "label": pa.array(ratings["rating"] >= 4).cast(pa.int8()),
        **{name: pa.array(ratings[name]) for name in ("user_id", "movie_id", "rating", "timestamp")},
        "age": users["age"].take(rows),
    })
    for name, vocab in vocabs.items():
        table = table.append_column(name, encode(users[name].take(rows), vocab))
    return table


def _lookup(keys: np.ndarray, known: np.ndarray, path: Path, column: str, other: Path) -> np.ndarray:
    """Row of each key in ``known`` (unique ids of file ``other``); every key must be there."""
    order = np.argsort(known, kind="stable")
    known_sorted = known[order]
    if np.any(known_sorted[1:] == known_sorted[:-1]):
        dup = known_sorted[1:][known_sorted[1:] == known_sorted[:-1]][0]
        raise DataError(f"{other}, column '{column}': id {dup} appears twice; each id must have one row")
    pos = np.minimum(np.searchsorted(known_sorted, keys), len(known) - 1)
    missing = known_sorted[pos] != keys
    if missing.any():
        raise DataError(f"{path}: {column} {keys[missing][0]} is not in {other}; add its row there or drop its ratings")
    return order[pos]


def _genres_of(movie_ids: np.ndarray, path: Path) -> tuple[pa.Array, int]:
    """Each rating's movie's genre ids, from the 19 one-hot columns of ``items.parquet``; and the
    largest movie id there plus one."""
    items = read_parquet(require_file(path, what=f"items.parquet in {EXPECTS}"), columns=["movie_id", *GENRES])
    onehot = np.stack([_int_column(items, g, path) for g in GENRES], axis=1) != 0
    per_movie = pa.ListArray.from_arrays(
        pa.array(np.concatenate(([0], np.cumsum(onehot.sum(axis=1)))), pa.int32()),
        pa.array(np.nonzero(onehot)[1], pa.int64()),
    )
    known = _int_column(items, "movie_id", path)
    rows = _lookup(movie_ids, known, path.with_name("ratings.parquet"), "movie_id", path)
    return per_movie.take(pa.array(rows)), int(known.max()) + 1


def _eval_mask(users: np.ndarray, split: Literal["time", "leave_last_out"]) -> np.ndarray:
    """Which rows (sorted by user, then time) are eval."""
    if split == "leave_last_out":
        return group_last(users, count=1)
    _, counts = np.unique(users, return_counts=True)
    per_row = np.repeat((counts * TEST_FRACTION).astype(np.int64), counts)
    return group_last(users, count=per_row)


def _layout(options: MovieLensOptions, *, vocab_sizes: dict[str, int]) -> Layout:
    return Layout(
        labels=["label"],
        # Raw years and a sum of 50 history vectors swamp the linear, FM and cross terms of
        # DCN/DeepFM/xDeepFM/Wide&Deep (docs/models.md, "Findings"): log1p and mean pooling.
        dense=[DenseFeature(name="age", fill_missing=0.0, transform="log1p")],
        sparse=[
            *ranking_features(max_history=options.max_history),
            SparseFeature(name="hist_timestamps", raw=True, sequence=True, max_len=options.max_history),
            SparseFeature(name="timestamp", raw=True),
            *_text_features(options),
            *([SparseFeature(name="neg_movie_ids", table="movie",
                             negatives=NegativeSampling(num=options.sampled_negatives, of="movie_id"))]
              if options.sampled_negatives else []),
        ],
        train="train.parquet",
        eval="eval.parquet",
        items=ITEMS_FILE,
        embedding_dim=options.embedding_dim,
        vocab_sizes=vocab_sizes,
        pooling={"movie": "mean"},
    )


def ranking_features(*, max_history: int) -> list[SparseFeature]:
    """The id features of a rating row: user profile, movie, its genres and the watch history."""
    return [
        SparseFeature(name="user_id", table="user"),
        SparseFeature(name="movie_id", table="movie"),
        SparseFeature(name="age_bucket", table="age_bucket", source="age", boundaries=list(AGE_BOUNDARIES)),
        *(SparseFeature(name=name, table=name) for name in _CATEGORIES),
        SparseFeature(name="genres", table="genre"),
        SparseFeature(name="hist_movie_ids", table="movie", sequence=True, max_len=max_history),
    ]


def _text_features(options: MovieLensOptions) -> list[SparseFeature]:
    t = options.title_tokens
    if not t:
        return []
    return [SparseFeature(name="title_tokens", table="token", sequence=True, max_len=t),
            SparseFeature(name="hist_title_tokens", table="token", sequence=True, max_len=options.max_history * t)]
