"""Sparse Ternary Covariance (STC) ops: the ternary quantizer, the ternary forget gates and the sparse memory write.

All functions here are stateless. ``stc_quantize``, ``ternary_gate`` and ``ternary_decay_gate``
are the forward/backward rules used in training (straight-through gradients); ``sparse_memory_write`` is the out-of-place
form of the inference-time write (``ternkit.ops.stc_write``) that skips the zero rows/columns of
``k v^T`` and the decay pass when the decay factor is exactly 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ternkit.errors import TernkitError

__all__ = [
    "stc_quantize",
    "ternary_gate",
    "ternary_decay_gate",
    "TERNARY_GATE_THRESHOLD",
    "sparse_memory_write",
    "skip_fraction",
    "STAT_KEYS",
]

#: |tanh(f~)| must exceed this for the ternary gate to be non-zero.
TERNARY_GATE_THRESHOLD = 0.5

#: Keys of the counter dict returned by :func:`sparse_memory_write`.
STAT_KEYS = ("total", "written", "decayed")


def _stc_forward(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """alpha * sign(x) * [|x| > tau] per vector (last dim), alpha = mean |x| of the kept entries."""
    keep = x.abs() > tau
    count = keep.sum(dim=-1, keepdim=True)
    kept_abs = torch.where(keep, x.abs(), torch.zeros((), dtype=x.dtype, device=x.device))
    # clamp(min=1): a vector with no kept entries gets alpha = 0 instead of 0/0.
    alpha = kept_abs.sum(dim=-1, keepdim=True) / count.clamp(min=1).to(x.dtype)
    return torch.where(keep, alpha * torch.sign(x), torch.zeros((), dtype=x.dtype, device=x.device))


class _STCQuantize(torch.autograd.Function):
    """Forward alpha * sign(x) * [|x| > tau]; backward identity (straight-through, zero region included)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return _stc_forward(x, tau)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_out, None


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
    tau = tau.to(dtype=x.dtype, device=x.device)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _stc_forward(x, tau)  # decoding: the same numbers without the autograd.Function's overhead
    return _STCQuantize.apply(x, tau)


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
    f~ > 0.5493 the gate is exactly the sigmoid gate sigmoid(f~), for f~ < -0.5493 it negates
    and decays by sigmoid(|f~|), in between it clears; a reaches 1 only as |f~| -> inf, so unlike
    :func:`ternary_gate` nothing preserves the memory exactly. d g / d f~ = (1 - tanh(f~)^2) * a +
    t * d a / d f~. The pair is returned separately so that callers can keep the sign in linear
    space and the magnitude in log space (see :mod:`ternkit.ops.mlstm`).
    """
    return ternary_gate(f_preact), F.logsigmoid(f_preact.abs())


@torch.no_grad()
def sparse_memory_write(
    C: torch.Tensor,
    n: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f_scale: torch.Tensor,
    i_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """One-token STC memory write: C (B, NH, DH, DH), n (B, NH, DH) -> C * f' + i' k v^T, n * f' + i' k, counts.

    ``k`` and ``v`` (B, NH, DH) are ternary-quantized (mostly zeros); ``f_scale`` and ``i_scale``
    (B, NH) are the stabilized decay f' and input scale i' of this step, all float32. For every
    (batch, head) only the nnz(k) x nnz(v) entries of C where k_r v_c can be non-zero are
    written, and the decay pass over C and n is skipped where f' == 1 exactly; the result equals
    the dense update bit for bit (see :mod:`ternkit.ops.stc_write` for the exact expressions).

    Inputs are not modified: this is the out-of-place form of
    :func:`ternkit.ops.stc_write.stc_write` (the compiled op or its twin) on copies of C and n.
    It records no autograd graph.

    Returns ``(C, n, stats)`` where stats = {"total": entries of C, "written": entries of C
    written, "decayed": entries of C rescaled} as Python ints (see :func:`skip_fraction`).
    """
    from ternkit.ops.stc_write import stc_write

    if C.dim() != 4 or C.shape[-1] != C.shape[-2]:
        raise TernkitError(f"sparse_memory_write expects C of shape (B, NH, DH, DH), got {tuple(C.shape)}.")
    B, NH, DH, _ = C.shape
    for name, t, shape in (("n", n, (B, NH, DH)), ("k", k, (B, NH, DH)), ("v", v, (B, NH, DH)),
                           ("f_scale", f_scale, (B, NH)), ("i_scale", i_scale, (B, NH))):
        if tuple(t.shape) != shape:
            raise TernkitError(f"sparse_memory_write expects {name} of shape {shape}, got {tuple(t.shape)}.")
    C_out = C.clone(memory_format=torch.contiguous_format)
    n_out = n.clone(memory_format=torch.contiguous_format)
    stats = stc_write(C_out, n_out, k.contiguous(), v.contiguous(), i_scale.contiguous(), f_scale.contiguous())
    return C_out, n_out, stats


def skip_fraction(stats: dict[str, int]) -> float:
    """Fraction of the dense memory-update work that the sparse write skipped, in [0, 1].

    A dense write touches every entry of C twice (decay pass, then the outer-product add), so
    the dense work is ``2 * total``; the sparse write did ``decayed + written``. Counters from
    several steps or layers can be summed key by key before calling this. Returns nan when
    ``total`` is 0.
    """
    missing = [key for key in STAT_KEYS if key not in stats]
    if missing:
        raise TernkitError(f"skip_fraction needs the counters {STAT_KEYS}, missing {missing}; "
                           "pass the stats dict returned by sparse_memory_write.")
    total = stats["total"]
    if total == 0:
        return float("nan")
    return 1.0 - (stats["decayed"] + stats["written"]) / (2.0 * total)
