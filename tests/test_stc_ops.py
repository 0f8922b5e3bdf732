"""STC ops: ternary quantizer (STE), sparse memory write vs the dense update, skip counters."""

from __future__ import annotations

import math

import pytest
import torch

from ternkit.errors import TernkitError
from ternkit.ops.stc import stc_quantize
from ternkit.ops.stc_write import skip_fraction, sparse_memory_write


def test_stc_quantize_values_by_hand():
    x = torch.tensor([[0.5, -2.0, 0.1, 3.0], [0.2, -0.3, 0.0, 0.4]])
    y = stc_quantize(x, 0.45)
    # row 0 keeps 0.5, -2, 3 -> alpha = 5.5 / 3; row 1 keeps nothing -> all zero, no NaN
    a = 5.5 / 3
    torch.testing.assert_close(y, torch.tensor([[a, -a, 0.0, a], [0.0, 0.0, 0.0, 0.0]]))
    # the threshold is strict: |x| == tau is zeroed
    assert stc_quantize(torch.tensor([1.0, -1.0, 2.0]), 1.0).tolist() == [0.0, 0.0, 2.0]


def test_stc_quantize_per_head_tau_broadcasts():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16)
    tau = torch.tensor([0.0, 0.7, 10.0]).view(1, 3, 1, 1)
    y = stc_quantize(x, tau)
    assert torch.count_nonzero(y[:, 0]) == torch.count_nonzero(x[:, 0])  # tau 0 keeps every non-zero
    assert torch.count_nonzero(y[:, 2]) == 0                              # tau 10 keeps nothing
    kept = x[:, 1].abs() > 0.7
    assert torch.equal(y[:, 1] != 0, kept)
    alpha = (x[:, 1].abs() * kept).sum(-1) / kept.sum(-1)
    torch.testing.assert_close(y[:, 1].abs().amax(-1), alpha)
    assert torch.equal(torch.sign(y[:, 1]), torch.sign(x[:, 1]) * kept)
    # every vector's kept entries share one magnitude
    assert torch.allclose(y[:, 1].abs().amax(-1, keepdim=True) * kept, y[:, 1].abs())


def test_stc_quantize_gradient_is_identity_including_zero_region():
    torch.manual_seed(1)
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(4, 8)
    y = stc_quantize(x, torch.tensor(0.8))
    assert (y == 0).any() and (y != 0).any()
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)


def _random_case(seed: int, B: int = 2, NH: int = 3, DH: int = 16, tau: float = 0.9):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(B, NH, DH, DH, generator=g)
    n = torch.randn(B, NH, DH, generator=g)
    k = stc_quantize(torch.randn(B, NH, DH, generator=g), tau)
    v = stc_quantize(torch.randn(B, NH, DH, generator=g), tau)
    f_scale = torch.rand(B, NH, generator=g)
    i_scale = torch.rand(B, NH, generator=g) * 2
    return C, n, k, v, f_scale, i_scale


def _dense(C, n, k, v, f_scale, i_scale):
    C_d = C * f_scale[..., None, None] + i_scale[..., None, None] * (k[..., :, None] * v[..., None, :])
    n_d = n * f_scale[..., None] + i_scale[..., None] * k
    return C_d, n_d


def test_sparse_write_equals_dense_update_exactly():
    C, n, k, v, f_scale, i_scale = _random_case(0)
    f_scale[0, 1] = 1.0   # this head skips the decay pass
    f_scale[1, 0] = -1.0  # ternary negate
    f_scale[1, 2] = 0.0   # ternary clear
    k[0, 2] = 0.0         # empty write
    C_before, n_before = C.clone(), n.clone()
    C_s, n_s, stats = sparse_memory_write(C, n, k, v, i_scale, f_scale)
    C_d, n_d = _dense(C, n, k, v, f_scale, i_scale)
    assert torch.equal(C_s, C_d) and torch.equal(n_s, n_d)
    assert torch.equal(C, C_before) and torch.equal(n, n_before)  # inputs untouched
    B, NH, DH = k.shape
    nnz_k, nnz_v = (k != 0).sum(-1), (v != 0).sum(-1)
    assert stats["total"] == B * NH * DH * DH
    assert stats["written"] == int((nnz_k * nnz_v).sum())
    assert stats["decayed"] == (B * NH - 1) * DH * DH
    assert 0 < stats["written"] < stats["total"]


def test_sparse_write_touches_only_the_nonzero_block():
    C, n, k, v, _, _ = _random_case(3, B=1, NH=1, DH=12)
    ones, i_scale = torch.ones(1, 1), torch.full((1, 1), 0.5)
    C_s, n_s, stats = sparse_memory_write(C, n, k, v, i_scale, ones)
    changed = C_s != C
    rows, cols = k[0, 0] != 0, v[0, 0] != 0
    assert not changed[0, 0][~rows].any() and not changed[0, 0][:, ~cols].any()
    assert torch.equal(n_s[0, 0][~rows], n[0, 0][~rows])
    assert stats["decayed"] == 0
    expected_skip = 1.0 - int(rows.sum() * cols.sum()) / (2 * 12 * 12)
    assert math.isclose(skip_fraction(stats), expected_skip)


def test_skip_fraction_numbers_and_errors():
    assert skip_fraction({"total": 100, "written": 0, "decayed": 0}) == 1.0
    assert skip_fraction({"total": 100, "written": 100, "decayed": 100}) == 0.0
    assert skip_fraction({"total": 100, "written": 25, "decayed": 25}) == 0.75
    assert math.isnan(skip_fraction({"total": 0, "written": 0, "decayed": 0}))
    with pytest.raises(TernkitError, match="decayed"):
        skip_fraction({"total": 1, "written": 0})


def test_sparse_write_rejects_mismatched_shapes():
    C, n, k, v, f_scale, i_scale = _random_case(1)
    with pytest.raises(TernkitError, match="f_scale"):
        sparse_memory_write(C, n, k, v, i_scale, f_scale[:, :1])
    with pytest.raises(TernkitError, match=r"\(B, NH, DH, DH\)"):
        sparse_memory_write(C[..., :3], n, k, v, i_scale, f_scale)
