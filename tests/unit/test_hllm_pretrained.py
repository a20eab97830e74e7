"""HLLM over ``transformers`` models (tiny random checkpoints saved here, nothing downloaded): the
item embeddings are computed once and reused from the cache, a trained item LLM gets gradients
above its frozen layers, batch independence, and the errors for bad checkpoints and tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.fx.tracer import Tracer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import SEQ_ITEMS, retrieval_schema
from llm_helpers import USER_LLM, hllm_params, title, write_text_catalogue, write_tiny_checkpoint
from shardrec.data.catalogue import catalogue_kjt, read_catalogue
from shardrec.errors import ConfigError, DataError
from shardrec.models import registry
from shardrec.models.retrieval import RetrievalOutput
from shardrec.serving.export_model import TwoTowers, to_torchscript, tower_inputs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hllm_llm")


@pytest.fixture(scope="module")
def catalogue(tmp: Path) -> Path:
    return write_text_catalogue(tmp / "items.parquet")


def _build(tmp: Path, catalogue: Path, *, init: bool = True, negatives: int = 0, **extra: Any) -> torch.nn.Module:
    params = hllm_params(tmp, catalogue=catalogue, **extra)
    params.pop("name")
    torch.manual_seed(0)
    schema = retrieval_schema(dim=8, negatives=negatives)
    model = registry.build_model("hllm", {"dropout": 0.0, **params}, schema=schema, device=CPU)
    if init:
        model.init_pretrained(seed=0)
    return model


def _batch(rows: list[tuple[list[int], int]]) -> KeyedJaggedTensor:
    """Rows of (history, next item) over :func:`retrieval_schema`'s keys."""
    keys = ["user_id", "item_id", "history"]
    values = [1] * len(rows) + [t for _, t in rows] + [i for h, _ in rows for i in h]
    lengths = [1] * len(rows) + [1] * len(rows) + [len(h) for h, _ in rows]
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.tensor(values), lengths=torch.tensor(lengths))


ROWS = [([1, 5, 9], 13), ([2], 6), ([], 3), ([4, 8, 12, 16, 20, 24], 28)]


def test_catalogue_is_embedded_once_then_read_from_the_cache(tmp: Path, catalogue: Path) -> None:
    first = _build(tmp, catalogue, cache_dir=str(tmp / "cache_once"))
    files = list((tmp / "cache_once").glob("item_embeddings_*.parquet"))
    assert first.item_llm_runs == SEQ_ITEMS and len(files) == 1
    assert pq.read_table(files[0]).num_rows == SEQ_ITEMS
    second = _build(tmp, catalogue, cache_dir=str(tmp / "cache_once"))
    assert second.item_llm_runs == 0
    assert torch.equal(first.item_language, second.item_language)
    assert first.item_language[:SEQ_ITEMS].abs().sum(dim=1).gt(0).all()
    # Another text is another cache file.
    other = write_text_catalogue(tmp / "items_other.parquet")
    table = pq.read_table(other)
    pq.write_table(table.set_column(1, "title", pa.array([title(i) + " new" for i in range(SEQ_ITEMS)])), other)
    third = _build(tmp, other, cache_dir=str(tmp / "cache_once"))
    assert third.item_llm_runs == SEQ_ITEMS and len(list((tmp / "cache_once").glob("item_embeddings_*.parquet"))) == 2


def test_training_outputs_and_gradients(tmp: Path, catalogue: Path) -> None:
    model = _build(tmp, catalogue).train()
    out = model(torch.zeros(4, 1), _batch(ROWS))
    assert isinstance(out, RetrievalOutput)
    assert out.user.shape == (3 + 1 + 0 + 6, 16)
    assert out.item_ids.tolist() == [5, 9, 13, 6, 8, 12, 16, 20, 24, 28]
    out.scores.sum().backward()
    assert model.language_proj.weight.grad.abs().sum() > 0
    assert model.user_in.weight.grad.abs().sum() > 0
    assert model.ec.embeddings["item"].weight.grad.abs().sum() > 0


def _with_negatives(kjt: KeyedJaggedTensor, negatives: list[int]) -> KeyedJaggedTensor:
    """``kjt`` plus the batch's sampled negatives (all on the first row)."""
    rows = kjt.stride()
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[*kjt.keys(), "neg_item_ids"], values=torch.cat([kjt.values(), torch.tensor(negatives, dtype=torch.long)]),
        lengths=torch.cat([kjt.lengths(), torch.tensor([len(negatives)] + [0] * (rows - 1))]))


def test_sampled_negatives_are_embedded_by_id(tmp: Path, catalogue: Path) -> None:
    model = _build(tmp, catalogue, negatives=4, loss={"kind": "sampled", "temperature": 0.05}).train()
    out = model(torch.zeros(4, 1), _with_negatives(_batch(ROWS), [7, 11, 30, 41]))
    assert out.negative_ids.tolist() == [7, 11, 30, 41] and out.negatives.shape == (4, 16)
    model.loss(out, torch.zeros(4)).backward()
    assert model.ec.embeddings["item"].weight.grad[[7, 11, 30, 41]].abs().sum(dim=1).gt(0).all()
    model.eval()
    with torch.no_grad():
        alone = model.item_vectors(_with_negatives(_batch([([], 7)]), []))
    assert torch.allclose(out.negatives[0].detach(), alone[0], atol=1e-5)


def test_eval_scores_do_not_depend_on_the_batch(tmp: Path, catalogue: Path) -> None:
    model = _build(tmp, catalogue).eval()
    with torch.no_grad():
        together = model(torch.zeros(4, 1), _batch(ROWS))
        for i, row in enumerate(ROWS):
            assert torch.allclose(model(torch.zeros(1, 1), _batch([row]))[0], together[i], atol=1e-5)
        assert together[2].abs().sum() == 0  # no history: no user vector
        items = model.item_vectors(_batch(ROWS))
        assert torch.allclose(items.norm(dim=1), torch.ones(4), atol=1e-5)


