"""GRU4Rec, SASRec and HSTU: next-item pairs, shapes, causality, padding invariance, HSTU's time
bias, traceable lookups and a falling loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torchrec.fx.tracer import Tracer
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import RETRIEVAL_DATA, SEQ_ITEMS, SEQ_MAX_LEN, retrieval_schema
from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models import registry
from shardrec.models.hstu import time_buckets
from shardrec.models.retrieval import RetrievalOutput
from shardrec.models.seqrec import last_position, next_in_sequence

CPU = torch.device("cpu")
MODELS = ["gru4rec", "sasrec", "hstu"]
DIM = 8


def _schema(name: str) -> FeatureSchema:
    return retrieval_schema(dim=DIM, **RETRIEVAL_DATA[name])


def _build(name: str, device: torch.device = CPU, **params: Any) -> torch.nn.Module:
    if name == "hstu":
        params = {"history_timestamps_feature": "hist_ts", "timestamp_feature": "ts", **params}
    torch.manual_seed(0)
    return registry.build_model(name, {"dropout": 0.0, **params}, schema=_schema(name), device=device)


def _kjt(schema: FeatureSchema, rows: list[dict[str, list[int]]]) -> KeyedJaggedTensor:
    """A KJT over every key of ``schema``; a key missing from a row is empty there."""
    values: list[int] = []
    lengths: list[int] = []
    for key in schema.sparse_names:
        for row in rows:
            values += row.get(key, [])
            lengths.append(len(row.get(key, [])))
    return KeyedJaggedTensor.from_lengths_sync(keys=schema.sparse_names, values=torch.tensor(values, dtype=torch.long),
                                               lengths=torch.tensor(lengths))


def _row(history: list[int], target: int, *, times: list[int] | None = None, time: int = 0) -> dict[str, list[int]]:
    times = times if times is not None else [10 * (i + 1) for i in range(len(history))]
    return {"user_id": [1], "item_id": [target], "history": history, "hist_ts": times, "ts": [time or 10 * (len(history) + 1)]}


def _batch(name: str, rows: list[dict[str, list[int]]], negatives: list[int] | None = None) -> KeyedJaggedTensor:
    schema = _schema(name)
    rows = [dict(r) for r in rows]
    rows[0]["neg_item_ids"] = negatives if negatives is not None else list(range(40, 56))
    return _kjt(schema, rows)


def _dense(rows: int) -> torch.Tensor:
    return torch.zeros(rows, 1)


@pytest.fixture(params=MODELS)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_next_in_sequence_hand_example() -> None:
    ids = torch.tensor([[1, 2, 3], [5, 0, 0], [0, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    out = next_in_sequence(ids, torch.tensor([7, 8, 9]), mask)
    assert out[mask].tolist() == [2, 3, 7, 8]
    emb = torch.arange(18.0).view(3, 3, 2)
    assert next_in_sequence(emb, torch.full((3, 2), -1.0), mask)[0].tolist() == [[2.0, 3.0], [4.0, 5.0], [-1.0, -1.0]]
    assert last_position(emb, mask).tolist() == [[4.0, 5.0], [6.0, 7.0], [12.0, 13.0]]


def test_training_pairs_and_shapes(name: str) -> None:
    model = _build(name)
    kjt = _batch(name, [_row([1, 2], 7), _row([5], 3), _row([], 8), _row([9, 10, 11], 12)])
    out = model(_dense(4), kjt)
    assert isinstance(out, RetrievalOutput)
    # One pair per history item; the row with an empty history adds none.
    assert out.item_ids.tolist() == [2, 7, 3, 10, 11, 12]
    assert out.user.shape == out.item.shape == (6, DIM) and out.scores.shape == (6,)
    assert out.negatives.shape == (16, DIM) and out.negative_ids.tolist() == list(range(40, 56))
    table = model.ec.embeddings["item"].weight
    expected = table[out.item_ids]
    expected = torch.nn.functional.normalize(expected, dim=-1) if model.normalize else expected
    torch.testing.assert_close(out.item, expected)
    model.eval()
    user = model.user_vectors(_dense(4), kjt)
    assert user.shape == (4, DIM)
    torch.testing.assert_close(model(_dense(4), kjt), user)
    # The user vector of a row is its training output at the last history position.
    torch.testing.assert_close(user[[0, 1, 3]], out.user[[1, 2, 5]])


def test_item_vectors_on_catalogue_rows(name: str) -> None:
    model = _build(name)
    catalogue = _kjt(_schema(name), [{"item_id": [i]} for i in (3, 17, 59)])
    vectors = model.item_vectors(catalogue)
    expected = model.ec.embeddings["item"].weight[[3, 17, 59]]
    if model.normalize:
        expected = torch.nn.functional.normalize(expected, dim=-1)
    torch.testing.assert_close(vectors, expected)


def test_builds_on_meta_and_every_parameter_learns(name: str) -> None:
    meta = _build(name, device=torch.device("meta"))
    assert all(p.is_meta for p in meta.parameters())
    model = _build(name)
    kjt = _batch(name, [_row([1, 2, 3], 7), _row([5, 6], 3), _row([9], 12)])
    loss = model.loss(model(_dense(3), kjt), torch.ones(3))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


def test_collection_takes_sparse_features_directly(name: str) -> None:
    model = _build(name, device=torch.device("meta"))
    graph = Tracer(leaf_modules=["EmbeddingBagCollection", "EmbeddingCollection"]).trace(model)
    collections = {n for n, m in model.named_modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))}
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target in collections]
    assert len(calls) == 1 and calls[0].target in collections
    (arg,) = calls[0].args
    assert arg.op == "placeholder" and arg.target == "sparse_features"


def test_later_items_do_not_change_earlier_positions(name: str) -> None:
    model = _build(name)
    first = model(_dense(1), _batch(name, [_row([1, 2, 3, 4], 7)])).user
    second = model(_dense(1), _batch(name, [_row([1, 2, 30, 4], 7)])).user
    torch.testing.assert_close(first[:2], second[:2])
    assert not torch.allclose(first[2], second[2])


def test_last_position_ignores_padding(name: str) -> None:
    model = _build(name).eval()
    kjt = _batch(name, [_row([1, 2], 7), _row([3, 4, 5, 6, 8, 9], 11)])
    alone = model.user_vectors(_dense(1), _batch(name, [_row([1, 2], 7)]))
    torch.testing.assert_close(model.user_vectors(_dense(2), kjt)[:1], alone)
    # Junk in the padded slots of the embeddings does not reach the last valid position either.
    emb = model.ec(kjt)["history"].to_padded_dense(desired_length=SEQ_MAX_LEN)
    mask = torch.arange(SEQ_MAX_LEN).unsqueeze(0) < torch.tensor([[2], [6]])
    junk = emb + 5.0 * torch.randn_like(emb) * (~mask).unsqueeze(-1)
    torch.testing.assert_close(last_position(model.encode(junk, mask, kjt), mask),
                               last_position(model.encode(emb, mask, kjt), mask))


def test_time_buckets_hand_example() -> None:
    query = torch.tensor([[1_000, 1_000, 1_000, 1_000, 10**12, 0]])
    keys = torch.tensor([[1_000, 998, 990, 0, 0, 1_000]])
    got = time_buckets(query, keys, num_buckets=50)[0].diagonal()
    # gaps 0 (-> 1), 2, 10, 1000, 1e12 (clamped to 50), -1000: floor(log(gap) / 0.301)
    assert got.tolist() == [0, 2, 7, 22, 50, 22]
    assert time_buckets(query, keys, num_buckets=50).shape == (1, 6, 6)


def test_hstu_time_bias_changes_outputs() -> None:
    model = _build("hstu")
    base = model(_dense(1), _batch("hstu", [_row([1, 2, 3], 7, times=[10, 20, 30], time=40)])).user
    later = model(_dense(1), _batch("hstu", [_row([1, 2, 3], 7, times=[10, 20, 30], time=10**6)])).user
    spread = model(_dense(1), _batch("hstu", [_row([1, 2, 3], 7, times=[10, 5_000, 300_000], time=400_000)])).user
    # The target's time is the last position's query time only.
    torch.testing.assert_close(base[:2], later[:2])
    assert not torch.allclose(base[2], later[2])
    assert not torch.allclose(base, spread)


def test_loss_falls_on_cpu(name: str) -> None:
    # Histories and next items of a row come from one of 4 item groups (id % 4).
    gen = torch.Generator().manual_seed(3)
    rows = []
    for r in range(32):
        items = (4 * torch.randint(1, SEQ_ITEMS // 4, (5,), generator=gen) + r % 4).tolist()
        rows.append(_row(items[: 1 + r % 4], items[-1]))
    kjt = _batch(name, rows, negatives=torch.randint(0, SEQ_ITEMS, (16,), generator=gen).tolist())
    model = _build(name)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(40):
        loss = model.loss(model(_dense(len(rows)), kjt), torch.ones(len(rows)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_hstu_finds_its_timestamp_features() -> None:
    model = registry.build_model("hstu", {}, schema=_schema("hstu"), device=CPU)
    assert (model.history_timestamps, model.timestamp) == ("hist_ts", "ts")
    with pytest.raises(ConfigError, match="model.history_timestamps_feature"):
        registry.build_model("hstu", {}, schema=retrieval_schema(dim=DIM, negatives=16), device=CPU)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="model.history_timestamps_feature"):
        _build("hstu", history_timestamps_feature="nope")
    with pytest.raises(ConfigError, match="model.num_heads"):
        _build("sasrec", num_heads=3)
    with pytest.raises(ConfigError, match="model.history_feature"):
        _build("gru4rec", history_feature="user_id")
    with pytest.raises(ConfigError, match="sampled negatives"):
        registry.build_model("sasrec", {}, schema=retrieval_schema(dim=DIM), device=CPU)
