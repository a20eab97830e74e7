"""The shared blocks of shardrec.models.layers: the MLP's activations, norms and dropout, Dice's and
batch norm's statistics (masked in training, moving averages in eval), PReLU over the last dim, self-attention's
masks (causal, padding) against the plain formula, the transformer block's two norm placements, and
the dense field embedding's two initializations."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import nn

from shardrec.models.layers import (
    MLP,
    BatchNorm,
    DenseFieldEmbedding,
    Dice,
    MultiHeadSelfAttention,
    PositionEmbedding,
    PReLU,
    TransformerBlock,
)

CPU = torch.device("cpu")


def _types(module: nn.Module) -> list[str]:
    return [type(m).__name__ for m in module]


@pytest.mark.parametrize(
    ("activation", "name"),
    [("relu", "ReLU"), ("leaky_relu", "LeakyReLU"), ("gelu", "GELU"), ("prelu", "PReLU"), ("dice", "Dice")],
)
def test_mlp_activation_sets_the_layer_between_linears(activation: str, name: str) -> None:
    mlp = MLP(3, [4, 5, 1], activation=activation, final_activation=False, device=CPU)  # type: ignore[arg-type]
    assert _types(mlp) == ["Linear", name, "Linear", name, "Linear"]
    if activation in ("prelu", "dice"):  # one learned parameter per channel of the layer it follows
        assert [p.numel() for p in mlp[1].parameters()] == [4] and [p.numel() for p in mlp[3].parameters()] == [5]


def test_mlp_dropout_follows_every_activation() -> None:
    assert _types(MLP(3, [4, 2], dropout=0.5, final_activation=False, device=CPU)) == ["Linear", "ReLU", "Dropout", "Linear"]
    # A zero rate keeps its Dropout, so parameter names (ffn.3.weight) do not depend on the rate.
    assert _types(MLP(3, [4, 2], dropout=0.0, device=CPU)) == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout"]
    assert "Dropout" not in _types(MLP(3, [4, 2], device=CPU))


def test_mlp_passes_the_mask_to_dice() -> None:
    torch.manual_seed(0)
    mlp = MLP(4, [6, 1], activation="dice", final_activation=False, device=CPU)
    with torch.no_grad():
        mlp[1].alpha.uniform_(-1.0, 1.0)
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    noisy = x + 10.0 * torch.randn_like(x) * (~mask).unsqueeze(-1)
    # Dice's statistics come from the real positions only, so padding cannot move the real outputs.
    torch.testing.assert_close(mlp(noisy, mask)[mask], mlp(x, mask)[mask])
    assert not torch.allclose(mlp(noisy)[mask], mlp(x)[mask])
    assert isinstance(mlp[1], Dice)


def _reference_attention(attn: MultiHeadSelfAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head under a boolean ``[B, S, S]`` mask, then the output projection."""
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    heads = [t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in (q, k, v)]
    d = heads[0].size(-1)
    scores = (heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask.unsqueeze(1), float("-inf"))
    return attn.out((torch.softmax(scores, dim=-1) @ heads[2]).transpose(1, 2).flatten(2))


def test_attention_matches_the_formula_under_padding_and_causality() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    pos = torch.arange(4)
    tril = pos.unsqueeze(1) >= pos.unsqueeze(0)
    plain = MultiHeadSelfAttention(8, 2, device=CPU)
    torch.testing.assert_close(plain(x, valid), _reference_attention(plain, x, valid.unsqueeze(1).expand(2, 4, 4)))
    causal = MultiHeadSelfAttention(8, 2, causal=True, device=CPU)
    torch.testing.assert_close(causal(x), _reference_attention(causal, x, tril.expand(2, 4, 4)))
    # Causal with padding: a padded query keeps its own position, so its row is not empty (no NaN).
    both = (tril & valid.unsqueeze(1)) | torch.eye(4, dtype=torch.bool)
    out = causal(x, valid)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference_attention(causal, x, both))


