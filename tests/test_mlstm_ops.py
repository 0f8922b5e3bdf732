"""mLSTM ops: the recurrent step is the definition; parallel and chunkwise must match it, gradients included."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from ternkit.errors import TernkitError
from ternkit.ops.mlstm import (
    mlstm_chunkwise,
    mlstm_parallel,
    mlstm_recurrent,
    mlstm_recurrent_step,
    ternary_decay_gate,
    ternary_gate,
)
from ternkit.ops.stc import TERNARY_GATE_THRESHOLD, stc_quantize
from ternkit.ops.stc_write import skip_fraction

B, NH, DH = 2, 2, 8
MODES = ("sigmoid", "ternary", "ternary_decay")
KEEP_MIN = math.atanh(TERNARY_GATE_THRESHOLD)  # |f~| above this: the ternary sign is non-zero
FWD = dict(atol=1e-4, rtol=1e-3)
BWD = dict(atol=1e-3, rtol=1e-2)


def make_inputs(S: int, seed: int, dtype=torch.float64, i_scale: float = 3.0, f_scale: float = 2.0):
    """q, k, v (B, NH, S, DH); i~ wide (N(0, 3^2)); f~ ~ N(0, 2^2) so ternary gates hit 0 and -1 often."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, NH, S, DH, generator=g, dtype=dtype) for _ in range(3))
    i = torch.randn(B, NH, S, generator=g, dtype=dtype) * i_scale
    f = torch.randn(B, NH, S, generator=g, dtype=dtype) * f_scale
    return q, k, v, i, f


