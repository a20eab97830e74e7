"""MovieLens-100k as a two-step funnel -> Parquet impressions labelled ``click`` and ``conversion``.

Input (``--input``): the MovieLens-100k folder that ``movielens`` reads (``ratings.parquet``,
``users.parquet``, ``items.parquet``).

Impressions: every rating, plus ``--negatives`` K (default 1) movies per rating drawn uniformly
(seeded by ``--seed``, with replacement) from the movies of ``items.parquet`` that the user never
rated. A sampled impression has the rating's user, user features, history and ``timestamp``; its
``movie_id`` and ``genres`` are the sampled movie's and its ``rating`` is null. Labels (int8):

* ``click``: 1 for a rated movie (the user watched it), 0 for a sampled one;
* ``conversion``: 1 when the rating is >= 4 (the user liked it), else 0; always 0 for a sampled one,
  so conversion implies click.

Features are the ``movielens`` ones (user side, ``movie_id``, ``genres`` of the impressed movie,
``hist_movie_ids``: movies rated before the rating) with the same tables. Each rating's impressions
are back to back, the rated one first, in the users' (timestamp, movie_id) order of their ratings.

Split, per user in that order: the impressions of the last 20% (rounded down) of each user's
ratings are eval, so a rating and its sampled movies land in the same split and eval is the
``movielens`` ``time`` split's eval with K sampled movies per rating. Train rows are shuffled
(``--seed``); eval rows stay in (user, time) order.
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
    previous_values,
    read_parquet,
    require_file,
    vocabulary,
    write_split,
    write_vocab,
)

# The funnel is MovieLens read the same way, so it reuses the movielens preparer's own steps.
from shardrec.data.datasets.movielens import (
    _CATEGORIES,
    EXPECTS,
    GENRES,
    MAX_HISTORY,
    _eval_mask,
    _genres_of,
    _join_users,
    _ratings,
    _users,
    ranking_features,
)
from shardrec.data.schema import DenseFeature
from shardrec.errors import ConfigError, DataError

LABELS = ["click", "conversion"]


@dataclass(kw_only=True)
class MovieLensFunnelOptions(BaseOptions):
    """Options of ``shardrec data prepare movielens_funnel``."""

    negatives: int = 1
    """Movies the user never rated, sampled per rating as unclicked impressions."""
    seed: int = 0
    """Seed of the sampling and of the shuffle of the train rows."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.negatives < 1:
            raise ConfigError(f"--negatives must be >= 1 (unclicked impressions per rating), got {self.negatives}")


def prepare_movielens_funnel(src: Path, work: Path, options: MovieLensFunnelOptions) -> Layout:
    """Writes ``work/train.parquet`` and ``work/eval.parquet`` from the MovieLens folder ``src``."""
    if not src.is_dir():
        raise DataError(f"input '{src}' is not a folder; pass {EXPECTS}")
    rng = np.random.default_rng(options.seed)
    ratings = _ratings(src / "ratings.parquet")
    users = _users(src / "users.parquet")
    vocabs = {name: vocabulary(users[name]) for name in _CATEGORIES}
    for name, vocab in vocabs.items():
        write_vocab(work, name, vocab)
    rated = _join_users(ratings, users, vocabs, src)
    rated = rated.append_column("hist_movie_ids", previous_values(ratings["user_id"], ratings["movie_id"], max_len=MAX_HISTORY))
    catalog = _catalog(src / "items.parquet")
    sampled = _sample_unrated(ratings["user_id"], ratings["movie_id"], catalog, rng, k=options.negatives, src=src)
    table, n_movies = _impressions(rated, sampled, src / "items.parquet", k=options.negatives)
    write_split(table, np.repeat(_eval_mask(ratings["user_id"], "time"), options.negatives + 1), work, rng=rng)
    sizes = {"user": pc.max(users["user_id"]).as_py() + 1, "movie": n_movies, "genre": len(GENRES)}
    return _layout(options, vocab_sizes=sizes | {name: len(vocab) for name, vocab in vocabs.items()})


def _catalog(path: Path) -> np.ndarray:
    """The distinct movie ids of ``items.parquet``, sorted."""
    items = read_parquet(require_file(path, what=f"items.parquet in {EXPECTS}"), columns=["movie_id"])
    return np.unique(items["movie_id"].to_numpy())


def _sample_unrated(
    users: np.ndarray, movies: np.ndarray, catalog: np.ndarray, rng: np.random.Generator, *, k: int, src: Path
) -> np.ndarray:
    """``[n_ratings, k]``: for each rating (rows sorted by user), k movies its user never rated."""
    out = np.empty((len(users), k), dtype=np.int64)
    _, starts, counts = np.unique(users, return_index=True, return_counts=True)
    for start, count in zip(starts, counts):
        unrated = np.setdiff1d(catalog, movies[start:start + count])
        if not unrated.size:
            raise DataError(
                f"{src / 'ratings.parquet'}: user_id {users[start]} rated every one of the {catalog.size} movies, so no "
                "unclicked impression can be sampled for them; drop that user's ratings"
            )
        out[start:start + count] = rng.choice(unrated, size=(count, k))
    return out


def _impressions(rated: pa.Table, sampled: np.ndarray, items: Path, *, k: int) -> tuple[pa.Table, int]:
    """Each rating's row followed by its k sampled movies' rows, with labels and genres; and the
    movie table's size."""
    n = rated.num_rows
    rows = np.repeat(np.arange(n), k + 1)
    is_rated = np.tile(np.arange(k + 1) == 0, n)
    movie_ids = np.concatenate([rated["movie_id"].to_numpy()[:, None], sampled], axis=1).ravel()
    genres, n_movies = _genres_of(movie_ids, items)
    rating = rated["rating"].to_numpy()[rows]
    table = rated.drop_columns(["label", "movie_id", "rating"]).take(pa.array(rows))
    labels = pa.table({
        "click": pa.array(is_rated.astype(np.int8)),
        "conversion": pa.array((is_rated & (rating >= 4)).astype(np.int8)),
        "movie_id": pa.array(movie_ids),
        "rating": pa.array(rating, mask=~is_rated),
    })
    columns = {**{c: labels[c] for c in labels.column_names}, **{c: table[c] for c in table.column_names}, "genres": genres}
    return pa.table(columns), n_movies


def _layout(options: MovieLensFunnelOptions, *, vocab_sizes: dict[str, int]) -> Layout:
    # The movielens features a ranking model reads (movielens's own layout adds raw timestamps, text
    # and retrieval features that the funnel does not write).
    return Layout(
        labels=list(LABELS),
        dense=[DenseFeature(name="age", fill_missing=0.0, transform="log1p")],
        sparse=ranking_features(max_history=MAX_HISTORY),
        train="train.parquet",
        eval="eval.parquet",
        embedding_dim=options.embedding_dim,
        vocab_sizes=vocab_sizes,
        pooling={"movie": "mean"},
    )