@pytest.mark.parametrize("norm_first", [True, False])
def test_causal_block_output_ignores_later_positions(norm_first: bool) -> None:
    torch.manual_seed(0)
    block = TransformerBlock(8, 2, ffn_dim=16, activation="relu", dropout=0.1, causal=True, norm_first=norm_first,
                             device=CPU).eval()
    x = torch.randn(3, 6, 8)
    changed = x.clone()
    changed[:, 4:] = torch.randn(3, 2, 8)
    out, out_changed = block(x), block(changed)
    torch.testing.assert_close(out[:, :4], out_changed[:, :4])
    assert not torch.allclose(out[:, 4:], out_changed[:, 4:])
    bidirectional = TransformerBlock(8, 2, ffn_dim=16, activation="relu", dropout=0.1, device=CPU).eval()
    bidirectional.load_state_dict(block.state_dict())
    assert not torch.allclose(bidirectional(x)[:, :4], bidirectional(changed)[:, :4])


def test_padded_keys_do_not_reach_real_positions() -> None:
    torch.manual_seed(0)
    block = TransformerBlock(8, 2, ffn_dim=32, activation="leaky_relu", dropout=0.0, norm_first=False, device=CPU)
    x = torch.randn(2, 5, 8)
    valid = torch.tensor([[True, True, False, False, False], [True, True, True, True, False]])
    noisy = x + torch.randn_like(x) * (~valid).unsqueeze(-1)
    torch.testing.assert_close(block(noisy, valid)[valid], block(x, valid)[valid])


