"""Dead-zone statistics: where a layer's trits sit relative to the rounding edges at |w/alpha| = 0.5.

A weight is a knife-edge ("trapped", in Tequila's words, arXiv 2509.23809) when ``|w/alpha|`` lies
within ``band`` of 0.5: the round-to-trit step can flip it on STE noise alone, so it contributes
mostly noise. :func:`deadzone_stats` measures that band for a float (latent) weight;
:func:`module_deadzone_stats` walks a model and also covers integer-state layers, which have no
float weight, using their flip votes instead (a weight at least half-way to its flip threshold
is the integer analogue of the knife-edge).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ternkit.errors import TernkitError

__all__ = ["DeadzoneStats", "deadzone_stats", "module_deadzone_stats"]

_ALPHA_MIN = 1e-5
_HIST_MAX = 2.0


@dataclass
class DeadzoneStats:
    """Trit assignment and knife-edge occupancy of one weight tensor; fractions are of ``numel``.

    ``kind`` is "float" (from a latent weight) or "integer" (from trits and votes).
    ``hist_counts[i]`` counts ``hist_edges[i] <= |w/alpha| < hist_edges[i+1]`` over [0, 2], the last bin
    also collecting everything ``>= 2``. Both are ``None`` for integer-state layers.
    """

    alpha: float
    numel: int
    frac_neg: float
    frac_zero: float
    frac_pos: float
    frac_boundary: float
    frac_zero_inner: float
    band: float
    kind: str = "float"
    hist_counts: list[int] | None = None
    hist_edges: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON-ready: floats, ints, lists, None)."""
        return asdict(self)


def _check_band(band: float) -> None:
    if not 0.0 <= band <= 0.5:
        raise TernkitError(f"dead-zone band must lie in [0, 0.5], got {band}; pick e.g. 0.1.")


def _resolve_alpha(w: Tensor, alpha: Tensor | float | None) -> Tensor:
    """alpha as a float32 tensor broadcastable to ``w``, clamped at 1e-5 like the AbsMean default."""
    if alpha is None:
        return w.abs().mean().clamp_min(_ALPHA_MIN) if w.numel() else torch.ones((), device=w.device)
    a = torch.as_tensor(alpha, dtype=torch.float32, device=w.device).detach()
    if a.numel() == 0 or not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise TernkitError("dead-zone alpha must be finite and non-negative; pass the layer's scale (e.g. module.scale_of()).")
    try:
        shape = torch.broadcast_shapes(a.shape, w.shape)
    except RuntimeError:
        shape = None
    if shape != w.shape:
        raise TernkitError(
            f"dead-zone alpha of shape {tuple(a.shape)} does not broadcast to the weight's {tuple(w.shape)}; "
            "pass a scalar or a per-row (out, 1) scale."
        )
    return a.clamp_min(_ALPHA_MIN)


@torch.no_grad()
def deadzone_stats(
    w: Tensor, band: float = 0.1, alpha: Tensor | float | None = None, bins: int = 20
) -> DeadzoneStats:
    """Dead-zone statistics of a float weight ``w`` (any shape, usually (out, in)) under scale ``alpha``.

    ``alpha`` defaults to per-tensor AbsMean ``mean|w|`` (clamped at 1e-5, as BitNet b1.58); it may be a
    float or any tensor broadcastable to ``w`` such as a per-row (out, 1) scale, whose mean is reported.
    Trits are ``clamp(round(w/alpha), -1, 1)``; ``frac_boundary`` counts ``||w/alpha| - 0.5| < band``
    and ``frac_zero_inner`` counts ``|w/alpha| < 0.5 - band`` (exact zeros included).
    """
    _check_band(band)
    if bins < 1:
        raise TernkitError(f"dead-zone histogram needs at least 1 bin, got {bins}; pass bins >= 1.")
    w = w.detach().float()
    a = _resolve_alpha(w, alpha)
    r = w / a
    q = torch.round(r).clamp_(-1.0, 1.0)
    mag = r.abs()
    n = w.numel()
    denom = float(max(n, 1))

    edges = torch.linspace(0.0, _HIST_MAX, bins + 1, dtype=torch.float32, device=w.device)
    # Inner edges with right=True give edges[i] <= x < edges[i+1]; everything >= edges[-2] lands in the last bin.
    idx = torch.bucketize(mag.reshape(-1), edges[1:-1], right=True)
    counts = torch.bincount(idx, minlength=bins)

    def frac(mask: Tensor) -> float:
        return int(mask.sum()) / denom

    return DeadzoneStats(
        alpha=float(a.mean()),
        numel=n,
        frac_neg=frac(q == -1),
        frac_zero=frac(q == 0),
        frac_pos=frac(q == 1),
        frac_boundary=frac((mag - 0.5).abs() < band),
        frac_zero_inner=frac(mag < 0.5 - band),
        band=float(band),
        hist_counts=[int(c) for c in counts.tolist()],
        hist_edges=[float(e) for e in edges.tolist()],
    )


@torch.no_grad()
def _integer_state_stats(m: nn.Module, band: float) -> DeadzoneStats:
    """Stats of an integer-state group-scale layer from its trits (out, in), votes (out, in) and scales (out, G)."""
    t = m.trits()
    votes = m.votes.to(torch.int32)  # int16 abs(-32768) would overflow
    half = int(m.vote_threshold) // 2
    n = t.numel()
    denom = float(max(n, 1))
    near = votes.abs() >= half
    scales = m.scales()

    def frac(mask: Tensor) -> float:
        return int(mask.sum()) / denom

    return DeadzoneStats(
        alpha=float(scales.float().mean()) if scales.numel() else 0.0,
        numel=n,
        frac_neg=frac(t == -1),
        frac_zero=frac(t == 0),
        frac_pos=frac(t == 1),
        frac_boundary=frac(near),
        frac_zero_inner=frac((t == 0) & ~near),
        band=float(band),
        kind="integer",
    )


def module_deadzone_stats(module: nn.Module, band: float = 0.1, bins: int = 20) -> dict[str, DeadzoneStats]:
    """Dead-zone statistics of every ternary layer in ``module``, keyed by ``named_modules`` name ("" = the root).

    Float layers (those with ``ternary_weight()``) use ``.weight`` and ``.scale_of()``. Integer-state
    layers (duck-typed: ``trits`` and ``votes``) use their trits, ``scales()`` for alpha, and count a
    weight as boundary when ``|vote| >= vote_threshold // 2``; they carry no histogram. ``band`` only
    applies to float layers.
    """
    _check_band(band)
    out: dict[str, DeadzoneStats] = {}
    for name, m in module.named_modules():
        if hasattr(m, "trits") and hasattr(m, "votes"):
            out[name] = _integer_state_stats(m, band)
        elif callable(getattr(m, "ternary_weight", None)):
            with torch.no_grad():
                alpha = m.scale_of()
            out[name] = deadzone_stats(m.weight, band=band, alpha=alpha, bins=bins)
    return out
