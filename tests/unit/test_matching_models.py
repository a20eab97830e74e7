"""YouTubeDNN, MIND and ComiRec (DR, SA): shapes, the routing and attention invariants, ComiRec's
argmax training readout and controllable aggregation, meta builds and a falling loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from torchrec.fx.tracer import Tracer
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import SEQ_ITEMS, retrieval_schema, write_retrieval_data
from shardrec.data.schema import FeatureSchema
from shardrec.errors import ConfigError
from shardrec.models import registry
from shardrec.models.comirec import controllable_topk
from shardrec.models.multi_interest import active_interests, dynamic_routing, label_aware_attention, squash
from shardrec.models.retrieval import RetrievalOutput

CPU = torch.device("cpu")
MODELS = ["youtubednn", "mind", "comirec_dr", "comirec_sa"]
NEGATIVES = 16
K = 4
DIM = 8


def _schema(name: str) -> FeatureSchema:
    return retrieval_schema(dim=DIM, negatives=NEGATIVES if name == "youtubednn" else 0)


def _build(name: str, device: torch.device = CPU, **params: Any) -> torch.nn.Module:
    return registry.build_model(name, params, schema=_schema(name), device=device)


def _batch(schema: FeatureSchema, path: Path, rows: int = 64) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """The first ``rows`` rows of a written retrieval file as (dense, KJT); row 0 carries the negatives."""
    table = pq.read_table(path).slice(0, rows).to_pydict()
    gen = torch.Generator().manual_seed(0)
    lengths, values = [], []
    for f in schema.sparse:
        if f.negatives is not None:
            lengths.append(torch.tensor([NEGATIVES] + [0] * (rows - 1)))
            values.append(torch.randint(0, SEQ_ITEMS, (NEGATIVES,), generator=gen))
        elif f.sequence:
            lengths.append(torch.tensor([len(h) for h in table[f.name]]))
            values.append(torch.tensor([i for h in table[f.name] for i in h], dtype=torch.long))
        else:
            lengths.append(torch.ones(rows, dtype=torch.long))
            values.append(torch.tensor(table[f.name]))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=schema.sparse_names, values=torch.cat(values), lengths=torch.cat(lengths))
    return torch.tensor(table["d0"]).unsqueeze(1), kjt


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_retrieval_data(rows=256, path=tmp_path_factory.mktemp("matching") / "train.parquet", seed=1)


@pytest.mark.parametrize("name", MODELS)
def test_builds_on_meta_and_traces(name: str) -> None:
    model = _build(name, torch.device("meta"))
    assert all(p.is_meta for p in model.parameters())
    graph = Tracer(leaf_modules=["EmbeddingBagCollection", "EmbeddingCollection"]).trace(model)
    collections = {n for n, m in model.named_modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))}
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target in collections]
    assert sorted(c.target for c in calls) == sorted(collections)
    assert all(c.args[0].op == "placeholder" and c.args[0].target == "sparse_features" for c in calls)


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_every_parameter_learns(name: str, data: Path) -> None:
    torch.manual_seed(0)
    model = _build(name)
    dense, kjt = _batch(_schema(name), data, rows=16)
    out = model(dense, kjt)
    assert isinstance(out, RetrievalOutput)
    assert out.user.shape == out.item.shape == (16, DIM) and out.scores.shape == (16,)
    assert out.negatives.shape == ((NEGATIVES, DIM) if name == "youtubednn" else (0, DIM))
    model.loss(out, torch.ones(16)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"
    served = (16, DIM) if name == "youtubednn" else (16, K, DIM)
    assert model.user_vectors(dense, kjt).shape == served
    assert model.item_vectors(kjt).shape == (16, DIM)
    model.eval()
    assert torch.equal(model(dense, kjt), model.user_vectors(dense, kjt))  # deterministic serving


@pytest.mark.parametrize("name", MODELS)
def test_loss_falls_on_cpu(name: str, data: Path) -> None:
    torch.manual_seed(0)
    model = _build(name)
    dense, kjt = _batch(_schema(name), data)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(40):
        loss = model.loss(model(dense, kjt), torch.ones(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_squash_keeps_direction_and_bounds_norm() -> None:
    z = torch.randn(5, 3, 8) * torch.tensor([0.01, 1.0, 100.0]).view(1, 3, 1)
    v = squash(z)
    norms = v.norm(dim=-1)
    assert (norms < 1).all() and norms[:, 2].min() > 0.99 and norms[:, 0].max() < 0.01
    assert torch.allclose(torch.nn.functional.cosine_similarity(v, z, dim=-1), torch.ones(5, 3), atol=1e-5)
    assert torch.equal(squash(torch.zeros(2, 8)), torch.zeros(2, 8))


def test_dynamic_routing_invariants() -> None:
    gen = torch.Generator().manual_seed(0)
    behaviours = torch.randn(3, K, 5, DIM, generator=gen, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    logits = torch.randn(1, K, 5, generator=gen, requires_grad=True)
    caps = dynamic_routing(behaviours, mask, logits, iterations=3)
    assert caps.shape == (3, K, DIM)
    assert (caps.norm(dim=-1) < 1).all()
    assert torch.equal(caps[2], torch.zeros(K, DIM))  # no behaviours, no interests
    changed = behaviours.detach().clone()
    changed[1, :, 2:] = 7.0  # padding never counts
    assert torch.allclose(dynamic_routing(changed, mask, logits, iterations=3)[1], caps[1])
    caps.sum().backward()
    assert logits.grad is None and behaviours.grad is not None  # routing logits are not back-propagated


def test_active_interests_follow_log2_of_history_length() -> None:
    lengths = torch.tensor([0, 1, 2, 3, 4, 8, 100])
    mask = torch.arange(100).unsqueeze(0) < lengths.unsqueeze(1)
    assert active_interests(mask, K).sum(dim=1).tolist() == [1, 1, 1, 1, 2, 3, 4]


def test_label_aware_attention_with_large_pow_picks_best_interest() -> None:
    interests = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [-6.0, 0.0]]])
    target = torch.tensor([[0.5, 1.0]])  # scores 1, 2, -3: (-3)^2 would win under the paper's plain power
    assert torch.allclose(label_aware_attention(interests, target, pow=2.0).norm(), torch.tensor(2.0), atol=0.3)
    assert torch.allclose(label_aware_attention(interests, target, pow=20.0), interests[:, 1], atol=1e-4)
    soft = label_aware_attention(interests, target, pow=1.0)
    assert not torch.allclose(soft, interests[:, 1], atol=1e-2)
    only_first = torch.tensor([[True, False, False]])
    assert torch.allclose(label_aware_attention(interests, target, pow=20.0, active=only_first), interests[:, 0])


def test_mind_dynamic_interests_serve_the_first_for_inactive_ones(data: Path) -> None:
    model = _build("mind", dynamic_interests=True)
    dense, kjt = _batch(_schema("mind"), data, rows=16)
    served = model.user_vectors(dense, kjt)
    count = active_interests(_history_mask(kjt), K).sum(dim=1)
    for row, n in enumerate(count.tolist()):
        assert torch.equal(served[row, n:], served[row, :1].expand(K - n, -1))


def _history_mask(kjt: KeyedJaggedTensor) -> torch.Tensor:
    lengths = kjt["history"].lengths()
    return torch.arange(int(lengths.max())).unsqueeze(0) < lengths.unsqueeze(1)


@pytest.mark.parametrize("name", ["comirec_dr", "comirec_sa"])
def test_comirec_trains_on_the_interest_closest_to_the_target(name: str, data: Path) -> None:
    torch.manual_seed(0)
    model = _build(name)
    dense, kjt = _batch(_schema(name), data, rows=16)
    out = model(dense, kjt)
    interests = model.user_vectors(dense, kjt)
    best = torch.einsum("bkd,bd->bk", interests, out.item).argmax(dim=1)
    assert torch.equal(out.user, interests[torch.arange(16), best])
    assert len(set(best.tolist())) > 1 or K == 1


def test_controllable_topk_trades_score_for_diversity() -> None:
    interests = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[1.0, 0.0], [0.9, 0.0], [0.8, 0.0], [0.0, 0.5], [0.0, 0.4], [0.1, 0.1]])
    categories = torch.tensor([0, 0, 0, 1, 2, 3])
    best_interest = (items @ interests.t()).max(dim=1).values
    assert controllable_topk(interests, items, categories, 3, 0.0).tolist() == best_interest.topk(3).indices.tolist()
    assert controllable_topk(interests, items, categories, 3, 0.0).tolist() == [0, 1, 2]
    diverse = controllable_topk(interests, items, categories, 3, 10.0)
    assert diverse.tolist() == [0, 3, 4] and len(set(categories[diverse].tolist())) == 3
    batched = controllable_topk(interests.expand(2, -1, -1), items, categories, 3, 10.0)
    assert batched.tolist() == [[0, 3, 4], [0, 3, 4]]
    with pytest.raises(ValueError, match="k must be"):
        controllable_topk(interests, items, categories, 7, 0.0)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="model.num_interests"):
        _build("comirec_sa", num_interests=0)
    with pytest.raises(ConfigError, match="model.pow"):
        _build("mind", pow=0.5)
    with pytest.raises(ConfigError, match="model.ignored_features"):
        _build("youtubednn", ignored_features=["genres"])
    with pytest.raises(ConfigError, match="negatives"):
        registry.build_model("youtubednn", {}, schema=retrieval_schema(dim=DIM), device=CPU)
    with pytest.raises(ConfigError, match="model.history_feature"):
        _build("mind", history_feature="user_id")


def test_ignored_features_get_no_table() -> None:
    model = _build("mind", ignored_features=["user_id"])
    assert not any("user" in n for n, _ in model.named_parameters())
    assert model.inputs.profile_names == []