def fwd_bwd(fn, inputs, seed: int = 123, **kw):
    """(h, grads of q, k, v, i, f, final state or None) of sum(h * w) for a fixed random w, in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, **kw)
    h, state = out if isinstance(out, tuple) else (out, None)
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(h.dtype)
    grads = torch.autograd.grad((h * w).sum(), leaves)
    return h.detach(), grads, None if state is None else tuple(s.detach() for s in state)


@functools.lru_cache(maxsize=None)
def reference(S: int, mode: str, seed: int):
    """The recurrent form in float64 on make_inputs(S, seed): h, grads, final state."""
    return fwd_bwd(mlstm_recurrent, make_inputs(S, seed), gate_mode=mode, return_final_state=True)


def assert_close(actual, expected, tol, what):
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}")


def naive_mlstm(q, k, v, i, f, mode, eps):
    """Plain unstabilized mLSTM (float64): C_t = f_t C + exp(i~_t) k v^T, h = C^T q / (max(|n.q|, 1) + eps).

    The gate f_t is sigmoid(f~), ternary_gate(f~) or ternary_gate(f~) * sigmoid(|f~|), written
    directly in linear space, so its autograd gradient is the definition's (straight-through in t),
    with one rule: at a cleared gate (t_r = 0) the straight-through gradient is scaled by
    exp(-relu(log a_r + m_{r-1} - i~_r)), m being the memory's log scale (the stabilizer), so the
    cleared memory counts at most as strongly as the new write. Its forward value stays 0.
    """
    Bq, NHq, S, D = q.shape
    C = q.new_zeros(Bq, NHq, D, D)
    n = q.new_zeros(Bq, NHq, D)
    gate = {"sigmoid": lambda: torch.sigmoid(f), "ternary": lambda: ternary_gate(f),
            "ternary_decay": lambda: ternary_gate(f) * torch.sigmoid(f.abs())}[mode]()
    if mode != "sigmoid":
        log_a = F.logsigmoid(f.abs()) if mode == "ternary_decay" else torch.zeros_like(f)
        cleared = gate.detach() == 0
        m, scales = q.new_zeros(Bq, NHq), []
        for t in range(S):
            kept = log_a[:, :, t].detach() + m
            scales.append(torch.exp(-torch.relu(kept - i[:, :, t].detach())))
            m = torch.where(cleared[:, :, t], i[:, :, t].detach(), torch.maximum(kept, i[:, :, t].detach()))
        gate = torch.where(cleared, gate * torch.stack(scales, dim=2), gate)
    hs = []
    for t in range(S):
        kt = k[:, :, t] / math.sqrt(D)
        ft, it = gate[:, :, t, None], torch.exp(i[:, :, t])[..., None]
        C = ft[..., None] * C + it[..., None] * kt[..., :, None] * v[:, :, t, None, :]
        n = ft * n + it * kt
        num = torch.einsum("bhrc,bhr->bhc", C, q[:, :, t])
        den = (n * q[:, :, t]).sum(-1).abs().clamp(min=1.0) + eps
        hs.append(num / den[..., None])
    return torch.stack(hs, dim=2)


# ----------------------------------------------------------------------------- definition


@pytest.mark.parametrize("mode", MODES)
def test_all_forms_equal_naive_unstabilized_mlstm(mode):
    # Small i~ keeps exp(i~) tame for the unstabilized reference; with eps = 0 the stabilizer
    # cancels exactly, so every form must equal the naive one to float64 rounding.
    q, k, v, i, f = make_inputs(12, seed=1, i_scale=1.0)
    expected = naive_mlstm(q, k, v, i, f, mode, eps=0.0)
    for name, h in [
        ("recurrent", mlstm_recurrent(q, k, v, i, f, gate_mode=mode, eps=0.0)),
        ("parallel", mlstm_parallel(q, k, v, i, f, gate_mode=mode, eps=0.0)),
        ("chunkwise", mlstm_chunkwise(q, k, v, i, f, gate_mode=mode, chunk_size=5, eps=0.0)),
    ]:
        torch.testing.assert_close(h, expected, atol=1e-10, rtol=1e-9, msg=lambda m: f"{name}: {m}")
    # With the default eps the stabilized step differs from the naive one only by eps * exp(m_t).
    h = mlstm_recurrent(q, k, v, i, f, gate_mode=mode)
    torch.testing.assert_close(h, expected, **FWD)
    assert (h - expected).abs().max().item() > 0.0


@pytest.mark.parametrize("mode", MODES)
def test_all_forms_have_the_gradients_of_naive_unstabilized_mlstm(mode):
    # The naive model writes the gate in linear space (ternary_decay: ternary_gate(f~) * sigmoid(|f~|)),
    # so its autograd gradient is the definition d g / d f~ = STE(t) * a + t * d a / d f~; the
    # stabilized forms must give the same gradients of q, k, v, i~ and f~ (the cleared-gate rule included).
    inputs = make_inputs(12, seed=1, i_scale=1.0)
    _, g_ref, _ = fwd_bwd(naive_mlstm, inputs, mode=mode, eps=0.0)
    for fn, kw in [(mlstm_recurrent, {}), (mlstm_parallel, {}), (mlstm_chunkwise, {"chunk_size": 5})]:
        _, grads, _ = fwd_bwd(fn, inputs, gate_mode=mode, eps=0.0, **kw)
        for name, g, gr in zip("qkvif", grads, g_ref):
            assert_close(g, gr, dict(atol=1e-10, rtol=1e-9), f"{fn.__name__} d{name}")


@pytest.mark.parametrize("mode", MODES)
def test_far_negative_input_gates_stay_finite_in_float32_in_every_form(mode):
    # A model can drive i~ far below -88 (seen at lr 3e-3): the readout floor exp(-m) then overflows
    # float32 and its gradient became inf * 0 = NaN. The floor's exponent is capped, in every form alike.
    q, k, v, i, f = make_inputs(16, seed=3, dtype=torch.float32)
    i = i - 120.0
    outs = {}
    for fn, kw in [(mlstm_recurrent, {}), (mlstm_parallel, {}), (mlstm_chunkwise, {"chunk_size": 4})]:
        h, grads, _ = fwd_bwd(fn, (q, k, v, i, f), gate_mode=mode, **kw)
        assert bool(torch.isfinite(h).all()), fn.__name__
        assert all(bool(torch.isfinite(g).all()) for g in grads), fn.__name__
        outs[fn.__name__] = (h, grads)
    h_ref, g_ref = outs["mlstm_recurrent"]
    for name, (h, grads) in outs.items():
        torch.testing.assert_close(h, h_ref, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        for g, gr in zip(grads, g_ref):
            torch.testing.assert_close(g, gr, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name} grad: {m}")


def test_states_start_at_zero_and_first_step_matches_formula():
    q, k, v, i, f = (t[:, :, 0] for t in make_inputs(1, seed=2))
    h, (C, n, m) = mlstm_recurrent_step(q, k, v, i, f)
    m_expected = torch.maximum(torch.nn.functional.logsigmoid(f), i)  # m_0 = 0
    torch.testing.assert_close(m, m_expected)
    ks = k / math.sqrt(DH)
    torch.testing.assert_close(C, torch.exp(i - m)[..., None, None] * ks[..., :, None] * v[..., None, :])
    torch.testing.assert_close(n, torch.exp(i - m)[..., None] * ks)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_are_the_derivative_of_the_forward(mode):
    # gradcheck (finite differences, float64) of every form w.r.t. q, k, v, i~; in sigmoid mode also f~.
    # Ternary gates are piecewise constant in f~ (their gradient is straight-through), so f~ is held fixed.
    q, k, v, i, f = (t[:1, :1] for t in make_inputs(6, seed=4, i_scale=1.0))
    for fn, kw in [(mlstm_recurrent, {}), (mlstm_parallel, {}), (mlstm_chunkwise, {"chunk_size": 4})]:
        if mode == "sigmoid":
            assert torch.autograd.gradcheck(lambda *a: fn(*a, gate_mode=mode, **kw),
                                            tuple(t.clone().requires_grad_() for t in (q, k, v, i, f)))
        else:
            assert torch.autograd.gradcheck(lambda *a: fn(*a, f, gate_mode=mode, **kw),
                                            tuple(t.clone().requires_grad_() for t in (q, k, v, i)))


def test_ternary_decay_magnitude_gradient_is_exact(monkeypatch):
    # gradcheck w.r.t. f~ too, with the straight-through term switched off (t detached): what is
    # left, through log a = logsigmoid(|f~|) in m and in every exponent, must be the exact derivative.
    import ternkit.ops.stc as stc

    ste_gate = stc.ternary_gate
    monkeypatch.setattr(stc, "ternary_gate", lambda x: ste_gate(x.detach()))
    q, k, v, i, f = (t[:1, :1] for t in make_inputs(6, seed=4, i_scale=1.0))
    f = torch.where((f.abs() - KEEP_MIN).abs() < 1e-2, f + 0.1, f)  # keep t locally constant for the differences
    f[..., 2] = 0.2  # and one cleared gate
    assert ((f.abs() - KEEP_MIN).abs() > 1e-3).all() and (f.abs() < KEEP_MIN).any() and (f < -KEEP_MIN).any()
    for fn, kw in [(mlstm_recurrent, {}), (mlstm_parallel, {}), (mlstm_chunkwise, {"chunk_size": 4})]:
        assert torch.autograd.gradcheck(lambda *a: fn(*a, gate_mode="ternary_decay", **kw),
                                        tuple(t.clone().requires_grad_() for t in (q, k, v, i, f)))


def test_empty_sequence():
    q, k, v, i, f = make_inputs(0, seed=0)
    for mode in MODES:
        assert mlstm_parallel(q, k, v, i, f, gate_mode=mode).shape == (B, NH, 0, DH)
        h, (C, n, m) = mlstm_chunkwise(q, k, v, i, f, gate_mode=mode, return_final_state=True)
        assert h.shape == (B, NH, 0, DH) and torch.count_nonzero(C) == 0 and torch.count_nonzero(m) == 0


# ----------------------------------------------------------------------------- parallel


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("S", [7, 65, 93])
def test_parallel_matches_recurrent_fp32(mode, S):
    h_ref, g_ref, _ = reference(S, mode, seed=S)
    h, grads, _ = fwd_bwd(mlstm_parallel, [t.float() for t in make_inputs(S, seed=S)], gate_mode=mode)
    assert_close(h, h_ref, FWD, "h")
    for name, g, gr in zip("qkvif", grads, g_ref):
        assert_close(g, gr, BWD, f"d{name}")


# ----------------------------------------------------------------------------- chunkwise


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("S", [7, 65, 93, 500])
def test_chunkwise_matches_recurrent_fp32(mode, chunk_size, S):
    h_ref, g_ref, st_ref = reference(S, mode, seed=S)
    h, grads, st = fwd_bwd(mlstm_chunkwise, [t.float() for t in make_inputs(S, seed=S)], gate_mode=mode,
                           chunk_size=chunk_size, return_final_state=True)
    assert h.shape == (B, NH, S, DH)
    assert_close(h, h_ref, FWD, "h")
    for name, g, gr in zip("qkvif", grads, g_ref):
        assert_close(g, gr, BWD, f"d{name}")
    for name, s, sr in zip(("C", "n", "m"), st, st_ref):
        assert_close(s, sr, FWD, f"final {name}")


@pytest.mark.parametrize("mode", MODES)
def test_chunkwise_initial_state_matches_recurrent_with_grads(mode):
    q, k, v, i, f = make_inputs(37, seed=5)
    g = torch.Generator().manual_seed(6)
    C0 = torch.randn(B, NH, DH, DH, generator=g, dtype=torch.float64) * 0.1
    n0 = torch.randn(B, NH, DH, generator=g, dtype=torch.float64) * 0.1
    m0 = torch.randn(B, NH, generator=g, dtype=torch.float64) * 3

    def run(fn, **kw):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, i, f, C0, n0, m0)]
        h, (C, n, m) = fn(*leaves[:5], gate_mode=mode, initial_state=tuple(leaves[5:]), return_final_state=True,
                          **kw)
        loss = (h * torch.cos(h)).sum() + (C * 0.3).sum() + n.sum() + m.sum()
        return (h, C, n, m), torch.autograd.grad(loss, leaves)

    out_r, grads_r = run(mlstm_recurrent)
    out_c, grads_c = run(mlstm_chunkwise, chunk_size=8)
    for a, b in zip(out_c, out_r):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    for name, a, b in zip(("q", "k", "v", "i", "f", "C0", "n0", "m0"), grads_c, grads_r):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", ["recurrent", "chunkwise"])
def test_split_in_four_pieces_with_state_passing_matches_whole(mode, form):
    S = 93
    q, k, v, i, f = (t.float() for t in make_inputs(S, seed=11))
    if form == "recurrent":
        fn = functools.partial(mlstm_recurrent, gate_mode=mode, return_final_state=True)
    else:
        fn = functools.partial(mlstm_chunkwise, gate_mode=mode, chunk_size=16, return_final_state=True)
    h_whole, st_whole = fn(q, k, v, i, f)
    cuts = [0, 20, 41, 77, S]  # pieces of 20, 21, 36, 16: not aligned with the chunks
    state, hs = None, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        h, state = fn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], i[:, :, a:b], f[:, :, a:b], initial_state=state)
        hs.append(h)
    torch.testing.assert_close(torch.cat(hs, dim=2), h_whole, atol=1e-5, rtol=1e-5)
    for s, sw in zip(state, st_whole):
        torch.testing.assert_close(s, sw, atol=1e-5, rtol=1e-5)


def test_chunkwise_padding_leaves_state_of_last_real_token():
    # S = 17 with chunks of 16: one real token and 15 padding tokens in the last chunk.
    q, k, v, i, f = make_inputs(17, seed=3)
    for mode in MODES:
        _, st_c = mlstm_chunkwise(q, k, v, i, f, gate_mode=mode, chunk_size=16, return_final_state=True)
        _, st_r = mlstm_recurrent(q, k, v, i, f, gate_mode=mode, return_final_state=True)
        for s, sr in zip(st_c, st_r):
            torch.testing.assert_close(s, sr, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_extreme_gates_give_finite_values_and_grads_in_every_form(mode):
    # i~ spanning +-25 and f~ +-6: many cleared memories, huge and tiny writes, padding in chunkwise.
    inputs = [t.float() for t in make_inputs(45, seed=9, i_scale=10.0, f_scale=6.0)]
    forms = [
        (mlstm_recurrent, {}),
        (mlstm_parallel, {}),
        (mlstm_chunkwise, {"chunk_size": 16}),
    ]
    hs = []
    for fn, kw in forms:
        h, grads, _ = fwd_bwd(fn, inputs, gate_mode=mode, **kw)
        assert torch.isfinite(h).all(), fn.__name__
        for name, g in zip("qkvif", grads):
            assert torch.isfinite(g).all(), f"{fn.__name__} d{name}"
        hs.append(h)
    torch.testing.assert_close(hs[1], hs[0], **FWD)
    torch.testing.assert_close(hs[2], hs[0], **FWD)


@pytest.mark.parametrize("mode", MODES)
def test_forms_agree_in_float64_for_very_wide_gate_ranges(mode):
    # i~ ~ N(0, 15^2): gaps of tens of nats at cleared gates, where the recurrent step caps
    # the exponent; the block forms must cap at the same place, so gradients still agree tightly.
    inputs = make_inputs(70, seed=21, i_scale=15.0, f_scale=3.0)
    h_ref, g_ref, st_ref = fwd_bwd(mlstm_recurrent, inputs, gate_mode=mode, return_final_state=True)
    tight = dict(atol=1e-9, rtol=1e-7)
    for fn, kw in [(mlstm_parallel, {}), (mlstm_chunkwise, {"chunk_size": 16, "return_final_state": True})]:
        h, grads, st = fwd_bwd(fn, inputs, gate_mode=mode, **kw)
        assert_close(h, h_ref, tight, f"{fn.__name__} h")
        for name, g, gr in zip("qkvif", grads, g_ref):
            assert_close(g, gr, tight, f"{fn.__name__} d{name}")
        if st is not None:
            for name, a, b in zip("Cnm", st, st_ref):
                assert_close(a, b, tight, f"final {name}")


def test_bfloat16_inputs_are_computed_in_float32():
    inputs = make_inputs(40, seed=12)
    expected = {mode: mlstm_recurrent(*inputs, gate_mode=mode) for mode in MODES}
    low = [t.bfloat16() for t in inputs]
    for mode in MODES:
        h, (C, n, m) = mlstm_chunkwise(*low, gate_mode=mode, chunk_size=16, return_final_state=True)
        assert h.dtype == torch.bfloat16 and C.dtype == n.dtype == m.dtype == torch.float32
        # bf16 rounding of the inputs alone moves h by ~1%; a bf16 cumulative gate sum would do far worse
        ref = mlstm_recurrent(*[t.double() for t in low], gate_mode=mode)
        assert (h.double() - ref).abs().max() <= 0.02 * ref.abs().max()
        assert (h.double() - expected[mode]).abs().max() <= 0.2 * expected[mode].abs().max()


# ----------------------------------------------------------------------------- ternary gate semantics


def test_ternary_gate_values_and_straight_through_gradient():
    f = torch.tensor([-3.0, -0.6, -0.5, 0.0, 0.5, 0.6, 3.0], requires_grad=True)
    g = ternary_gate(f)
    # |tanh(f)| > 0.5  <=>  |f| > atanh(0.5) = 0.5493
    assert g.tolist() == [-1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    (g * torch.arange(7.0)).sum().backward()
    torch.testing.assert_close(f.grad, torch.arange(7.0) * (1 - torch.tanh(f.detach()) ** 2))


def test_ternary_keep_clear_negate_on_the_memory():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, NH, DH, generator=g) for _ in range(3))
    i = torch.full((B, NH), 2.0)
    f = torch.full((B, NH), 5.0)  # g = +1
    _, state = mlstm_recurrent_step(q, k, v, i, f, gate_mode="ternary")
    C, n, m = state
    zero = torch.zeros_like(k)
    low_i = m - 1.0  # i~ below m: the stabilizer does not move
    # keep (+1) with an empty write: the memory is preserved bit for bit
    _, (C1, n1, m1) = mlstm_recurrent_step(q, zero, v, low_i, f, state=state, gate_mode="ternary")
    assert torch.equal(C1, C) and torch.equal(n1, n) and torch.equal(m1, m)
    # negate (-1) with an empty write: exactly -C, -n
    _, (C2, n2, m2) = mlstm_recurrent_step(q, zero, v, low_i, -f, state=state, gate_mode="ternary")
    assert torch.equal(C2, -C) and torch.equal(n2, -n) and torch.equal(m2, m)
    # clear (0): the old memory is gone, m resets to i~
    h3, (C3, n3, m3) = mlstm_recurrent_step(q, zero, v, low_i, torch.zeros_like(f), state=state,
                                            gate_mode="ternary")
    assert torch.count_nonzero(C3) == 0 and torch.count_nonzero(n3) == 0 and torch.count_nonzero(h3) == 0
    torch.testing.assert_close(m3, low_i)


@pytest.mark.parametrize("mode", ["ternary", "ternary_decay"])
def test_ternary_gate_gradient_flows_through_cleared_gate(mode):
    # With a cleared gate the loss still depends on g (STE): d loss / d f~ at that step is non-zero.
    q, k, v, i, f = make_inputs(6, seed=8)
    f = f.clone()
    f[:, :, 3] = 0.1  # g = 0 at t = 3
    for fn, kw in [(mlstm_recurrent, {}), (mlstm_parallel, {}), (mlstm_chunkwise, {"chunk_size": 4})]:
        _, grads, _ = fwd_bwd(fn, (q, k, v, i, f), gate_mode=mode, **kw)
        assert (grads[4][:, :, 3].abs() > 1e-6).all(), fn.__name__


# ----------------------------------------------------------------------------- ternary_decay gate semantics


def test_ternary_decay_gate_values_and_gradient():
    f = torch.tensor([-3.0, -0.6, -0.5, 0.0, 0.5, 0.6, 3.0], dtype=torch.float64, requires_grad=True)
    t, log_a = ternary_decay_gate(f)
    assert t.tolist() == [-1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    fd = f.detach()
    torch.testing.assert_close(log_a, torch.nn.functional.logsigmoid(fd.abs()), atol=0, rtol=0)
    assert (torch.exp(log_a)[t != 0] > 0.63).all() and (torch.exp(log_a) < 1).all()
    g = t * torch.exp(log_a)
    torch.testing.assert_close(g[fd > KEEP_MIN], torch.sigmoid(fd[fd > KEEP_MIN]))  # keep = the sigmoid gate
    w = torch.arange(1.0, 8.0, dtype=torch.float64)
    (g * w).sum().backward()
    a = torch.sigmoid(fd.abs())
    expected = (1 - torch.tanh(fd) ** 2) * a + t.detach() * torch.sign(fd) * a * (1 - a)
    torch.testing.assert_close(f.grad, w * expected, atol=1e-12, rtol=1e-12)


def test_ternary_decay_equals_sigmoid_where_every_gate_keeps(monkeypatch):
    # f~ > 0.5493 everywhere: t = +1 and log a = logsigmoid(f~), so every form is the sigmoid model,
    # h, final state and gradients of q, k, v, i~ included (fp32, 1e-6). The gradient of f~ differs
    # by the straight-through term only: with t detached it is the sigmoid one too.
    import ternkit.ops.stc as stc

    q, k, v, i, _ = (t.float() for t in make_inputs(93, seed=14))
    f = torch.empty(B, NH, 93).uniform_(KEEP_MIN + 0.01, 6.0, generator=torch.Generator().manual_seed(15))
    tol = dict(atol=1e-6, rtol=0.0)
    forms = [(mlstm_recurrent, {"return_final_state": True}), (mlstm_parallel, {}),
             (mlstm_chunkwise, {"chunk_size": 16, "return_final_state": True})]
    for fn, kw in forms:
        h_s, g_s, st_s = fwd_bwd(fn, (q, k, v, i, f), gate_mode="sigmoid", **kw)
        h_d, g_d, st_d = fwd_bwd(fn, (q, k, v, i, f), gate_mode="ternary_decay", **kw)
        assert_close(h_d, h_s, tol, f"{fn.__name__} h")
        for name, a, b in zip("qkvi", g_d, g_s):
            assert_close(a, b, tol, f"{fn.__name__} d{name}")
        assert not torch.allclose(g_d[4], g_s[4])  # the straight-through term is there
        for name, a, b in zip("Cnm", st_d or (), st_s or ()):
            assert_close(a, b, tol, f"{fn.__name__} final {name}")
    ste_gate = stc.ternary_gate
    monkeypatch.setattr(stc, "ternary_gate", lambda x: ste_gate(x.detach()))
    for fn, kw in forms:
        _, g_s, _ = fwd_bwd(fn, (q, k, v, i, f), gate_mode="sigmoid", **kw)
        _, g_d, _ = fwd_bwd(fn, (q, k, v, i, f), gate_mode="ternary_decay", **kw)
        assert_close(g_d[4], g_s[4], tol, f"{fn.__name__} df without the straight-through term")


def test_ternary_decay_negation_flips_the_memory_and_decays_it():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, NH, DH, generator=g) for _ in range(3))
    i, f = torch.full((B, NH), 2.0), torch.full((B, NH), 5.0)
    _, state = mlstm_recurrent_step(q, k, v, i, f, gate_mode="ternary_decay")
    C, n, m = state
    zero = torch.zeros_like(k)
    log_a = torch.nn.functional.logsigmoid(f)
    low_i = m + log_a - 1.0  # i~ below the decayed m: the stabilizer takes the decay
    _, (C1, n1, m1) = mlstm_recurrent_step(q, zero, v, low_i, f, state=state, gate_mode="ternary_decay")
    h2, (C2, n2, m2) = mlstm_recurrent_step(q, zero, v, low_i, -f, state=state, gate_mode="ternary_decay")
    # no exact preserve: the memory exp(m) C decays by a = sigmoid(5); the stabilized C carries the sign
    assert torch.equal(C1, C) and torch.equal(C2, -C) and torch.equal(n2, -n)
    assert torch.equal(m1, m + log_a) and torch.equal(m2, m + log_a)
    torch.testing.assert_close(torch.exp(m2)[..., None, None] * C2,
                               -torch.sigmoid(f)[..., None, None] * torch.exp(m)[..., None, None] * C)
    # the same step in sigmoid mode with f~ = +5 gives the unflipped state
    h_s, (C_s, n_s, m_s) = mlstm_recurrent_step(q, zero, v, low_i, f, state=state, gate_mode="sigmoid")
    assert torch.equal(C2, -C_s) and torch.equal(n2, -n_s) and torch.equal(m2, m_s) and torch.equal(h2, -h_s)
    # every form: a last gate -f~ instead of +f~ with no write flips the final memory and the last h
    q, k, v, i, f = (t.float() for t in make_inputs(37, seed=16))
    f = f.abs() + 1.0
    k[:, :, -1] = 0.0
    f_neg = f.clone()
    f_neg[:, :, -1] = -f[:, :, -1]
    for fn, kw in [(mlstm_recurrent, {}), (mlstm_chunkwise, {"chunk_size": 16}), (mlstm_chunkwise, {"chunk_size": 37})]:
        h_p, (C_p, n_p, m_p) = fn(q, k, v, i, f, gate_mode="ternary_decay", return_final_state=True, **kw)
        h_n, (C_n, n_n, m_n) = fn(q, k, v, i, f_neg, gate_mode="ternary_decay", return_final_state=True, **kw)
        torch.testing.assert_close(C_n, -C_p, atol=1e-6, rtol=0)
        torch.testing.assert_close(n_n, -n_p, atol=1e-6, rtol=0)
        torch.testing.assert_close(m_n, m_p, atol=0, rtol=0)
        torch.testing.assert_close(h_n[:, :, -1], -h_p[:, :, -1], atol=1e-6, rtol=0)
        torch.testing.assert_close(h_n[:, :, :-1], h_p[:, :, :-1], atol=0, rtol=0)


def test_ternary_decay_clear_resets_m_and_forgets_the_history():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, NH, DH, generator=g) for _ in range(3))
    _, state = mlstm_recurrent_step(q, k, v, torch.full((B, NH), 2.0), torch.full((B, NH), 5.0),
                                    gate_mode="ternary_decay")
    low_i = state[2] - 3.0  # below the decayed m: only a clear can move m there
    h, (C, n, m) = mlstm_recurrent_step(q, torch.zeros_like(k), v, low_i, torch.full((B, NH), 0.3), state=state,
                                        gate_mode="ternary_decay")
    assert torch.count_nonzero(C) == 0 and torch.count_nonzero(n) == 0 and torch.count_nonzero(h) == 0
    assert torch.equal(m, low_i)
    # every form: after a clear at r = 21 (mid-chunk), h and the final state do not depend on what came before
    r = 21
    a, b = list(make_inputs(40, seed=17)), list(make_inputs(40, seed=18))  # float64
    for x in (a, b):
        x[4][:, :, r] = 0.3
    b = [torch.cat([tb[:, :, :r], ta[:, :, r:]], dim=2) for ta, tb in zip(a, b)]  # new history, same future
    assert not torch.equal(a[0], b[0])
    # The recurrent step forgets exactly; the block forms up to the rounding of the in-chunk sum of log a,
    # which runs across the clear.
    for fn, kw, tol in [(mlstm_recurrent, {}, 0.0), (mlstm_chunkwise, {"chunk_size": 8}, 1e-12),
                        (mlstm_chunkwise, {"chunk_size": 40}, 1e-12)]:
        h_a, st_a = fn(*a, gate_mode="ternary_decay", return_final_state=True, **kw)
        h_b, st_b = fn(*b, gate_mode="ternary_decay", return_final_state=True, **kw)
        assert not torch.allclose(h_a[:, :, :r], h_b[:, :, :r])
        torch.testing.assert_close(h_b[:, :, r:], h_a[:, :, r:], atol=tol, rtol=tol)
        for x, y in zip(st_b, st_a):
            torch.testing.assert_close(x, y, atol=tol, rtol=tol)
        _, (_, _, m_r) = fn(*(t[:, :, :r + 1] for t in a), gate_mode="ternary_decay", return_final_state=True, **kw)
        torch.testing.assert_close(m_r, a[3][:, :, r], atol=tol, rtol=tol)  # m reset to i~_r at the clear


# ----------------------------------------------------------------------------- sparse write in the step


@pytest.mark.parametrize("mode", MODES)
def test_step_sparse_write_equals_dense_and_counts(mode):
    g = torch.Generator().manual_seed(10)
    tau = 0.8
    stats: dict[str, int] = {}
    state_d = state_s = None
    expected_written = 0
    with torch.no_grad():
        for t in range(6):
            q = torch.randn(B, NH, DH, generator=g)
            k = stc_quantize(torch.randn(B, NH, DH, generator=g), tau)
            v = stc_quantize(torch.randn(B, NH, DH, generator=g), tau)
            i = torch.randn(B, NH, generator=g) * 3
            f = torch.randn(B, NH, generator=g) * 2
            h_d, state_d = mlstm_recurrent_step(q, k, v, i, f, state_d, gate_mode=mode)
            h_s, state_s = mlstm_recurrent_step(q, k, v, i, f, state_s, gate_mode=mode, sparse_write=True,
                                                stats=stats)
            expected_written += int(((k != 0).sum(-1) * (v != 0).sum(-1)).sum())
            torch.testing.assert_close(h_s, h_d, atol=0, rtol=0)
            for a, b in zip(state_s, state_d):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert stats["total"] == 6 * B * NH * DH * DH
    assert stats["written"] == expected_written
    assert 0 <= stats["decayed"] <= stats["total"]
    assert 0.0 < skip_fraction(stats) < 1.0


def test_step_sparse_write_refuses_autograd():
    q, k, v, i, f = (t[:, :, 0].requires_grad_() for t in make_inputs(1, seed=2))
    with pytest.raises(TernkitError, match="no_grad"):
        mlstm_recurrent_step(q, k, v, i, f, sparse_write=True)


# ----------------------------------------------------------------------------- errors


def test_bad_arguments_raise_ternkit_error():
    q, k, v, i, f = make_inputs(5, seed=0)
    with pytest.raises(TernkitError, match="gate_mode"):
        mlstm_parallel(q, k, v, i, f, gate_mode="tanh")
    with pytest.raises(TernkitError, match="chunk_size"):
        mlstm_chunkwise(q, k, v, i, f, chunk_size=0)
    with pytest.raises(TernkitError, match="gates"):
        mlstm_recurrent(q, k, v, i[:, :, :3], f)
    with pytest.raises(TernkitError, match="q, k, v"):
        mlstm_recurrent_step(q, k, v, i, f)
    _, (C, n, m) = mlstm_chunkwise(q, k, v, i, f, return_final_state=True)
    with pytest.raises(TernkitError, match="state"):
        mlstm_chunkwise(q, k, v, i, f, initial_state=(C, n, m[:1]))
    with pytest.raises(TernkitError, match="state"):
        mlstm_recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], state=(C, n))


@pytest.mark.parametrize("mode", MODES)
def test_stabilizer_slack_computes_the_same_h_and_skips_most_decays(mode):
    # Where m sits is a choice of frame: a lazy stabilizer (decoding's) gives the same h as the exact
    # max, while the decay factor f' is exactly 1 on far more steps (the sparse write then skips C).
    q, k, v, i, f = (t.float() for t in make_inputs(200, seed=21))
    if mode == "ternary_decay":
        f = f.abs() + 1.0  # mostly kept: the decays are what the slack absorbs
    outs = {}
    for slack in (0.0, 10.0):
        state, hs, ones = None, [], 0
        for t in range(q.shape[2]):
            h, new = mlstm_recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state=state,
                                          gate_mode=mode, stabilizer_slack=slack)
            if state is not None:
                ones += int((new[2] == state[2] + (torch.nn.functional.logsigmoid(f[:, :, t]) if mode == "sigmoid"
                             else torch.nn.functional.logsigmoid(f[:, :, t].abs()) if mode == "ternary_decay"
                             else 0.0)).sum())
            state = new
            hs.append(h)
        outs[slack] = (torch.stack(hs, 2), ones)
        assert (state[2] <= i.amax() + 1e-6).all()
    # Equal up to the readout's eps, which acts in the frame of m (eps * exp(m) in true units): where
    # |n.q| falls below the exp(-m) floor the exact stabilizer carries a ~1e-3 relative eps term.
    torch.testing.assert_close(outs[10.0][0], outs[0.0][0], atol=1e-4, rtol=5e-3)
    assert outs[10.0][1] > outs[0.0][1]  # the stabilizer followed the decay on more steps
