"""In-place STC memory write ``C = f' C + i' k v^T``, ``n = f' n + i' k``: the compiled op and its pure-torch twin.

:func:`stc_write` is the one dispatch point: it runs ``torch.ops.ternkit.stc_write`` (C++ in
``ternkit/csrc/stc_write.cpp``, CUDA in ``ternkit/csrc/cuda/stc_write.cu``) when that op is built
for the tensors' device, else :func:`stc_write_reference`. Both modify ``C`` and ``n`` in place,
return the same counters as :func:`sparse_memory_write` (their out-of-place form) and give the same
numbers bit for bit:

* ``f' == 1``: only the entries ``C[r, c]`` with ``k_r != 0`` and ``v_c != 0`` are written, as
  ``C[r, c] + i' * (k_r * v_c)``, and ``n[r] + i' * k_r`` where ``k_r != 0``; every other entry
  keeps its bits (a ``-0.0`` stays ``-0.0``).
* ``f' != 1``: one pass over every entry, ``f' * C[r, c] + i' * (k_r * v_c)`` (and
  ``f' * n[r] + i' * k_r``), which is exactly the dense update; for ``f' == 0`` the decayed term
  is the constant ``+0.0`` (a fill), so a cleared memory holding inf/nan becomes finite.

"written" counts ``nnz(k) * nnz(v)`` per (batch, head) and "decayed" ``DK * DV`` per (batch, head)
with ``f' != 1`` (``nnz`` counts entries ``!= 0``, so nan counts as non-zero).
"""

from __future__ import annotations

import torch

from ternkit.errors import TernkitError
from ternkit.ops import compiled
__all__ = ["stc_write", "stc_write_reference", "compiled_available", "sparse_memory_write", "skip_fraction",
           "STAT_KEYS"]

#: Keys of the counter dict returned by :func:`stc_write` and :func:`sparse_memory_write`.
STAT_KEYS = ("total", "written", "decayed")

_OP = "stc_write"


def _fake(C, n, k, v, i_scale, f_scale):  # noqa: ANN001, ANN202 - signature fixed by the schema
    """Meta kernel of ``ternkit::stc_write``: the int64 (2,) counts."""
    return C.new_empty((2,), dtype=torch.int64)


_COMPILED = compiled.CompiledOp(_OP, _fake)


def compiled_available(device: torch.device | str = "cpu") -> bool:
    """True when ``torch.ops.ternkit.stc_write`` is built (compiling it on first call) and has a kernel for ``device``."""
    return _COMPILED.available(device)


def _check(C: torch.Tensor, n: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           i_scale: torch.Tensor, f_scale: torch.Tensor, fn: str) -> None:
    """Raise TernkitError unless the arguments follow the stc_write contract (shapes, float32, contiguous, one device)."""
    args = {"C": C, "n": n, "k": k, "v": v, "i_scale": i_scale, "f_scale": f_scale}
    for name, t in args.items():
        if not torch.is_tensor(t):
            raise TernkitError(f"{fn} expects {name} to be a torch.Tensor, got {type(t).__name__}.")
    if C.dim() != 4:
        raise TernkitError(f"{fn} expects C of shape (B, NH, DK, DV), got {tuple(C.shape)}; "
                           "pass the 4-D memory matrix.")
    B, NH, DK, DV = C.shape
    shapes = {"n": (B, NH, DK), "k": (B, NH, DK), "v": (B, NH, DV), "i_scale": (B, NH), "f_scale": (B, NH)}
    for name, shape in shapes.items():
        if tuple(args[name].shape) != shape:
            raise TernkitError(f"{fn} expects {name} of shape {shape} to match C {tuple(C.shape)}, "
                               f"got {tuple(args[name].shape)}.")
    for name, t in args.items():
        if t.dtype != torch.float32:
            raise TernkitError(f"{fn} expects {name} as float32, got {t.dtype}; convert it with .float().")
        if t.device != C.device:
            raise TernkitError(f"{fn} expects all tensors on C's device {C.device}, got {name} on {t.device}.")
        if not t.is_contiguous():
            raise TernkitError(f"{fn} expects {name} to be contiguous; call .contiguous() on it first.")
    if torch.is_grad_enabled() and any(t.requires_grad for t in args.values()):
        raise TernkitError(f"{fn} is an in-place inference write without gradients; "
                           "run it under torch.no_grad().")


def _stats(C: torch.Tensor, written: int, decayed: int) -> dict[str, int]:
    return dict(zip(STAT_KEYS, (int(C.numel()), int(written), int(decayed))))


@torch.no_grad()
def _reference_unchecked(C: torch.Tensor, n: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         i_scale: torch.Tensor, f_scale: torch.Tensor) -> dict[str, int]:
    B, NH, DK, DV = C.shape
    C3, n2 = C.view(B * NH, DK, DV), n.view(B * NH, DK)
    k2, v2 = k.reshape(B * NH, DK), v.reshape(B * NH, DV)
    i1, f1 = i_scale.reshape(B * NH), f_scale.reshape(B * NH)
    zero = torch.zeros((), dtype=C.dtype, device=C.device)

    keep = f1 == 1  # (BH,): these (b, h) skip the decay and write only the nz rows x nz cols
    fill = f1 == 0
    kz, vz = k2 != 0, v2 != 0
    # The same expressions, in the same order, as the compiled kernels: t = i' * (k_r * v_c),
    # decayed = f' * C (or +0 when f' == 0), result = decayed + t.
    t = i1[:, None, None] * (k2[:, :, None] * v2[:, None, :])
    decayed = torch.where(fill[:, None, None], zero, f1[:, None, None] * C3)
    decayed = torch.where(keep[:, None, None], C3, decayed)
    mask = ~keep[:, None, None] | (kz[:, :, None] & vz[:, None, :])
    C3.copy_(torch.where(mask, decayed + t, C3))

    tn = i1[:, None] * k2
    dn = torch.where(fill[:, None], zero, f1[:, None] * n2)
    dn = torch.where(keep[:, None], n2, dn)
    n2.copy_(torch.where(~keep[:, None] | kz, dn + tn, n2))

    nnz_k, nnz_v = kz.sum(-1), vz.sum(-1)
    written = int((nnz_k * nnz_v).sum())
    decayed_count = int((~keep).sum()) * DK * DV
    return _stats(C, written, decayed_count)


