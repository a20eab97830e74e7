"""Jagged HSTU: the blockwise jagged attention gives the padded version's outputs and gradients,
its block pairs are the causal ones of each row, and the pipeline's tracer keeps it a leaf."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.fx.tracer import Tracer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shardrec.data.schema import DenseFeature, FeatureSchema, NegativeSampling, SparseFeature, TableConfig
from shardrec.errors import ConfigError
from shardrec.models import registry
from shardrec.models.layers.jagged import jagged_blocks, jagged_last, jagged_next, jagged_positions, jagged_prefix

CPU = torch.device("cpu")
ITEMS = 500


def _schema(max_len: int) -> FeatureSchema:
    sparse = [
        SparseFeature(name="item_id", table="item"),
        SparseFeature(name="history", table="item", sequence=True, max_len=max_len),
        SparseFeature(name="hist_ts", raw=True, sequence=True, max_len=max_len),
        SparseFeature(name="ts", raw=True),
        SparseFeature(name="neg_item_ids", table="item", negatives=NegativeSampling(num=8, of="item_id")),
    ]
    return FeatureSchema(dense=[DenseFeature(name="d0", fill_missing=0.0)], sparse=sparse,
                         tables=[TableConfig(name="item", num_embeddings=ITEMS, embedding_dim=16)])


def _pair(max_len: int, **params: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A jagged and a padded HSTU with the same weights."""
    config = {"dropout": 0.0, "num_heads": 2, "linear_dim": 8, "attention_dim": 6, "num_blocks": 2, **params}
    torch.manual_seed(0)
    jagged = registry.build_model("hstu", {**config, "attention": "jagged"}, schema=_schema(max_len), device=CPU)
    padded = registry.build_model("hstu", {**config, "attention": "padded"}, schema=_schema(max_len), device=CPU)
    padded.load_state_dict(jagged.state_dict())
    return jagged, padded


