"""Dead-zone statistics against hand-built tensors with known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ternkit.errors import TernkitError
from ternkit.quant.deadzone import DeadzoneStats, deadzone_stats, module_deadzone_stats

# w/alpha values placed away from every threshold (0.4, 0.5, 0.6, 1.5) and every 0.1 bin edge.
# Their |.| sums to 13 over 13 entries, so mean|r| = 1 and AbsMean alpha of c*R is c.
R = [0.0, 0.25, -0.45, 0.55, 0.95, -1.35, 0.65, -0.35, 1.15, 2.5, -3.0, 0.05, 1.75]
N = len(R)
# band 0.1 -> trits: -1 for -1.35 and -3.0; 0 for 0, .25, -.45, -.35, .05; +1 for the other 6.
FRAC_NEG, FRAC_ZERO, FRAC_POS = 2 / N, 5 / N, 6 / N
FRAC_BOUNDARY = 2 / N  # 0.45 and 0.55 lie in (0.4, 0.6)
FRAC_ZERO_INNER = 4 / N  # 0, .25, .35, .05 lie below 0.4 (the exact zero counts)
# |r| bins of width 0.1 over [0, 2], the last one also holding 2.5 and 3.0
HIST = [0] * 20
for _b in (0, 0, 2, 3, 4, 5, 6, 9, 11, 13, 17, 19, 19):
    HIST[_b] += 1


def _check_known(s: DeadzoneStats, n_copies: int = 1) -> None:
    assert s.numel == N * n_copies
    assert s.frac_neg == pytest.approx(FRAC_NEG)
    assert s.frac_zero == pytest.approx(FRAC_ZERO)
    assert s.frac_pos == pytest.approx(FRAC_POS)
    assert s.frac_boundary == pytest.approx(FRAC_BOUNDARY)
    assert s.frac_zero_inner == pytest.approx(FRAC_ZERO_INNER)


def test_default_alpha_is_absmean() -> None:
    w = 0.5 * torch.tensor(R)
    s = deadzone_stats(w)
    assert s.alpha == pytest.approx(0.5, rel=1e-6)
    _check_known(s)
    assert s.hist_counts == HIST
    assert s.kind == "float" and s.band == 0.1


def test_scalar_and_tensor_alpha() -> None:
    w = 2.0 * torch.tensor(R).reshape(1, N)
    for alpha in (2.0, torch.tensor(2.0), torch.full((1, 1), 2.0)):
        s = deadzone_stats(w, alpha=alpha)
        assert s.alpha == 2.0
        _check_known(s)
        assert s.hist_counts == HIST


def test_per_row_alpha() -> None:
    r = torch.tensor(R)
    w = torch.stack([1.0 * r, 4.0 * r, 0.25 * r])  # (3, N)
    alpha = torch.tensor([[1.0], [4.0], [0.25]])
    s = deadzone_stats(w, alpha=alpha)
    assert s.alpha == pytest.approx(1.75)  # mean of the per-row scales
    _check_known(s, n_copies=3)
    assert s.hist_counts == [3 * c for c in HIST]
    # the per-tensor AbsMean (mean|w| = 1.75) sees different trits: row 2 mostly zero, row 1 mostly +-1
    s_tensor = deadzone_stats(w)
    assert s_tensor.frac_zero != pytest.approx(FRAC_ZERO)


def test_band_width_changes_boundary() -> None:
    w = torch.tensor(R)
    s = deadzone_stats(w, band=0.2, alpha=1.0)  # (0.3, 0.7): .45, .55, .65, .35
    assert s.frac_boundary == pytest.approx(4 / N)
    assert s.frac_zero_inner == pytest.approx(3 / N)  # 0, .25, .05 below 0.3
    s0 = deadzone_stats(w, band=0.0, alpha=1.0)
    assert s0.frac_boundary == 0.0
    assert s0.frac_zero_inner == pytest.approx(FRAC_ZERO)  # |r| < 0.5 is exactly the zero trits here


def test_histogram_bins_and_edges() -> None:
    w = torch.tensor(R)
    s = deadzone_stats(w, alpha=1.0, bins=4)  # edges 0, .5, 1, 1.5, 2
    assert s.hist_edges == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert s.hist_counts == [5, 3, 2, 3]  # [0,.5): 0,.25,.45,.35,.05  [.5,1): .55,.95,.65  [1,1.5): 1.35,1.15
    assert sum(s.hist_counts) == N


def test_values_exactly_on_edges() -> None:
    # 0.5, 1, 1.5, 2 are exact in float32: bins are closed on the left, round() is half-to-even
    s = deadzone_stats(torch.tensor([0.5, -1.0, 1.5, 2.0]), alpha=1.0, bins=4)
    assert s.hist_counts == [0, 1, 1, 2]
    assert (s.frac_neg, s.frac_zero, s.frac_pos) == (1 / 4, 1 / 4, 2 / 4)  # 0.5 -> 0, 1.5 -> 2 -> clamped 1
    assert s.frac_boundary == 1 / 4 and s.frac_zero_inner == 0.0


def test_histogram_matches_floor_binning_on_random_weights() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    s = deadzone_stats(w, bins=20)
    r = (w / w.abs().mean()).abs()
    idx = torch.clamp((r * 10).floor().long(), max=19)
    assert s.hist_counts == torch.bincount(idx.reshape(-1), minlength=20).tolist()
    assert len(s.hist_edges) == 21 and s.hist_edges[0] == 0.0 and s.hist_edges[-1] == pytest.approx(2.0)
    assert s.frac_neg + s.frac_zero + s.frac_pos == pytest.approx(1.0)
    # Gaussian weights under AbsMean: |w|/alpha < 0.5 <=> |z| < 0.5*sqrt(2/pi) ~ 0.399 -> P ~ 0.31
    assert 0.27 < s.frac_zero < 0.35


def test_all_zero_weight_clamps_alpha() -> None:
    s = deadzone_stats(torch.zeros(4, 8))
    assert s.alpha == pytest.approx(1e-5)
    assert s.frac_zero == 1.0 and s.frac_zero_inner == 1.0 and s.frac_boundary == 0.0
    assert s.hist_counts[0] == 32


def test_to_dict_round_trips_fields() -> None:
    d = deadzone_stats(torch.tensor(R), alpha=1.0).to_dict()
    assert d["numel"] == N and d["frac_boundary"] == pytest.approx(FRAC_BOUNDARY)
    assert d["hist_counts"] == HIST and d["kind"] == "float"
    assert set(d) >= {"alpha", "frac_neg", "frac_zero", "frac_pos", "frac_zero_inner", "hist_edges"}


def test_errors() -> None:
    w = torch.randn(2, 5)
    with pytest.raises(TernkitError, match="does not broadcast"):
        deadzone_stats(w, alpha=torch.ones(3, 1))
    with pytest.raises(TernkitError, match="does not broadcast"):
        deadzone_stats(w, alpha=torch.ones(2, 5, 1))  # would broadcast w up to 3-D
    with pytest.raises(TernkitError, match="non-negative"):
        deadzone_stats(w, alpha=-1.0)
    with pytest.raises(TernkitError, match="band"):
        deadzone_stats(w, band=0.7)


class FakeTernaryLinear(nn.Module):
    """Stands in for TernaryLinear: latent float weight, per-row AbsMean scale."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def scale_of(self) -> torch.Tensor:
        return self.weight.abs().mean(dim=1, keepdim=True).clamp_min(1e-5)

    def ternary_weight(self) -> torch.Tensor:
        a = self.scale_of()
        return torch.round(self.weight / a).clamp(-1, 1) * a