def stc_write_reference(C: torch.Tensor, n: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        i_scale: torch.Tensor, f_scale: torch.Tensor) -> dict[str, int]:
    """Pure-torch twin of the op: C (B, NH, DK, DV), n (B, NH, DK) <- f' C + i' k v^T, f' n + i' k in place; counts.

    ``k`` (B, NH, DK) and ``v`` (B, NH, DV) are the STC-quantized key and value (mostly exact
    zeros), ``i_scale`` and ``f_scale`` (B, NH) the stabilized input scale i' and decay f'. All
    float32, contiguous, on one device. Vectorized over (batch, head) (it materializes the dense
    update, so it saves no work; it defines the numbers the compiled kernels must reproduce bit
    for bit). Returns ``{"total", "written", "decayed"}`` as Python ints (see the module docstring
    and :func:`skip_fraction`).
    """
    _check(C, n, k, v, i_scale, f_scale, "stc_write_reference")
    return _reference_unchecked(C, n, k, v, i_scale, f_scale)


def stc_write(C: torch.Tensor, n: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              i_scale: torch.Tensor, f_scale: torch.Tensor) -> dict[str, int]:
    """In-place STC memory write: C (B, NH, DK, DV), n (B, NH, DK) <- f' C + i' k v^T, f' n + i' k; counts.

    Same arguments, result and numbers as :func:`stc_write_reference`; runs the compiled op
    ``torch.ops.ternkit.stc_write`` when it is built for C's device (only the nnz(k) x nnz(v)
    entries of C are touched where f' == 1, one fused pass where f' != 1), else the twin (with
    one warning per process saying why). Inference only: raises TernkitError if grad mode is on
    and an input requires grad. Returns ``{"total", "written", "decayed"}`` as Python ints.
    """
    # `C.is_cpu` / `C.is_cuda` instead of `C.device.type`: building a torch.device costs ~0.5 us.
    if type(C) is torch.Tensor and C.is_cpu:
        ok = _COMPILED.cache.get("cpu")
        if ok is None:
            ok = _COMPILED.available("cpu")
    elif torch.is_tensor(C):
        ok = _COMPILED.available(C.device)
    else:
        ok = False
    if not ok:
        _check(C, n, k, v, i_scale, f_scale, "stc_write")
        if C.device.type == "cuda" and compiled.load_op(_OP):
            compiled.warn_fallback_once(_OP + "[cuda]", "the library was built without CUDA")
        return _reference_unchecked(C, n, k, v, i_scale, f_scale)
    # Fast path (this runs once per token and layer): the C++ op validates shapes, dtypes,
    # contiguity and devices itself; only a failure pays for the Python check that names the problem.
    if torch.is_grad_enabled() and (C.requires_grad or n.requires_grad or getattr(k, "requires_grad", False)
                                    or getattr(v, "requires_grad", False) or getattr(i_scale, "requires_grad", False)
                                    or getattr(f_scale, "requires_grad", False)):
        _check(C, n, k, v, i_scale, f_scale, "stc_write")
    try:
        counts = _COMPILED.fn(C, n, k, v, i_scale, f_scale)
    except (RuntimeError, TypeError):
        _check(C, n, k, v, i_scale, f_scale, "stc_write")
        raise
    written, decayed = counts.tolist()
    return {"total": C.numel(), "written": written, "decayed": decayed}


@torch.no_grad()
def sparse_memory_write(
    C: torch.Tensor,
    n: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_scale: torch.Tensor,
    f_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """One-token STC memory write: C (B, NH, DH, DH), n (B, NH, DH) -> C * f' + i' k v^T, n * f' + i' k, counts.

    ``k`` and ``v`` (B, NH, DH) are ternary-quantized (mostly zeros); ``i_scale`` and ``f_scale``
    (B, NH) are the stabilized input scale i' and decay f' of this step (the order of :func:`stc_write`), all float32. For every
    (batch, head) only the nnz(k) x nnz(v) entries of C where k_r v_c can be non-zero are
    written, and the decay pass over C and n is skipped where f' == 1 exactly; the result equals
    the dense update bit for bit (see :mod:`ternkit.ops.stc_write` for the exact expressions).

    Inputs are not modified: this is the out-of-place form of
    :func:`stc_write` (the compiled op or its twin) on copies of C and n.
    It records no autograd graph.

    Returns ``(C, n, stats)`` where stats = {"total": entries of C, "written": entries of C
    written, "decayed": entries of C rescaled} as Python ints (see :func:`skip_fraction`).
    """
    if C.dim() != 4 or C.shape[-1] != C.shape[-2]:
        raise TernkitError(f"sparse_memory_write expects C of shape (B, NH, DH, DH), got {tuple(C.shape)}.")
    B, NH, DH, _ = C.shape
    for name, t, shape in (("n", n, (B, NH, DH)), ("k", k, (B, NH, DH)), ("v", v, (B, NH, DH)),
                           ("i_scale", i_scale, (B, NH)), ("f_scale", f_scale, (B, NH))):
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
