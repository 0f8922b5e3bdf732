"""Sparse Ternary Covariance (STC) training rules: the ternary quantizer and the ternary forget gates.

All functions here are stateless forward/backward rules with straight-through gradients. The
inference-time memory write that skips the zero rows/columns of ``k v^T`` lives in
:mod:`ternkit.ops.stc_write`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ternkit.errors import TernkitError

__all__ = [
    "stc_quantize",
    "stc_quantize_vector",
    "ternary_gate",
    "ternary_decay_gate",
    "TERNARY_GATE_THRESHOLD",
]

#: |tanh(f~)| must exceed this for the ternary gate to be non-zero.
TERNARY_GATE_THRESHOLD = 0.5


def _stc_forward(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """alpha * sign(x) * [|x| > tau] per vector (last dim), alpha = mean |x| of the kept entries."""
    keep = x.abs() > tau
    count = keep.sum(dim=-1, keepdim=True)
    kept_abs = torch.where(keep, x.abs(), torch.zeros((), dtype=x.dtype, device=x.device))
    # clamp(min=1): a vector with no kept entries gets alpha = 0 instead of 0/0.
    alpha = kept_abs.sum(dim=-1, keepdim=True) / count.clamp(min=1).to(x.dtype)
    return torch.where(keep, alpha * torch.sign(x), torch.zeros((), dtype=x.dtype, device=x.device))


class _StraightThrough(torch.autograd.Function):
    """Forward ``quantize(x, arg)``; backward identity w.r.t. x (straight-through, zero region included)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, quantize: Callable[[torch.Tensor, Any], torch.Tensor],
                arg: Any) -> torch.Tensor:
        return quantize(x, arg)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad_out, None, None


def _straight_through(quantize: Callable[[torch.Tensor, Any], torch.Tensor], x: torch.Tensor, arg: Any) -> torch.Tensor:
    """``quantize(x, arg)`` with an identity gradient w.r.t. x; without autograd (decoding) the plain call."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return quantize(x, arg)  # the same numbers without the autograd.Function's overhead
    return _StraightThrough.apply(x, quantize, arg)


def stc_quantize(x: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Ternary-quantize x (..., DH) per vector to alpha * {-1, 0, +1}; same shape.

    Entries with ``|x| <= tau`` become 0; alpha is the mean |x| of the kept entries of each
    vector (the last dim), so a vector with no kept entry is all zero. ``tau`` is a scalar or a
    tensor broadcastable to x (e.g. a per-head threshold (NH,) viewed as (1, NH, 1, 1)); it gets
    no gradient. The gradient w.r.t. x is the identity everywhere (straight-through estimator),
    the zero region included, so zeroed entries keep learning.
    """
    if not torch.is_tensor(tau):
        tau = torch.tensor(float(tau), dtype=x.dtype, device=x.device)
    # A threshold given finer than x (float32 for bf16 keys) keeps its precision: the comparison
    # promotes x instead of rounding tau onto one of x's values.
    tau = tau.to(device=x.device) if torch.finfo(tau.dtype).bits >= torch.finfo(x.dtype).bits else tau.to(x.dtype)
    return _straight_through(_stc_forward, x, tau)


def _vector_forward(x: torch.Tensor, keep: int) -> torch.Tensor:
    """alpha * sign(x) on the ``keep`` largest |x| of each vector (last dim), 0 elsewhere; alpha = their mean |x|."""
    if keep <= 0:
        return torch.zeros_like(x)
    val, idx = x.abs().topk(min(keep, x.shape[-1]), dim=-1, sorted=False)
    # Exact zeros among the kept (a vector with fewer non-zeros than ``keep``) stay 0 and do not dilute alpha.
    nz = (val > 0).sum(dim=-1, keepdim=True).clamp(min=1)
    alpha = (val.float().sum(dim=-1, keepdim=True) / nz).to(x.dtype)
    return torch.zeros_like(x).scatter_(-1, idx, alpha * torch.sign(x.gather(-1, idx)))


def stc_quantize_vector(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Ternary-quantize x (..., DH) per vector, keeping its ``DH - round(sparsity * DH)`` largest |x|; same shape.

    Every vector keeps exactly that many entries, however small its norm (no token's key vanishes from
    the memory), as ``alpha * sign(x)`` with alpha the mean |x| of the kept entries (exact zeros among
    them stay 0 and are not counted); ties at the boundary are broken by ``topk``, so the count is
    exact in 16 bits too. One ``topk`` and a scatter: 2.3x faster than a threshold between two order
    statistics followed by a comparison, which was a tenth of a training step. The gradient w.r.t. x
    is the identity everywhere (straight-through), the zero region included.
    """
    d = x.shape[-1]
    return _straight_through(_vector_forward, x, d - int(round(sparsity * d)))


class _TernaryGate(torch.autograd.Function):
    """Forward sign(u) * [|u| > 0.5] with u = tanh(f~); backward d tanh / d f~ (straight-through)."""

    @staticmethod
    def forward(ctx: Any, f_preact: torch.Tensor) -> torch.Tensor:
        u = torch.tanh(f_preact)
        ctx.save_for_backward(u)
        # Built from comparisons, not u + (g - u).detach(): the values must be exactly -1, 0, +1
        # so that "keep" preserves the memory bit for bit and zeros are found by == 0.
        return torch.sign(u) * (u.abs() > TERNARY_GATE_THRESHOLD).to(u.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> torch.Tensor:
        (u,) = ctx.saved_tensors
        return grad_out * (1.0 - u * u)


def ternary_gate(f_preact: torch.Tensor) -> torch.Tensor:
    """Ternary forget gate g in {-1, 0, +1} from pre-activations f~ (any shape); same shape.

    g = sign(u) * [|u| > 0.5] with u = tanh(f~): +1 keeps the memory, 0 clears it, -1 negates
    it. The gradient is straight-through the tanh: d g / d f~ := 1 - tanh(f~)^2.
    """
    return _TernaryGate.apply(f_preact)


def ternary_decay_gate(f_preact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary-sign forget gate with a decaying magnitude: f~ (any shape) -> (t, log_a), both of f~'s shape.

    The gate is g = t * a with t = :func:`ternary_gate` (f~) in {-1, 0, +1} (sign and clear,
    straight-through the tanh) and a = sigmoid(|f~|), returned as log_a = logsigmoid(|f~|) with
    its exact gradient. Where t != 0 (|f~| > atanh(0.5) = 0.5493) a lies in (0.63, 1), so for
    f~ > 0.5493 the gate is exactly the sigmoid gate sigmoid(f~) (a model with xLSTM's forget
    bias linspace(3, 6) starts as its float twin and learns its decays with the twin's gradient),
    for f~ < -0.5493 it negates and decays by sigmoid(|f~|), in between it clears; a reaches 1
    only as |f~| -> inf, so unlike :func:`ternary_gate` nothing preserves the memory exactly.
    d g / d f~ = (1 - tanh(f~)^2) * a + t * d a / d f~. The pair is returned separately so that
    callers can keep the sign in linear space and the magnitude in log space (see
    :mod:`ternkit.ops.mlstm`).
    """
    return ternary_gate(f_preact), F.logsigmoid(f_preact.abs())
