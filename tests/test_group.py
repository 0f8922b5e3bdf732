"""Tests of the integer-state group-scale layers (ternkit.modules.group)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ternkit.errors import TernkitError
from ternkit.modules.group import GroupTernaryLinear, TernaryRMSNorm, apply_integer_updates, integer_state_layers
from ternkit.quant.packing import pack_base3, unpack_base3

INT_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}


@pytest.fixture(autouse=True)
def _one_thread():
    # Hundreds of tiny updates are dominated by per-op overhead; extra threads only add contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _set_state(m: GroupTernaryLinear | TernaryRMSNorm, trits=None, exponent=None, corr=None, step=None) -> None:
    with torch.no_grad():
        if trits is not None:
            m.packed_trits.copy_(pack_base3(torch.as_tensor(trits, dtype=torch.int8)))
            m.refresh_trits_cache()
        if exponent is not None:
            m.exponent.copy_(torch.as_tensor(exponent, dtype=torch.int8))
        if corr is not None:
            m.corr_accum.copy_(torch.as_tensor(corr, dtype=torch.int64))
        if step is not None:
            m.step.fill_(step)


def _push(m, sign_grad) -> bool:
    """Apply one update as if sign(grad_w) == sign_grad (rows, cols)."""
    return m._apply_sign_sum(torch.as_tensor(sign_grad, dtype=torch.int32).view(m._rows, m._cols))


def test_state_is_integer_with_expected_names_and_shapes():
    m = GroupTernaryLinear(70, 6, group_size=32)
    sd = m.state_dict()
    assert set(sd) == {"packed_trits", "exponent", "corr_accum", "step", "votes"}
    assert all(v.dtype in INT_DTYPES for v in sd.values())
    assert sd["packed_trits"].dtype == torch.uint8 and sd["packed_trits"].shape == (math.ceil(70 * 6 / 5),)
    assert sd["exponent"].dtype == torch.int8 and sd["exponent"].shape == (6, 3)
    assert sd["corr_accum"].dtype == torch.int64 and sd["corr_accum"].shape == (6, 3)
    assert sd["step"].dtype == torch.int64 and sd["step"].shape == () and int(sd["step"]) == 0
    assert sd["votes"].dtype == torch.int8 and sd["votes"].shape == (6, 70)
    assert isinstance(m.vote_threshold, int)
    assert GroupTernaryLinear(8, 2, vote_bits=16).votes.dtype == torch.int16


def test_init_scale_and_trits():
    torch.manual_seed(0)
    m = GroupTernaryLinear(256, 128, group_size=32)
    t = m.trits()
    assert set(t.unique().tolist()) == {-1, 0, 1}
    frac_zero = (t == 0).float().mean().item()
    assert 0.25 < frac_zero < 0.38  # absmean threshold 0.5*gamma ~ 0.4 std -> ~31% zeros
    # E = round(log2(absmean)) with absmean = sqrt(2/pi)/sqrt(in) = 0.0499 -> -4
    assert (m.exponent == -4).all()


def test_effective_weight_matches_hand_formula():
    m = GroupTernaryLinear(5, 2, group_size=2, K=4.0)  # 3 groups, the last one short
    trits = [[1, -1, 0, 1, -1], [0, 1, 1, -1, 1]]
    exponent = [[-2, -3, 0], [1, -1, -4]]
    corr = [[3, -5, 0], [-12, 7, 1]]
    _set_state(m, trits, exponent, corr, step=3)
    expect = torch.zeros(2, 5, dtype=torch.float64)
    for i in range(2):
        for j in range(5):
            g = j // 2
            expect[i, j] = 2.0 ** (exponent[i][g] + 4.0 * corr[i][g] / (3 * 2)) * trits[i][j]
    torch.testing.assert_close(m.effective_weight().double(), expect, rtol=1e-6, atol=0)
    torch.testing.assert_close(m.scales().double()[1, 0], torch.tensor(2.0 ** (1 + 4.0 * -12 / 6), dtype=torch.float64))
    x = torch.randn(4, 5)
    torch.testing.assert_close(m(x), x @ expect.float().T, rtol=1e-5, atol=1e-6)
    # step == 0: no adjustment, whatever corr holds
    _set_state(m, step=0)
    torch.testing.assert_close(m.scales().double(), torch.tensor(exponent, dtype=torch.float64).exp2())


def test_packing_round_trip_of_state():
    torch.manual_seed(1)
    m = GroupTernaryLinear(23, 7, group_size=8, vote_threshold=1)
    assert torch.equal(unpack_base3(m.packed_trits, (7, 23)), m.trits())
    before = m.trits()
    _push(m, -torch.ones(7, 23))  # every vote +1 reaches the threshold: each trit steps up
    after = m.trits()
    assert torch.equal(after, (before + 1).clamp(-1, 1))
    assert torch.equal(unpack_base3(m.packed_trits, (7, 23)), after)
    fresh = GroupTernaryLinear(23, 7, group_size=8)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.trits(), after)


def test_votes_step_trits_one_place_and_reset():
    m = GroupTernaryLinear(3, 1, group_size=3, vote_threshold=3)
    _set_state(m, [[-1, 0, 1]])
    for k in range(2):
        _push(m, [[-1, -1, -1]])  # grad < 0 -> votes +1
        assert m.votes.tolist() == [[k + 1] * 3]
        assert m.trits().tolist() == [[-1, 0, 1]]
    _push(m, [[-1, -1, -1]])
    assert m.trits().tolist() == [[0, 1, 1]] and m.votes.tolist() == [[0, 0, 0]]
    for _ in range(3):
        _push(m, [[-1, 1, 0]])
    assert m.trits().tolist() == [[1, 0, 1]] and m.votes.tolist() == [[0, 0, 0]]


def test_no_gradient_means_no_update():
    m = GroupTernaryLinear(8, 4, group_size=4)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.apply_update() is False
    with torch.no_grad():
        m(torch.randn(2, 8))
    assert m.apply_update() is False
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def test_grad_accumulation_sums_signs_then_one_step():
    torch.manual_seed(2)
    m = GroupTernaryLinear(12, 5, group_size=4, vote_threshold=100)
    ref = GroupTernaryLinear(12, 5, group_size=4, vote_threshold=100)
    ref.load_state_dict(m.state_dict())
    signs = []
    for _ in range(3):
        x, target = torch.randn(6, 12), torch.randn(6, 5)
        F.mse_loss(m(x), target).backward()
        w = ref.effective_weight().requires_grad_(True)
        (gw,) = torch.autograd.grad(F.mse_loss(x @ w.T, target), w)
        signs.append(torch.sign(gw).to(torch.int32))
    assert m.apply_update() is True
    assert int(m.step) == 1
    total = sum(signs)
    _push(ref, total)
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    assert torch.equal(m.votes.to(torch.int32), -torch.sign(total))


@pytest.mark.parametrize("offset", [1, -1])
def test_scale_moves_the_way_that_lowers_the_loss(offset):
    torch.manual_seed(3)
    teacher = GroupTernaryLinear(32, 8, group_size=8)
    student = GroupTernaryLinear(32, 8, group_size=8, vote_bits=16, vote_threshold=10_000)  # trits frozen
    student.load_state_dict(teacher.state_dict())
    _set_state(student, exponent=teacher.exponent.to(torch.int16) + offset)
    x_eval = torch.randn(512, 32)
    with torch.no_grad():
        loss0 = F.mse_loss(student(x_eval), teacher(x_eval)).item()
    for _ in range(40):
        x = torch.randn(128, 32)
        F.mse_loss(student(x), teacher(x).detach()).backward()
        student.apply_update()
    with torch.no_grad():
        loss1 = F.mse_loss(student(x_eval), teacher(x_eval)).item()
    ratio = torch.log2(student.scales() / teacher.scales())
    # scale too big (offset +1) must shrink and too small must grow, towards the teacher
    assert (ratio.abs() < 0.35).all(), ratio
    assert loss1 < 0.1 * loss0
    assert torch.equal(student.trits(), teacher.trits())


def test_rebase_folds_octaves_into_exponent_within_one_rounding_step():
    m = GroupTernaryLinear(8, 3, group_size=4, K=3.0)
    step, gs, K = 5, 4, 3.0
    # adjustments: 3*c/20 -> 1.35, -2.4, 0.9 (only the first two leave [-1, 1])
    _set_state(m, exponent=[[-3, -3], [5, 8], [-24, 0]], corr=[[9, -16], [6, 7], [-30, 0]], step=step)
    before = torch.log2(m.scales().double())
    m._rebase(step)
    after = torch.log2(m.scales().double())
    assert m.exponent.tolist() == [[-2, -5], [5, 8], [-24, 0]]
    # row 1 col 1: E is already at the top (8) and row 2 col 0 at the bottom (-24): nothing moves
    assert m.corr_accum.tolist()[1] == [6, 7] and m.corr_accum[2, 0] == -30
    assert (after - before).abs().max().item() <= K / (2 * step * gs) + 1e-12
    assert (after - before).abs().max().item() > 0  # rounding really happened (3 does not divide 20)


def test_rebase_during_training_keeps_scale_continuous():
    m = GroupTernaryLinear(8, 2, group_size=8, vote_bits=16, vote_threshold=10_000, K=4.0)
    t = m.trits()
    prev = torch.log2(m.scales().double())
    e0 = m.exponent.clone()
    for i in range(60):
        _push(m, t)  # grad along T every step: the scale must keep shrinking
        now = torch.log2(m.scales().double())
        step = int(m.step)
        # each update moves the log2 scale by at most K * (1 + |mean|) / step, plus one rounding step
        assert ((now - prev) <= 1e-12).all()
        assert ((prev - now) <= 4.0 * 2 / step + 4.0 / (2 * step * 8) + 1e-9).all()
        prev = now
    assert (m.exponent.to(torch.int16) <= e0.to(torch.int16) - 3).all()
    assert (m.corr_accum.abs() <= int(m.step) * 8 / 4.0 + 1).all()  # rebased: |adjustment| <= ~1


def test_scale_still_moves_after_10k_steps():
    torch.manual_seed(4)
    m = GroupTernaryLinear(4, 1, group_size=4, vote_bits=16, vote_threshold=30_000, window=256)
    _set_state(m, [[1, -1, 1, 1]])
    t = m.trits()
    noise = torch.randint(-1, 2, (10_000, 1, 4), dtype=torch.int32)  # uncorrelated gradient signs
    for g in noise:
        m._apply_sign_sum(g)
    assert int(m.step) == 256
    s0 = torch.log2(m.scales().double()).item()
    for _ in range(100):
        _push(m, t)  # score +4 each step: shrink
    s1 = torch.log2(m.scales().double()).item()
    assert s0 - s1 > 1.0, (s0, s1)


def test_persistent_bytes_under_two_per_weight():
    m = GroupTernaryLinear(256, 64, group_size=32)
    n = 64 * 256
    expect = (math.ceil(n / 5) + n + 64 * 8 * (1 + 8) + 8) / n
    assert m.persistent_bytes() == pytest.approx(expect)
    assert m.persistent_bytes() <= 2.0
    assert GroupTernaryLinear(256, 64, group_size=32, vote_bits=16).persistent_bytes() == pytest.approx(expect + 1.0)


@pytest.mark.parametrize("act_bits", [None, 8])
def test_grad_flows_to_input(act_bits):
    torch.manual_seed(5)
    m = GroupTernaryLinear(16, 4, group_size=8, act_bits=act_bits)
    x = torch.randn(3, 2, 16, requires_grad=True)
    y = m(x)
    assert y.shape == (3, 2, 4)
    y.sum().backward()
    torch.testing.assert_close(x.grad, m.effective_weight().sum(0).expand(3, 2, 16))
    assert m._sign_sum is not None and m._sign_sum.abs().sum() > 0


def test_act_quant_8bit_rounds_activations():
    m = GroupTernaryLinear(16, 4, group_size=8, act_bits=8)
    x = torch.randn(5, 16)
    scale = 127.0 / x.abs().amax(-1, keepdim=True)
    xq = torch.round(x * scale).clamp(-128, 127) / scale
    torch.testing.assert_close(m(x), xq @ m.effective_weight().T)


def test_state_dict_save_load_gives_identical_outputs():
    torch.manual_seed(6)
    m = GroupTernaryLinear(24, 6, group_size=8, vote_threshold=2)
    for _ in range(5):
        m(torch.randn(16, 24)).pow(2).mean().backward()
        m.apply_update()
    assert int(m.step) == 5
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(99)
    fresh = GroupTernaryLinear(24, 6, group_size=8, vote_threshold=2)
    assert not torch.equal(fresh.trits(), m.trits())
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(4, 24)
    assert torch.equal(fresh(x), m(x))
    assert torch.equal(fresh.trits(), m.trits())


def _ternary_teacher(seed: int) -> GroupTernaryLinear:
    g = torch.Generator().manual_seed(1000 + seed)
    teacher = GroupTernaryLinear(64, 32, group_size=16)
    trits = torch.randint(-1, 2, (32, 64), generator=g, dtype=torch.int8)
    # fractional group scales: E from the init, adjustment K * c / 16 with c in [-8, 8]
    _set_state(teacher, trits, corr=torch.randint(-8, 9, (32, 4), generator=g), step=1)
    return teacher


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_student_recovers_ternary_teacher(seed):
    teacher = _ternary_teacher(seed)
    torch.manual_seed(seed)
    student = GroupTernaryLinear(64, 32, group_size=16, K=4.0, vote_threshold=12)
    x_eval = torch.randn(2048, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y_eval = teacher(x_eval)
        loss0 = F.mse_loss(student(x_eval), y_eval).item()
        agree0 = (student.trits() == teacher.trits()).float().mean().item()
    for _ in range(250):
        x = torch.randn(256, 64)
        F.mse_loss(student(x), teacher(x).detach()).backward()
        student.apply_update()  # the only learning mechanism: no optimizer, no float parameter
    with torch.no_grad():
        loss1 = F.mse_loss(student(x_eval), y_eval).item()
    agree = (student.trits() == teacher.trits()).float().mean().item()
    assert agree0 < 0.5
    assert agree >= 0.90, agree
    assert loss1 <= loss0 / 10, (loss0, loss1)
    assert list(student.parameters()) == []
    assert all(v.dtype in INT_DTYPES for v in student.state_dict().values())


def test_rmsnorm_starts_as_plain_rmsnorm_and_is_integer():
    n = TernaryRMSNorm(12, group_size=4)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(n(x), F.rms_norm(x, (12,), eps=1e-6))
    sd = n.state_dict()
    assert set(sd) == {"packed_trits", "exponent", "corr_accum", "step", "votes"}
    assert all(v.dtype in INT_DTYPES for v in sd.values())
    assert n.exponent.shape == (3,) and n.votes.shape == (12,) and n.trits().tolist() == [1] * 12
    assert n.scales().shape == (3,)


def test_rmsnorm_learns_a_target_gain():
    torch.manual_seed(8)
    target = TernaryRMSNorm(8, group_size=4)
    _set_state(target, [1, 1, -1, 1, 1, 0, 1, 1], exponent=[0, -1], corr=[2, 1], step=1)  # gains 2^0.5, 2^-0.75
    n = TernaryRMSNorm(8, group_size=4, vote_threshold=4)
    for _ in range(150):
        x = torch.randn(64, 8)
        F.mse_loss(n(x), target(x).detach()).backward()
        n.apply_update()
    assert n.trits().tolist() == target.trits().tolist()
    ratio = torch.log2(n.scales() / target.scales())
    assert (ratio.abs() < 0.15).all(), ratio


def test_apply_integer_updates_counts_every_layer_with_apply_update():
    class Foreign(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def apply_update(self) -> None:
            self.calls += 1

    torch.manual_seed(9)
    model = nn.Sequential(GroupTernaryLinear(8, 8, group_size=4), TernaryRMSNorm(8, group_size=4),
                          nn.ReLU(), GroupTernaryLinear(8, 2, group_size=4), Foreign())
    assert len(integer_state_layers(model)) == 4
    model[:4](torch.randn(5, 8)).pow(2).sum().backward()
    assert apply_integer_updates(model) == 4
    assert model[4].calls == 1
    assert [int(model[i].step) for i in (0, 1, 3)] == [1, 1, 1]


def test_load_float_weight_ternarizes_per_group():
    m = GroupTernaryLinear(4, 2, group_size=2)
    w = torch.tensor([[0.5, -0.1, 0.0, 2.0], [-0.3, 0.3, 1.0, -1.0]])
    m.load_float_weight(w)
    # group absmeans 0.3, 1.0 / 0.3, 1.0 -> E = round(log2) = -2, 0
    assert m.trits().tolist() == [[1, 0, 0, 1], [-1, 1, 1, -1]]
    assert m.exponent.tolist() == [[-2, 0], [-2, 0]]
    assert int(m.step) == 0 and int(m.corr_accum.abs().sum()) == 0


@pytest.mark.parametrize("kwargs", [dict(bias=True), dict(vote_bits=4), dict(vote_threshold=2.5),
                                    dict(vote_threshold=200), dict(act_bits=4), dict(group_size=0),
                                    dict(window=0), dict(K=-1.0)])
def test_bad_arguments_raise_ternkit_error(kwargs):
    with pytest.raises(TernkitError):
        GroupTernaryLinear(8, 4, **kwargs)
