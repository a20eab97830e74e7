"""HLLM: shapes, a text-only item model that ignores padding, a causal user model, the meta build,
the pipeline's tracing rules, config errors and a falling loss on the planted-group data."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torchrec.fx.tracer import Tracer
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import TOKENS_PER_ITEM, item_tokens, retrieval_schema, write_retrieval_data
from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models import registry
from shardrec.models.hllm import HLLM, distinct_items

CPU = torch.device("cpu")
SCHEMA = retrieval_schema(text=True)


def _build(device: torch.device = CPU, schema: FeatureSchema = SCHEMA, **params: object) -> HLLM:
    torch.manual_seed(0)
    return registry.build_model("hllm", {"hidden_dim": 32, "vector_dim": 16, **params}, schema=schema, device=device)


def _kjt(histories: list[list[int]], targets: list[int | None], tokens: dict[int, list[int]] | None = None) -> KeyedJaggedTensor:
    """A batch in SCHEMA's key order; ``tokens`` overrides an item's text; a None target: no item."""
    text = {**{i: item_tokens(i) for i in range(60)}, **(tokens or {})}
    columns = {
        "user_id": [[0] for _ in histories],
        "item_id": [[] if t is None else [t] for t in targets],
        "history": histories,
        "item_tokens": [[] if t is None else text[t] for t in targets],
        "hist_tokens": [[x for i in h for x in text[i]] for h in histories],
    }
    assert list(columns) == SCHEMA.sparse_names
    rows = [row for col in columns.values() for row in col]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(columns), values=torch.tensor([x for r in rows for x in r], dtype=torch.long),
        lengths=torch.tensor([len(r) for r in rows]),
    )


def _dense(batch: int) -> torch.Tensor:
    return torch.zeros(batch, 1)


def test_training_output_covers_every_valid_position() -> None:
    model = _build()
    out = model(_dense(3), _kjt([[1, 2, 3], [4], [5, 6]], [7, 8, 9]))
    assert out.user.shape == out.item.shape == (6, 16)
    assert out.scores.shape == (6,)
    # Each position's positive is the next history item, the last one's the row's target.
    assert out.item_ids.tolist() == [2, 3, 7, 8, 6, 9]
    assert out.negatives.shape == (0, 16) and out.negative_ids.numel() == 0
    torch.testing.assert_close(out.scores, (out.user * out.item).sum(dim=-1))
    model.eval()
    assert model(_dense(3), _kjt([[1, 2, 3], [4], [5, 6]], [7, 8, 9])).shape == (3, 16)
    assert model.item_vectors(_kjt([[], []], [1, 2])).shape == (2, 16)


def test_item_embedding_reads_tokens_not_ids() -> None:
    model = _build().eval()
    same = model.item_vectors(_kjt([[], []], [3, 7], tokens={3: item_tokens(7)}))
    torch.testing.assert_close(same[0], same[1])
    other = model.item_vectors(_kjt([[]], [3]))
    assert not torch.allclose(other[0], same[0])


def test_training_item_vectors_match_the_catalogue_ones() -> None:
    model = _build(dropout=0.0)
    out = model(_dense(2), _kjt([[1, 2, 1], [2]], [4, 1]))
    catalogue = model.item_vectors(_kjt([[]] * 4, [2, 1, 4, 1]))
    assert out.item_ids.tolist() == [2, 1, 4, 1]
    torch.testing.assert_close(out.item, catalogue)


def test_padding_tokens_do_not_change_the_item_embedding() -> None:
    model = _build().eval()
    kjt = _kjt([[]], [4])
    assert 0 in item_tokens(4)
    before = model.item_vectors(kjt)
    with torch.no_grad():
        model.ec.embeddings["token"].weight[0].normal_()
    torch.testing.assert_close(model.item_vectors(kjt), before)
    assert not torch.allclose(model.item_vectors(_kjt([[]], [3])), model.item_vectors(_kjt([[]], [3], tokens={3: [1, 2, 3, 4]})))


def test_user_model_is_causal() -> None:
    model = _build(dropout=0.0)
    a = model(_dense(1), _kjt([[1, 2, 3]], [9])).user
    b = model(_dense(1), _kjt([[1, 2, 5]], [9])).user
    torch.testing.assert_close(a[:2], b[:2])
    assert not torch.allclose(a[2], b[2])
    model.eval()
    torch.testing.assert_close(model.user_vectors(_dense(1), _kjt([[1, 2]], [9]))[0], a[1])


def test_empty_history_gives_a_zero_user_vector() -> None:
    model = _build().eval()
    users = model.user_vectors(_dense(2), _kjt([[], [3]], [1, 2]))
    assert users[0].abs().sum() == 0 and users[1].abs().sum() > 0


def test_distinct_items_encodes_each_text_once() -> None:
    ids = torch.tensor([[1, 2], [3, 0], [1, 2], [3, 0], [5, 5]])
    first, inverse = distinct_items(ids)
    assert first.numel() == 3
    torch.testing.assert_close(ids[first][inverse], ids)


def test_builds_on_meta_and_traces_with_the_token_table_alone() -> None:
    model = _build(torch.device("meta"))
    assert all(p.is_meta for p in model.parameters())
    assert not list(model.buffers())
    collections = [m for m in model.modules() if isinstance(m, (EmbeddingCollection, EmbeddingBagCollection))]
    assert [c.name for m in collections for c in m.embedding_configs()] == ["token"]
    graph = Tracer(leaf_modules=["EmbeddingCollection"]).trace(model)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == "ec"]
    assert len(calls) == 1 and calls[0].args[0].target == "sparse_features"


def test_every_parameter_gets_a_gradient() -> None:
    model = _build()
    out = model(_dense(3), _kjt([[1, 2, 3], [4], [5, 6]], [7, 8, 9]))
    model.loss(out, torch.ones(3)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize(("params", "match"), [
    ({"text_encoder": "bert-base"}, r"model\.text_encoder.*replaced by .model\.item_llm."),
    ({"loss": {"kind": "sampled"}}, r"model\.loss\.kind"),
    ({"num_heads": 3}, r"model\.num_heads"),
    ({"item_text_feature": "title_tokens"}, r"model\.item_text_feature.*hist_tokens"),
])
def test_config_errors_name_the_key(params: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _build(torch.device("meta"), **params)


def test_history_text_must_hold_tokens_for_every_history_item() -> None:
    schema = retrieval_schema(text=True)
    next(f for f in schema.sparse if f.name == "hist_tokens").max_len = 5 * TOKENS_PER_ITEM
    with pytest.raises(ConfigError, match=r"'hist_tokens'.*max_len to 24"):
        _build(torch.device("meta"), schema=schema)


def test_loss_falls_on_planted_groups(tmp_path: Path) -> None:
    table = pq.read_table(write_retrieval_data(rows=512, path=tmp_path / "train.parquet", seed=1, text=True)).to_pydict()
    model = _build(hidden_dim=64, vector_dim=64)
    opt = torch.optim.Adam(model.parameters(), lr=0.001)
    losses = []
    for step in range(40):
        rows = slice(128 * (step % 4), 128 * (step % 4 + 1))
        kjt = _kjt(table["history"][rows], table["item_id"][rows])
        loss = model.loss(model(_dense(128), kjt), torch.ones(128))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # Uniform scores give about log(450 positions) = 6.1; knowing each item's group, about 5.3.
    assert sum(losses[-4:]) < sum(losses[:4]) - 4 * 0.3, losses
