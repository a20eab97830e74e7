"""Retrieval building blocks: ranking metrics against a hand-computed example, exact batched top-k,
the losses, the frequency estimator, negative sampling, raw features and the item catalogue."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import SEQ_ITEMS, retrieval_schema, tiny_job_dict, write_catalogue, write_retrieval_data
from shardrec.config import build
from shardrec.data.batch import Batch
from shardrec.data.negatives import NegativeSampler
from shardrec.data.reader import ParquetReader
from shardrec.data.schema import FeatureSchema, SparseFeature
from shardrec.errors import ConfigError, DataError
from shardrec.job import JobConfig
from shardrec.models.retrieval import FrequencyEstimator, bpr, in_batch_softmax, sampled_softmax
from shardrec.train.retrieval_eval import ranking_metrics, topk_items
from shardrec.data.catalogue import catalogue_kjt, read_catalogue


def test_ranking_metrics_match_a_hand_computed_example() -> None:
    # Row 0: target 1 sits at position 1 of [3, 1, 7]. Row 1: targets {9, 2} sit at positions 0 and 2 of [2, 5, 9].
    topk = torch.tensor([[3, 1, 7], [2, 5, 9]])
    targets = torch.tensor([[1, -1], [9, 2]])
    got = {k: float(v) for k, v in ranking_metrics(topk, targets, [1, 3]).items()}
    g = [1 / math.log2(p + 2) for p in range(3)]  # gains of positions 0, 1, 2
    want = {
        "hr@1": 0 + 1, "hr@3": 1 + 1,
        "recall@1": 0 + 1 / 2, "recall@3": 1 + 2 / 2,
        "ndcg@1": 0 + 1, "ndcg@3": g[1] / g[0] + (g[0] + g[2]) / (g[0] + g[1]),
        "mrr": 1 / 2 + 1 / 1,
    }
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value), name


def test_topk_in_chunks_equals_a_full_sort_and_honours_exclusions() -> None:
    gen = torch.Generator().manual_seed(0)
    user, items = torch.randn(5, 4, generator=gen), torch.randn(37, 4, generator=gen)
    exclude = torch.tensor([[0, 0, 3], [5, 30, 11]])  # (row, item) pairs
    scores, idx = topk_items(user, items, 6, chunk=8, exclude=exclude)
    full = user @ items.t()
    full[exclude[0], exclude[1]] = float("-inf")
    want = torch.topk(full, 6, dim=1)
    assert torch.equal(idx, want.indices)
    assert torch.allclose(scores, want.values)


def test_multi_interest_users_score_items_by_their_best_interest() -> None:
    gen = torch.Generator().manual_seed(1)
    interests, items = torch.randn(3, 2, 4, generator=gen), torch.randn(20, 4, generator=gen)
    _, idx = topk_items(interests, items, 5, chunk=7)
    best = torch.einsum("bkd,nd->bkn", interests, items).max(dim=1).values
    assert torch.equal(idx, torch.topk(best, 5, dim=1).indices)


def test_in_batch_softmax_is_cross_entropy_with_log_q_and_repeats_masked() -> None:
    gen = torch.Generator().manual_seed(2)
    user, item = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    ids = torch.tensor([5, 6, 5, 7])  # rows 0 and 2 share an item
    log_q = torch.tensor([-1.0, -2.0, -1.0, -3.0])
    loss = in_batch_softmax(user, item, ids, temperature=0.5, log_q=log_q)
    logits = user @ item.t() / 0.5 - log_q
    total = 0.0
    for i in range(4):
        keep = [j for j in range(4) if j == i or ids[j] != ids[i]]
        total += -(logits[i, i] - torch.logsumexp(logits[i, keep], 0))
    assert float(loss) == pytest.approx(float(total) / 4, rel=1e-5)


def test_sampled_softmax_masks_accidental_hits_and_bpr_skips_them() -> None:
    gen = torch.Generator().manual_seed(3)
    user, item, neg = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen), torch.randn(3, 3, generator=gen)
    ids, neg_ids = torch.tensor([1, 2]), torch.tensor([2, 8, 9])  # row 1's positive was drawn as a negative
    loss = sampled_softmax(user, item, ids, neg, neg_ids, temperature=1.0, log_q=None, negative_log_q=None)
    pos, s = (user * item).sum(1), user @ neg.t()
    want = [-(pos[0] - torch.logsumexp(torch.cat([pos[:1], s[0]]), 0)), -(pos[1] - torch.logsumexp(torch.cat([pos[1:], s[1, 1:]]), 0))]
    assert float(loss) == pytest.approx(float(sum(want)) / 2, rel=1e-5)
    pairs = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)]
    want_bpr = sum(float(torch.nn.functional.softplus(s[r, n] - pos[r])) for r, n in pairs) / len(pairs)
    assert float(bpr(user, item, ids, neg, neg_ids)) == pytest.approx(want_bpr, rel=1e-5)


def test_frequency_estimator_learns_the_gap_between_sightings() -> None:
    est = FrequencyEstimator(10, lr=0.2)
    for step in range(200):
        ids = torch.tensor([3] if step % 2 else [3, 4]) if step % 4 else torch.tensor([3, 4, 5])
        est.log_frequency(ids, update=True)
    got = est.log_frequency(torch.tensor([3, 4, 9]), update=False).exp()
    assert got[0] == pytest.approx(1.0, rel=0.05)  # every step
    assert got[1] == pytest.approx(0.5, rel=0.1)  # every other step
    assert got[2] == pytest.approx(0.1)  # never: the uniform prior over 10 slots


def _batch(tmp: Path, schema: FeatureSchema, rows: int = 32) -> tuple[Batch, Path]:
    path = write_retrieval_data(rows=rows, path=tmp / "d.parquet", seed=0)
    return next(iter(ParquetReader(path, schema=schema, batch_size=rows, prefetch=0))), path


def test_negative_sampler_fills_row_zero_deterministically(tmp_path: Path) -> None:
    schema = retrieval_schema(negatives=8)
    batch, path = _batch(tmp_path, schema)
    assert batch.sparse_features["neg_item_ids"].lengths().sum() == 0  # empty in the data
    sampler = NegativeSampler(schema, train_files=[path], seed=0, rank=0)
    filled = sampler.fill(batch, step=5)
    neg = filled.sparse_features["neg_item_ids"]
    assert neg.lengths()[0] == 8 and neg.lengths()[1:].sum() == 0
    for key in ("user_id", "item_id", "history"):
        assert torch.equal(filled.sparse_features[key].values(), batch.sparse_features[key].values())
    assert torch.equal(sampler.fill(batch, step=5).sparse_features["neg_item_ids"].values(), neg.values())
    assert not torch.equal(sampler.fill(batch, step=6).sparse_features["neg_item_ids"].values(), neg.values())


def test_popularity_negatives_come_from_seen_items(tmp_path: Path) -> None:
    schema = retrieval_schema(negatives=64)
    schema.sparse[-1].negatives.distribution = "popularity"  # type: ignore[union-attr]
    batch, path = _batch(tmp_path, schema, rows=16)
    seen = set(pq.read_table(path)["item_id"].to_pylist())
    sampler = NegativeSampler(schema, train_files=[path], seed=0, rank=1)
    drawn = sampler.fill(batch, step=1).sparse_features["neg_item_ids"].values().tolist()
    assert set(drawn) <= seen and len(seen) < SEQ_ITEMS


def test_raw_and_negatives_features_are_checked() -> None:
    with pytest.raises(ConfigError, match="raw feature has no table"):
        SparseFeature(name="ts", table="t", raw=True)
    with pytest.raises(ConfigError, match="set 'table'"):
        SparseFeature(name="x")
    with pytest.raises(ConfigError, match="negatives.of names 'user_id'"):
        build(FeatureSchema, {"sparse": [{"name": "user_id", "table": "u"}, {"name": "i", "table": "i"},
                                         {"name": "n", "table": "i", "negatives": {"num": 4, "of": "user_id"}}],
                              "tables": [{"name": "u", "num_embeddings": 4, "embedding_dim": 4},
                                         {"name": "i", "num_embeddings": 4, "embedding_dim": 4}]}, key="features")
    schema = retrieval_schema(time=True)
    assert "hist_ts" not in schema.without_raw().sparse_names and "hist_ts" in schema.sparse_names


def test_raw_features_reach_the_batch_unchanged(tmp_path: Path) -> None:
    schema = retrieval_schema(time=True)
    path = write_retrieval_data(rows=8, path=tmp_path / "t.parquet", seed=0, time=True)
    batch = next(iter(ParquetReader(path, schema=schema, batch_size=8, prefetch=0)))
    assert batch.sparse_features["ts"].values().tolist() == pq.read_table(path)["ts"].to_pylist()


def test_catalogue_rows_carry_the_training_keys_with_user_features_empty(tmp_path: Path) -> None:
    schema = retrieval_schema(text=True, negatives=4)
    path = write_catalogue(tmp_path / "items.parquet", text=True)
    ids, table = read_catalogue(path, schema, item_feature="item_id")
    kjt = catalogue_kjt(table.slice(0, 5), schema, where=str(path))
    assert kjt.keys() == schema.unweighted_names
    assert kjt["item_id"].values().tolist() == ids[:5].tolist() == [0, 1, 2, 3, 4]
    assert kjt["item_tokens"].lengths().tolist() == [4] * 5
    for key in ("user_id", "history", "hist_tokens", "neg_item_ids"):
        assert kjt[key].lengths().sum() == 0


def test_catalogue_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    schema = retrieval_schema()
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"movie": [1, 2]}), bad)
    with pytest.raises(DataError, match=r"bad.parquet.*no column 'item_id'"):
        read_catalogue(bad, schema, item_feature="item_id")
    pq.write_table(pa.table({"item_id": [1, 2, 1]}), bad)
    with pytest.raises(DataError, match="item id 1 appears twice"):
        read_catalogue(bad, schema, item_feature="item_id")
    with pytest.raises(DataError, match="does not exist"):
        read_catalogue(tmp_path / "none.parquet", schema, item_feature="item_id")


def test_retrieval_job_needs_a_catalogue_to_evaluate(tmp_path: Path) -> None:
    job = tiny_job_dict(tmp_path, model="dssm")
    del job["data"]["items_path"]
    with pytest.raises(ConfigError, match="data.items_path"):
        build(JobConfig, job, key="")
    job = tiny_job_dict(tmp_path, model="dssm", train={"retrieval": {"exclude_feature": "nope"}})
    with pytest.raises(ConfigError, match="exclude_feature names 'nope'"):
        build(JobConfig, job, key="")


def test_sampled_loss_needs_a_negatives_feature() -> None:
    from shardrec.models import registry

    with pytest.raises(ConfigError, match="negatives"):
        registry.build_model("dssm", {"loss": {"kind": "sampled"}}, schema=retrieval_schema(), device=torch.device("meta"))