def test_trained_item_llm_gets_gradients_above_its_frozen_layers(tmp: Path, catalogue: Path) -> None:
    model = _build(tmp, catalogue, train_item_llm=True, freeze_item_layers=1).train()
    assert not hasattr(model, "item_language") and model.item_tokens[:SEQ_ITEMS].gt(0).any(dim=1).all()
    model(torch.zeros(4, 1), _batch(ROWS)).scores.sum().backward()
    layers = model.item_llm.model.layers
    assert all(p.grad is None for p in layers[0].parameters())
    assert model.item_llm.model.get_input_embeddings().weight.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[1].parameters())


def test_without_id_embeddings_the_model_has_no_table(tmp: Path, catalogue: Path) -> None:
    model = _build(tmp, catalogue, id_embeddings=False).train()
    assert model.ec is None
    assert model(torch.zeros(4, 1), _batch(ROWS)).user.shape[0] == 10


def test_missing_checkpoint_is_named(tmp: Path, catalogue: Path) -> None:
    with pytest.raises(ConfigError, match="'model.item_llm' is '.*nowhere', which is not a local folder"):
        _build(tmp, catalogue, init=False, item_llm=str(tmp / "nowhere"))
    (tmp / "empty").mkdir(exist_ok=True)
    with pytest.raises(ConfigError, match="checkpoint folder '.*empty' has no config.json"):
        _build(tmp, catalogue, init=False, item_llm=str(tmp / "empty"))


def test_tokenizer_of_another_model_is_refused(tmp: Path, catalogue: Path) -> None:
    texts = [f"title: {title(i)}" for i in range(SEQ_ITEMS)]
    bad = write_tiny_checkpoint(tmp / "bigger_tokenizer", texts=texts + ["zzz " * 3 + "yyy"], extra_vocab=200)
    # The words the tokenizer adds past the model's vocabulary appear in the texts.
    other = tmp / "items_extra.parquet"
    pq.write_table(pa.table({"item_id": pa.array(range(SEQ_ITEMS)), "title": [f"extra{150 + i % 40}" for i in range(SEQ_ITEMS)]}), other)
    with pytest.raises(ConfigError, match="belongs to another model; set 'model.tokenizer'"):
        _build(tmp, other, item_llm=str(bad), cache_dir=str(tmp / "cache_bad"))


def test_non_causal_user_llm_and_missing_tokenizer_are_refused(tmp: Path, catalogue: Path) -> None:
    bert = {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 8, "max_position_embeddings": 64}
    with pytest.raises(ConfigError, match="'model.user_llm' must be a causal"):
        _build(tmp, catalogue, user_llm=bert)
    with pytest.raises(ConfigError, match="set 'model.tokenizer'"):
        _build(tmp, catalogue, item_llm=USER_LLM, cache_dir=str(tmp / "cache_inline"))
    with pytest.raises(ConfigError, match="needs 'model_type'"):
        _build(tmp, catalogue, init=False, user_llm={"hidden_size": 32})


def test_config_keys_are_checked(tmp: Path, catalogue: Path) -> None:
    with pytest.raises(ConfigError, match="replaced by 'model.item_llm'"):
        registry.build_model("hllm", {"text_encoder": "bert"}, schema=retrieval_schema(dim=8, text=True), device=CPU)
    with pytest.raises(ConfigError, match="need 'model.item_llm'"):
        registry.build_model("hllm", {"user_llm": USER_LLM}, schema=retrieval_schema(dim=8, text=True), device=CPU)
    with pytest.raises(DataError, match="no text column 'plot'"):
        _build(tmp, catalogue, item_text={"path": str(catalogue), "columns": ["plot"]})


def test_builds_on_meta(tmp: Path, catalogue: Path) -> None:
    params = hllm_params(tmp, catalogue=catalogue)
    params.pop("name")
    model = registry.build_model("hllm", params, schema=retrieval_schema(dim=8), device=torch.device("meta"))
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("train_item_llm", [False, True])
def test_pipeline_tracer_keeps_the_language_models_leaves(tmp: Path, catalogue: Path, train_item_llm: bool) -> None:
    model = _build(tmp, catalogue, train_item_llm=train_item_llm).train()
    graph = Tracer(leaf_modules=["EmbeddingCollection", "PretrainedTransformer"]).trace(model)
    called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    assert "user_llm" in called and ("item_llm" in called) == train_item_llm


@pytest.mark.parametrize("train_item_llm", [False, True])
def test_towers_script_with_the_language_models_traced(tmp: Path, catalogue: Path, train_item_llm: bool) -> None:
    model = _build(tmp, catalogue, train_item_llm=train_item_llm).eval()
    schema = retrieval_schema(dim=8)
    _, items = read_catalogue(catalogue, schema, item_feature="item_id")
    towers = TwoTowers(model, schema=schema, items=items)
    user, item = (to_torchscript(m, model="hllm") for m in (towers.user, towers.item))
    kjt = catalogue_kjt(items, schema, where="test")
    batch = _batch(ROWS)
    with torch.no_grad():
        assert torch.allclose(item(*tower_inputs(kjt, towers.item_inputs)), model.item_vectors(kjt), atol=1e-5)
        got = user(torch.zeros(4, 1), *tower_inputs(batch, towers.user_inputs))
        assert torch.allclose(got, model.user_vectors(torch.zeros(4, 1), batch), atol=1e-5)
