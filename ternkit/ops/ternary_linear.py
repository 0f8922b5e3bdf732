"""Ternary linear on packed weights: y (..., N) = x (..., K) @ (scale * T)^T (+ bias), T 2-bit packed.

``T`` is an (N, K) trit matrix packed by :func:`ternkit.quant.packing.pack_2bit` (uint8
(N, ceil(K/128)*32)); ``scale`` is float and comes in three shapes:

- per tensor: one element;
- per row: N elements, (N,) or (N, 1);
- per group: (N, G) with ``G = ceil(K / group_size)``, one scale for each run of ``group_size``
  consecutive input columns of a row (``group_size`` a positive multiple of 32; the last group
  may be short). ``group_size`` is 0 for the two other shapes.

Two activation modes, with the exact float formula that the twin (:func:`ternary_linear_reference`)
and the compiled kernels (``ternkit/csrc/ternary_linear.cpp``, ``csrc/cuda/ternary_linear.cu``)
share. Per tensor and per row count as a single group ``g = 0`` holding every column.

``act_bits=8`` (BitNet b1.58 activations, as :func:`ternkit.quant.ternarize.act_quant_8bit`)::

    s_x[m]     = 127 * (1 / max(max_k |x[m, k]|, 1e-5))   (float32; torch's ``127.0 / t``)
    q[m, k]    = clamp(round_half_even(x[m, k] * s_x[m]), -128, 127)   (int8)
    acc[m,n,g] = sum_{k in g} q[m, k] * T[n, k]                        (int32, exact)
    y[m, n]    = (sum_g float(acc[m, n, g]) * scale[n, g]) / s_x[m]

  where the sum over groups runs in order ``g = 0, 1, ...`` in float32, each product rounded
  before it is added (so a single group is exactly ``float(acc) * scale / s_x``).

``act_bits=None`` (or 0, float activations)::

    y[m, n] = sum_g (sum_{k in g} x[m, k] * T[n, k]) * scale[n, g]

  with the inner sums in float32 in an unspecified order (agreement ~1e-5 relative).

:func:`ternary_linear` runs the compiled op when it is built for the tensor's device and no
gradient is needed, otherwise the twin (which is differentiable w.r.t. ``x``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ternkit.errors import TernkitError
from ternkit.ops import compiled
from ternkit.quant.packing import packed_2bit_width, unpack_2bit

__all__ = ["ternary_linear", "ternary_linear_reference", "compiled_available", "ACT_AMAX_MIN"]

ACT_AMAX_MIN = 1e-5
"""Floor of the per-token absmax in the int8 activation scale (as ``act_quant_8bit``)."""

_OP = "ternary_linear"


def _check(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, in_features: int, group_size: int,
           act_bits: int | None, bias: torch.Tensor | None) -> tuple[int, int, int]:
    """Validate the arguments; returns (act_bits as 0 or 8, N, G)."""
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
        raise TernkitError(f"in_features must be a positive int, got {in_features!r}; pass the K the trits were packed from.")
    k = in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0 or group_size % 32:
        raise TernkitError(f"group_size must be 0 or a positive multiple of 32, got {group_size!r}; "
                           "use 0 for per-tensor or per-row scales.")
    if act_bits not in (None, 0, 8):
        raise TernkitError(f"act_bits must be None, 0 or 8, got {act_bits!r}; use 8 for int8 activations.")
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TernkitError("x must be a floating-point tensor of shape (..., in_features); convert it with .float().")
    if x.dim() == 0 or x.shape[-1] != k:
        got = "a 0-d tensor" if x.dim() == 0 else f"last dim {x.shape[-1]}"
        raise TernkitError(f"x has {got} but in_features is {k}; pass x of shape (..., {k}).")
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2 or w_packed.shape[1] != packed_2bit_width(k):
        raise TernkitError(f"w_packed must be uint8 (N, {packed_2bit_width(k)}) for in_features={k}, got "
                           f"{w_packed.dtype} {tuple(w_packed.shape)}; pack the (N, {k}) trits with pack_2bit.")
    n = w_packed.shape[0]
    if not scale.is_floating_point():
        raise TernkitError(f"scale must be a float tensor, got {scale.dtype}; pass the float alpha of the layer.")
    if group_size:
        g = -(-k // group_size)
        if tuple(scale.shape) != (n, g):
            raise TernkitError(f"group_size={group_size} needs scale of shape ({n}, {g}), got {tuple(scale.shape)}; "
                               "pass one scale per row and group, or group_size=0 for per-tensor/per-row scales.")
    else:
        g = 1
        ok = scale.numel() == 1 or (scale.numel() == n and tuple(scale.shape) in ((n,), (n, 1)))
        if not ok:
            raise TernkitError(f"scale of shape {tuple(scale.shape)} fits neither per tensor (1 element) nor per row "
                               f"(({n},) or ({n}, 1)); pass group_size for per-group scales.")
    if scale.device != w_packed.device or x.device != w_packed.device:
        raise TernkitError(f"x ({x.device}), w_packed ({w_packed.device}) and scale ({scale.device}) are on different "
                           "devices; move them to one device.")
    if bias is not None and (bias.numel() != n or bias.device != x.device):
        raise TernkitError(f"bias must have {n} elements on {x.device}, got {tuple(bias.shape)} on {bias.device}; "
                           "pass one bias per output row.")
    return (8 if act_bits == 8 else 0), n, g


def _scale_2d(scale: torch.Tensor, n: int, g: int) -> torch.Tensor:
    """scale as float32 (N, G), per-tensor and per-row broadcast to one group."""
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return s.reshape(1, 1).expand(n, 1)
    return s.reshape(n, g)


def ternary_linear_reference(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, in_features: int, *,
                             group_size: int = 0, act_bits: int | None = None,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch twin: y (..., N) in x.dtype from x (..., K), packed trits uint8 (N, ceil(K/128)*32) and scale.

    Computes the formula of the module docstring (the int8 path is exact: integer sums in
    float64, then float32 products and sums group by group). Unpacks the trits on every call.
    """
    bits, n, g = _check(x, w_packed, scale, in_features, group_size, act_bits, bias)
    k = in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).to(torch.float32)
    t = unpack_2bit(w_packed, k)
    sc = _scale_2d(scale, n, g)
    gs = group_size if group_size else k
    if bits == 8:
        s_x = 127.0 / x2.detach().abs().amax(dim=-1, keepdim=True).clamp(min=ACT_AMAX_MIN)
        q = torch.clamp(torch.round(x2.detach() * s_x), -128, 127).to(torch.float64)
        tq = t.to(torch.float64)
        y = None
        for j in range(g):
            sl = slice(j * gs, min((j + 1) * gs, k))
            acc = (q[:, sl] @ tq[:, sl].T).to(torch.float32)  # exact: |partial sums| <= 128 * K < 2**53
            part = acc * sc[:, j]
            y = part if y is None else y + part
        y = y / s_x
    else:
        tf = t.to(torch.float32)
        if g == 1:
            y = F.linear(x2, tf) * sc[:, 0]
        else:
            y = None
            for j in range(g):
                sl = slice(j * gs, min((j + 1) * gs, k))
                part = F.linear(x2[:, sl], tf[:, sl]) * sc[:, j]
                y = part if y is None else y + part
    if bias is not None:
        y = y + bias.reshape(n).to(torch.float32)
    return y.reshape(*lead, n).to(x.dtype)