class FakeGroupLayer(nn.Module):
    """Stands in for an integer-state group-scale layer: trits, int16 votes, flip threshold, group scales."""

    def __init__(self, trits: torch.Tensor, votes: torch.Tensor, scales: torch.Tensor, vote_threshold: int) -> None:
        super().__init__()
        self.register_buffer("_trits", trits.to(torch.int8))
        self.register_buffer("votes", votes.to(torch.int16))
        self.register_buffer("_scales", scales)
        self.vote_threshold = vote_threshold

    def trits(self) -> torch.Tensor:
        return self._trits

    def scales(self) -> torch.Tensor:
        return self._scales


def _group_layer(vote_threshold: int = 8) -> FakeGroupLayer:
    trits = torch.tensor([[1, 0, -1, 0], [0, 0, 1, -1]])
    votes = torch.tensor([[3, -5, 0, 1], [-4, 2, 7, -32768]])
    scales = torch.tensor([[0.5, 1.5], [1.0, 3.0]])
    return FakeGroupLayer(trits, votes, scales, vote_threshold)


def test_module_walk_finds_both_kinds() -> None:
    r = torch.tensor(R)
    model = nn.Sequential(
        FakeTernaryLinear(torch.stack([r, 3.0 * r])),  # per-row AbsMean = 1 and 3
        nn.ReLU(),
        nn.ModuleDict({"inner": _group_layer(), "dense": nn.Linear(3, 3)}),
    )
    stats = module_deadzone_stats(model)
    assert set(stats) == {"0", "2.inner"}

    f = stats["0"]
    assert f.kind == "float" and f.alpha == pytest.approx(2.0, rel=1e-6)
    _check_known(f, n_copies=2)
    assert f.hist_counts == [2 * c for c in HIST]

    g = stats["2.inner"]
    assert g.kind == "integer" and g.numel == 8
    assert g.alpha == pytest.approx(1.5)  # mean group scale
    assert (g.frac_neg, g.frac_zero, g.frac_pos) == (2 / 8, 4 / 8, 2 / 8)
    assert g.frac_boundary == 4 / 8  # |vote| >= 4: -5, -4, 7, -32768 (no int16 overflow)
    assert g.frac_zero_inner == 2 / 8  # zero trits with |vote| < 4: votes 1 and 2
    assert g.hist_counts is None and g.hist_edges is None


def test_module_walk_odd_threshold_and_root() -> None:
    g = module_deadzone_stats(_group_layer(vote_threshold=5))[""]  # half = 2
    assert g.frac_boundary == 6 / 8  # all but votes 0 and 1
    assert g.frac_zero_inner == 1 / 8  # the zero trit with vote 1