def _batch(lengths: list[int], *, seed: int = 0) -> KeyedJaggedTensor:
    """Rows of the given history lengths with random items and increasing random timestamps."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    hist = [rng.integers(1, ITEMS, n).tolist() for n in lengths]
    times = [np.cumsum(rng.integers(1, 100_000, n + 1)).tolist() for n in lengths]
    parts = [
        ([int(x) for x in rng.integers(1, ITEMS, b)], [1] * b),
        ([x for h in hist for x in h], lengths),
        ([x for t in times for x in t[:-1]], lengths),
        ([t[-1] for t in times], [1] * b),
        (list(range(1, 9)), [8] + [0] * (b - 1)),
    ]
    values = [v for vals, _ in parts for v in vals]
    lens = [n for _, ls in parts for n in ls]
    return KeyedJaggedTensor.from_lengths_sync(keys=["item_id", "history", "hist_ts", "ts", "neg_item_ids"],
                                               values=torch.tensor(values, dtype=torch.long), lengths=torch.tensor(lens))


LENGTHS = [[5, 0, 1, 40, 17, 33, 2, 40], [1], [0, 0, 3], [64, 63, 65 - 1, 1]]


@pytest.mark.parametrize("lengths", LENGTHS, ids=["mixed", "one", "empty-rows", "block-edges"])
@pytest.mark.parametrize("block", [1, 8, 32])
def test_jagged_equals_padded_forward_and_backward(lengths: list[int], block: int) -> None:
    max_len = max(64, max(lengths))
    jagged, padded = _pair(max_len, block_size=block)
    kjt = _batch(lengths)
    dense = torch.zeros(len(lengths), 1)
    jagged.train(), padded.train()
    out_j, out_p = jagged(dense, kjt), padded(dense, kjt)
    for a, b in zip(out_j, out_p):
        assert a.shape == b.shape
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=0)
    (out_j.scores.sum() + out_j.user.square().sum()).backward()
    (out_p.scores.sum() + out_p.user.square().sum()).backward()
    grads_p = dict(padded.named_parameters())
    for name, param in jagged.named_parameters():
        if param.grad is None:
            assert grads_p[name].grad is None or not grads_p[name].grad.any(), name
            continue
        diff = (param.grad - grads_p[name].grad).abs().max().item()
        assert diff <= 1e-5 * max(1.0, grads_p[name].grad.abs().max().item()), (name, diff)
    jagged.eval(), padded.eval()
    with torch.no_grad():
        assert torch.allclose(jagged(dense, kjt), padded(dense, kjt), atol=1e-5, rtol=0)
        assert torch.allclose(jagged.user_vectors(dense, kjt), padded.user_vectors(dense, kjt), atol=1e-5, rtol=0)


def test_jagged_equals_padded_on_heavy_tailed_lengths() -> None:
    rng = np.random.default_rng(1)
    lengths = np.minimum(rng.zipf(1.6, 48), 300).tolist()
    lengths[0] = 300
    jagged, padded = _pair(300, block_size=16)
    kjt = _batch(lengths, seed=2)
    jagged.eval(), padded.eval()
    with torch.no_grad():
        assert torch.allclose(jagged(torch.zeros(48, 1), kjt), padded(torch.zeros(48, 1), kjt), atol=1e-5, rtol=0)


def test_rows_longer_than_max_len_are_cut_as_padding_cuts() -> None:
    jagged, padded = _pair(16, block_size=4)
    kjt = _batch([20, 3, 16, 40])
    jagged.train(), padded.train()
    out_j, out_p = jagged(torch.zeros(4, 1), kjt), padded(torch.zeros(4, 1), kjt)
    assert out_j.user.shape[0] == 16 + 3 + 16 + 16
    for a, b in zip(out_j, out_p):
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=0)


def test_block_pairs_are_each_rows_causal_pairs() -> None:
    lengths = torch.tensor([5, 0, 9, 4])
    blocks = jagged_blocks(lengths, 4)
    # Rows of 5, 0, 9 and 4 tokens: 2, 0, 3 and 1 blocks.
    assert blocks.token.shape == (6, 4)
    assert blocks.token[blocks.valid].tolist() == list(range(18))
    assert (blocks.token[~blocks.valid] == 18).all()
    pairs = sorted(zip(blocks.query.tolist(), blocks.key.tolist()))
    assert pairs == [(0, 0), (1, 0), (1, 1), (2, 2), (3, 2), (3, 3), (4, 2), (4, 3), (4, 4), (5, 5)]
    assert blocks.position[4].tolist() == [8, 9, 10, 11]


def test_jagged_helpers_hand_examples() -> None:
    lengths = torch.tensor([2, 0, 3])
    values = torch.tensor([1, 2, 3, 4, 5])
    assert jagged_positions(lengths).tolist() == [0, 1, 0, 1, 2]
    assert jagged_next(values, lengths, torch.tensor([7, 8, 9])).tolist() == [2, 7, 4, 5, 9]
    assert jagged_last(values.float().unsqueeze(1), lengths).squeeze(1).tolist() == [2.0, 0.0, 5.0]
    cut, cut_lengths = jagged_prefix(values, lengths, 2)
    assert cut.tolist() == [1, 2, 3, 4] and cut_lengths.tolist() == [2, 0, 2]


def test_misaligned_timestamps_are_refused() -> None:
    jagged, _ = _pair(8)
    kjt = _batch([3, 2])
    jt = kjt.to_dict()
    ts = jt["hist_ts"]
    bad = KeyedJaggedTensor.from_jt_dict({**jt, "hist_ts": type(ts)(values=ts.values()[:-1], lengths=torch.tensor([3, 1]))})
    with pytest.raises(ValueError, match="'hist_ts' must hold one timestamp per item of 'history'"):
        jagged(torch.zeros(2, 1), bad)


def test_attention_key_is_checked() -> None:
    with pytest.raises(ConfigError, match="'model.attention' must be 'jagged' or 'padded'"):
        registry.build_model("hstu", {"attention": "dense"}, schema=_schema(8), device=CPU)
    with pytest.raises(ConfigError, match="'model.block_size' must be > 0"):
        registry.build_model("hstu", {"block_size": 0}, schema=_schema(8), device=CPU)


def test_tracer_keeps_the_jagged_attention_a_leaf() -> None:
    jagged, _ = _pair(16)
    graph = Tracer(leaf_modules=["EmbeddingCollection"]).trace(jagged)
    targets = {getattr(n.target, "__name__", str(n.target)) for n in graph.nodes if n.op == "call_function"}
    assert {"jagged_blocks", "jagged_pointwise_attention", "block_bias_index"} <= targets