def _fake(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, in_features: int, group_size: int,
          act_bits: int) -> torch.Tensor:
    """Meta kernel of ``ternkit::ternary_linear``: y (M, N) for x (M, K) and w_packed (N, ...)."""
    torch._check(x.dim() == 2 and x.shape[1] == in_features)
    torch._check(w_packed.dim() == 2)
    return x.new_empty((x.shape[0], w_packed.shape[0]))


_COMPILED = compiled.CompiledOp(_OP, _fake)


def compiled_available(device: torch.device | str = "cpu") -> bool:
    """True when the compiled ``ternkit::ternary_linear`` is built (built on first call) and has a kernel for ``device``."""
    return _COMPILED.available(device)


def ternary_linear(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, in_features: int, *,
                   group_size: int = 0, act_bits: int | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (..., N) in x.dtype = x (..., K) @ (scale * T)^T (+ bias) with T packed 2-bit uint8 (N, ceil(K/128)*32).

    ``scale``: 1 element, N elements ((N,) or (N, 1)), or (N, ceil(K/group_size)) with
    ``group_size`` a positive multiple of 32. ``act_bits``: None/0 float activations, 8 per-token
    int8 (see the module docstring for the exact formula). Uses the compiled op when built for
    x's device and no gradient is needed, else :func:`ternary_linear_reference`.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if (needs_grad or x.numel() == 0 or act_bits not in (None, 0, 8) or not torch.is_tensor(x)
            or not compiled_available(x.device.type)):
        return ternary_linear_reference(x, w_packed, scale, in_features, group_size=group_size, act_bits=act_bits,
                                        bias=bias)
    # Decoding calls this tens of times per token at batch 1, where Python checks cost as much as
    # the kernel: the op checks its arguments itself, and only a refusal runs _check for the sentence.
    lead = x.shape[:-1]
    try:
        x2 = x.reshape(-1, in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.to(torch.float32).contiguous()
        sc = scale if scale.dtype == torch.float32 and scale.is_contiguous() else scale.to(torch.float32).contiguous()
        y = _COMPILED.fn(x2, w_packed.contiguous(), sc, in_features, group_size, 8 if act_bits == 8 else 0)
        n = y.shape[1]
        if bias is not None:
            y = y + bias.reshape(n).to(torch.float32)
    except (RuntimeError, TypeError):
        _check(x, w_packed, scale, in_features, group_size, act_bits, bias)
        raise
    if len(lead) != 1:
        y = y.reshape(*lead, n)
    return y if x.dtype == torch.float32 else y.to(x.dtype)