def test_block_norm_placement() -> None:
    torch.manual_seed(0)
    kwargs = {"ffn_dim": 8, "activation": "gelu", "dropout": 0.0, "device": CPU}
    pre, post = TransformerBlock(8, 2, **kwargs), TransformerBlock(8, 2, norm_first=False, **kwargs)  # type: ignore[arg-type]
    # Parameters are listed in the order the forward uses them.
    assert [n.split(".")[0] for n, _ in pre.named_parameters()][::2] == ["norm1", "attention", "attention", "norm2", "ffn", "ffn"]
    assert [n.split(".")[0] for n, _ in post.named_parameters()][::2] == ["attention", "attention", "norm1", "ffn", "ffn", "norm2"]
    post.load_state_dict(pre.state_dict())
    x = 3.0 + 5.0 * torch.randn(2, 4, 8)
    # Post-norm ends in a fresh LayerNorm (unit scale, zero shift): each position is standardized.
    torch.testing.assert_close(post(x).mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    want = x + pre.attention(pre.norm1(x))
    torch.testing.assert_close(pre(x), want + pre.ffn(pre.norm2(want)))
    assert _types(pre.ffn) == ["Linear", "GELU", "Linear"]


def test_dense_field_embedding_init() -> None:
    torch.manual_seed(0)
    normal = DenseFieldEmbedding(64, 100, init="normal", device=CPU)
    assert abs(normal.weight.std().item() - 0.01) < 1e-3
    uniform = DenseFieldEmbedding(64, 100, init="uniform", device=CPU)
    bound = 1.0 / math.sqrt(100)
    assert uniform.weight.abs().max() <= bound and abs(uniform.weight.std().item() - bound / math.sqrt(3)) < 0.005
    dense = torch.tensor([[2.0, -1.0] + [0.0] * 62])
    torch.testing.assert_close(uniform(dense)[0, :2], torch.stack([2.0 * uniform.weight[0], -uniform.weight[1]]))
    with pytest.raises(ValueError, match="'normal' or 'uniform'"):
        DenseFieldEmbedding(2, 4, init="xavier", device=CPU)  # type: ignore[arg-type]


def test_position_embedding_adds_one_vector_per_position() -> None:
    pos = PositionEmbedding(3, 4, device=CPU)
    x = torch.zeros(2, 3, 4)
    torch.testing.assert_close(pos(x), pos.weight.expand(2, 3, 4))


@pytest.mark.parametrize(("activation", "fn"), [("silu", nn.functional.silu), ("sigmoid", torch.sigmoid), ("tanh", torch.tanh)])
def test_plain_activations_added(activation: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    mlp = MLP(3, [4], activation=activation, device=CPU)  # type: ignore[arg-type]
    x = torch.randn(5, 3)
    torch.testing.assert_close(mlp(x), fn(mlp[0](x)))


def test_prelu_learns_one_slope_per_last_dim_channel() -> None:
    # nn.PReLU(C) takes dimension 1 as the channels, so on [B, L, C] it failed unless L == C.
    prelu = PReLU(4, device=CPU)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(prelu(x), torch.where(x >= 0, x, x * prelu.weight))
    flat = nn.PReLU(4, device=CPU)
    flat.load_state_dict(prelu.state_dict())  # same parameter as nn.PReLU: checkpoints interchange
    torch.testing.assert_close(prelu(x[:, 0]), flat(x[:, 0]))


def test_dice_trains_on_batch_statistics_and_serves_their_moving_averages() -> None:
    dice = Dice(3, momentum=0.5, device=CPU)
    assert torch.equal(dice.running_mean, torch.zeros(3)) and torch.equal(dice.running_var, torch.ones(3))
    x = 2.0 + 3.0 * torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    dice(x, mask)
    real = x[mask]
    torch.testing.assert_close(dice.running_mean, 0.5 * real.mean(0))
    torch.testing.assert_close(dice.running_var, 0.5 + 0.5 * real.var(0, unbiased=False))
    before = dice.running_mean.clone()
    dice(x, torch.zeros(4, 6, dtype=torch.bool))  # nothing real: the averages stay
    assert torch.equal(dice.running_mean, before)
    dice.eval()
    p = torch.sigmoid((x - dice.running_mean) / torch.sqrt(dice.running_var + 1e-8))
    torch.testing.assert_close(dice(x), p * x)  # alpha = 0
    # Eval: a row alone scores as it does inside the batch.
    torch.testing.assert_close(dice(x[1:2]), dice(x)[1:2])
    dice.reset_running_stats()
    assert torch.equal(dice.running_var, torch.ones(3))


@pytest.mark.parametrize(
    ("kwargs", "types"),
    [
        ({"norm": "batch", "dropout": 0.1, "final_activation": False}, ["Linear", "BatchNorm", "ReLU", "Dropout", "Linear"]),
        ({"norm": "layer", "final_activation": True}, ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm", "ReLU"]),
        ({"norm": "none", "final_activation": False}, ["Linear", "ReLU", "Linear"]),
    ],
)
def test_mlp_norm_sits_between_linear_and_activation(kwargs: dict[str, object], types: list[str]) -> None:
    mlp = MLP(3, [4, 2], device=CPU, **kwargs)  # type: ignore[arg-type]
    assert _types(mlp) == types
    if kwargs["norm"] == "layer":
        x = torch.randn(5, 3)
        torch.testing.assert_close(mlp(x), torch.relu(mlp[4](mlp[3](torch.relu(mlp[1](mlp[0](x)))))))


def test_batch_norm_over_the_last_dim_takes_statistics_from_real_positions() -> None:
    norm = BatchNorm(3, device=CPU)
    x = 1.0 + 2.0 * torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    out = norm(x, mask)
    real = x[mask]
    torch.testing.assert_close(out[mask], (real - real.mean(0)) / torch.sqrt(real.var(0, unbiased=False) + 1e-5))
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(norm.running_mean, 0.1 * real.mean(0))
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * real.var(0))
    assert int(norm.num_batches_tracked) == 1
    # Eval on [B, L, C] and on [B, C] alike: the running statistics, per row.
    norm.eval()
    want = (x - norm.running_mean) / torch.sqrt(norm.running_var + 1e-5)
    torch.testing.assert_close(norm(x), want)
    torch.testing.assert_close(norm(x[:, 0]), want[:, 0])


def test_mlp_passes_the_mask_to_batch_norm() -> None:
    torch.manual_seed(0)
    mlp = MLP(4, [6, 1], norm="batch", final_activation=False, device=CPU)
    x = torch.randn(3, 5, 4)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5, [True, False, False, False, False]])
    noisy = x + 10.0 * torch.randn_like(x) * (~mask).unsqueeze(-1)
    torch.testing.assert_close(mlp(noisy, mask)[mask], mlp(x, mask)[mask])
