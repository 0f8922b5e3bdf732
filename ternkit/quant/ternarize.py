"""Ternarizers with straight-through gradients: per-tensor AbsMean, per-row AbsMean, LSQ; 8-bit activations.

All functions return a tensor shaped like their input whose values are ``alpha * {-1, 0, +1}``
(or int8-grid values for activations) in the forward pass, and whose gradient is the
straight-through estimate described in each docstring.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ALPHA_MIN",
    "absmean_alpha",
    "per_row_alpha",
    "ternarize_with",
    "absmean_ternarize",
    "per_row_ternarize",
    "lsq_ternarize",
    "act_quant_8bit",
    "trits_of",
]

ALPHA_MIN = 1e-5


def absmean_alpha(w: torch.Tensor) -> torch.Tensor:
    """Per-tensor AbsMean scale of ``w`` (any shape) -> scalar tensor, mean|W| clamped at 1e-5 (BitNet b1.58)."""
    return w.abs().mean().clamp(min=ALPHA_MIN)


def per_row_alpha(w: torch.Tensor) -> torch.Tensor:
    """Per-row AbsMean scale of ``w`` (out, in) -> (out, 1), one alpha per output row, clamped at 1e-5."""
    return w.abs().mean(dim=-1, keepdim=True).clamp(min=ALPHA_MIN)


def ternarize_with(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``clamp(round(w / alpha), -1, 1) * alpha`` for ``w`` of any shape and broadcastable ``alpha``; identity gradient to ``w``.

    ``alpha`` is treated as a constant (detached): BitNet's STE passes the gradient straight
    through to the latent weight.
    """
    a = alpha.detach()
    wq = torch.clamp(torch.round(w / a), -1, 1) * a
    return w + (wq - w).detach()


def absmean_ternarize(w: torch.Tensor) -> torch.Tensor:
    """Per-tensor AbsMean ternarization of ``w`` (any shape), BitNet b1.58; backward is the identity."""
    return ternarize_with(w, absmean_alpha(w.detach()))


def per_row_ternarize(w: torch.Tensor) -> torch.Tensor:
    """Per-row AbsMean ternarization of ``w`` (out, in), one alpha per output row; backward is the identity."""
    return ternarize_with(w, per_row_alpha(w.detach()))


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Forward ``x``, backward ``g * grad`` (LSQ's step-size gradient scaling)."""
    return (x - x * g).detach() + x * g


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Forward ``round(x)``, backward identity."""
    return x + (torch.round(x) - x).detach()


def lsq_ternarize(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """LSQ ternarization (Esser et al.) of ``w`` (any shape) with learnable scalar ``alpha``, Q_N = Q_P = 1.

    Forward: ``round(clamp(w / alpha, -1, 1)) * alpha``. Backward: d/dw is 1 inside
    ``|w/alpha| < 1`` and 0 outside; d/dalpha is ``round(v) - v`` inside and ``sign(v)``
    outside (v = w/alpha), scaled by g = 1/sqrt(numel(w) * Q_P) = 1/sqrt(N).
    """
    g = 1.0 / math.sqrt(w.numel())
    s = _grad_scale(alpha, g)
    v = torch.clamp(w / s, -1.0, 1.0)
    return _round_ste(v) * s


def act_quant_8bit(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax 8-bit fake quantization of activations ``x`` (..., features); STE backward.

    Each token (last dim) is scaled by ``127 / max|x|`` (clamped at 1e-5), rounded, clamped to
    [-128, 127] and scaled back, as in BitNet b1.58.
    """
    scale = 127.0 / x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=ALPHA_MIN)
    xq = torch.clamp(torch.round(x * scale), -128, 127) / scale
    return x + (xq - x).detach()


def trits_of(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The trits ``clamp(round(w / alpha), -1, 1)`` of ``w`` as int8 (same shape), without gradient."""
    return torch.clamp(torch.round(w.detach() / alpha.detach()), -1, 1).to(torch.int8)
