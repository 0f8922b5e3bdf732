"""Ternarizers, TernaryLinear and the nn.Linear swap helper."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ternkit.errors import TernkitError
from ternkit.modules import TernaryLinear, swap_linear
from ternkit.quant import absmean_ternarize, act_quant_8bit, lsq_ternarize, per_row_ternarize


def test_absmean_values_and_identity_gradient() -> None:
    w = torch.tensor([[0.1, -0.9, 0.4], [1.6, 0.0, -0.2]], requires_grad=True)
    alpha = w.detach().abs().mean()  # 3.2 / 6
    wq = absmean_ternarize(w)
    expected = torch.clamp(torch.round(w.detach() / alpha), -1, 1) * alpha
    assert torch.allclose(wq.detach(), expected, atol=1e-7)
    assert torch.allclose(wq.detach().abs(), (wq.detach() != 0) * alpha)
    # hand check: |w|/alpha = 0.1875, 1.6875, 0.75, 3.0, 0, 0.375
    assert torch.round(wq.detach() / alpha).tolist() == [[0.0, -1.0, 1.0], [1.0, 0.0, 0.0]]
    g = torch.randn(2, 3)
    wq.backward(g)
    assert torch.equal(w.grad, g)


def test_absmean_alpha_clamped_for_zero_tensor() -> None:
    w = torch.zeros(4, 4)
    assert torch.equal(absmean_ternarize(w), torch.zeros(4, 4))


def test_per_row_uses_one_alpha_per_row() -> None:
    w = torch.tensor([[1.0, 1.0, 0.1, -1.0], [100.0, -100.0, 10.0, 0.0]])
    wq = per_row_ternarize(w)
    a0, a1 = w[0].abs().mean(), w[1].abs().mean()
    assert torch.allclose(wq[0], torch.tensor([1.0, 1.0, 0.0, -1.0]) * a0)
    assert torch.allclose(wq[1], torch.tensor([1.0, -1.0, 0.0, 0.0]) * a1)


def test_lsq_gradients_match_esser() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 7, requires_grad=True)
    alpha = torch.tensor(0.8, requires_grad=True)
    g = torch.randn(5, 7)
    lsq_ternarize(w, alpha).backward(g)
    v = w.detach() / 0.8
    inside = v.abs() < 1
    exp_w = g * inside
    d_alpha = torch.where(inside, torch.round(v) - v, torch.sign(v))
    exp_alpha = (g * d_alpha).sum() / math.sqrt(w.numel())
    assert torch.allclose(w.grad, exp_w)
    assert torch.allclose(alpha.grad, exp_alpha, atol=1e-6)


def test_lsq_forward_values() -> None:
    w = torch.tensor([0.1, 0.6, -0.7, 2.5, -3.0])
    out = lsq_ternarize(w, torch.tensor(1.0))
    assert out.tolist() == [0.0, 1.0, -1.0, 1.0, -1.0]


def test_act_quant_8bit_grid_and_ste() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 16, requires_grad=True)
    xq = act_quant_8bit(x)
    scale = 127.0 / x.detach().abs().amax(-1, keepdim=True)
    codes = xq.detach() * scale
    assert torch.allclose(codes, torch.round(codes), atol=1e-3)
    assert codes.abs().max() <= 127.0 + 1e-3
    assert (xq - x).abs().max() <= (0.5 / scale).max() + 1e-6
    xq.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("scale", ["absmean", "per_row", "lsq"])
@pytest.mark.parametrize("act_bits", [None, 8])
def test_ternary_linear_forward_uses_ternarized_weight(scale: str, act_bits: int | None) -> None:
    torch.manual_seed(1)
    layer = TernaryLinear(12, 6, bias=True, scale=scale, act_bits=act_bits)  # type: ignore[arg-type]
    x = torch.randn(4, 3, 12)
    wq = layer.ternary_weight().detach()
    alpha = layer.scale_of().detach()
    assert torch.allclose(wq, layer.trits().float() * alpha)
    xin = act_quant_8bit(x) if act_bits == 8 else x
    assert torch.allclose(layer(x), nn.functional.linear(xin, wq, layer.bias), atol=1e-6)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    if scale == "lsq":
        assert layer.alpha.grad is not None


def test_lsq_alpha_init_is_twice_absmean() -> None:
    layer = TernaryLinear(32, 16, scale="lsq")
    assert torch.allclose(layer.alpha.detach(), 2 * layer.weight.detach().abs().mean())


def test_bad_scale_is_a_user_error() -> None:
    with pytest.raises(TernkitError, match="unknown ternary scale"):
        TernaryLinear(4, 4, scale="absmax")  # type: ignore[arg-type]
    with pytest.raises(TernkitError, match="act_bits"):
        TernaryLinear(4, 4, act_bits=4)


def test_ternary_linear_learns_a_ternary_target() -> None:
    torch.manual_seed(0)
    teacher = torch.randint(-1, 2, (8, 16)).float() * 0.3
    student = TernaryLinear(16, 8)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    x = torch.randn(256, 16)
    y = x @ teacher.T
    first = None
    for _ in range(300):
        loss = ((student(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first
    assert (student.trits() == teacher.sign().to(torch.int8)).float().mean() > 0.95


def test_swap_linear_by_pattern_keeps_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("attn", nn.ModuleDict({"q": nn.Linear(8, 8), "k": nn.Linear(8, 8)}))
    model.add_module("head", nn.Linear(8, 4, bias=False))
    w_q = model.attn["q"].weight.detach().clone()
    swap_linear(model, include=["attn.*"], exclude=["attn.k"], scale="per_row")
    assert isinstance(model.attn["q"], TernaryLinear) and model.attn["q"].scale == "per_row"
    assert type(model.attn["k"]) is nn.Linear and type(model.head) is nn.Linear
    assert torch.equal(model.attn["q"].weight.detach(), w_q)
    assert model.attn["q"].bias is not None
    swap_linear(model, filter_fn=lambda m, name: m.out_features == 4)
    assert isinstance(model.head, TernaryLinear) and type(model.attn["k"]) is nn.Linear


def test_group_scale_builds_the_integer_state_layer_and_copies_work() -> None:
    import copy

    from ternkit.modules.group import GroupTernaryLinear

    from ternkit.errors import TernkitError
    from ternkit.modules.linear import make_linear
    from ternkit.quant.spec import TernarySpec

    g = make_linear(64, 16, TernarySpec(scale="group", group_size=16))
    assert isinstance(g, GroupTernaryLinear) and g.group_size == 16
    assert all(not torch.is_floating_point(t) for t in g.state_dict().values())
    assert type(make_linear(64, 16, TernarySpec(scale="lsq"))) is TernaryLinear
    assert type(make_linear(64, 16, None)) is nn.Linear
    with pytest.raises(TernkitError, match="make_linear"):  # one way to build each kind of layer
        TernaryLinear(64, 16, False, "group")
    layer = TernaryLinear(8, 4, scale="per_row")
    clone = copy.deepcopy(nn.Sequential(layer))
    x = torch.randn(2, 8)
    assert torch.equal(clone(x), layer(x))
