"""mLSTM matrix-memory recurrence in three equivalent forms: recurrent (the definition), parallel and chunkwise.

Stabilized xLSTM equations (keys scaled by 1/sqrt(DH) inside the ops; states start at zero,
the stabilizer m at 0, as in NX-AI/xlstm and mlstm_kernels)::

    m_t = max(log f_t + m_{t-1}, i~_t)
    f'_t = exp(log f_t + m_{t-1} - m_t),   i'_t = exp(i~_t - m_t)
    C_t = f'_t C_{t-1} + i'_t k_t v_t^T,    n_t = f'_t n_{t-1} + i'_t k_t
    h_t = C_t^T q_t / (max(|n_t . q_t|, exp(min(-m_t, 60))) + eps)

The floor's exponent is capped at 60 nats: input gates that a model drives far negative (i~ < -88,
seen at lr 3e-3) would make exp(-m) overflow float32, and its gradient inf * 0 = NaN. Below the cap
the floor is already 1e26 against |n . q| of order 1, so h ~ 0 either way; all forms share it.

Gate modes:

- ``"sigmoid"``: log f_t = logsigmoid(f~_t).
- ``"ternary"``: the forget gate is g_t = ternary_gate(f~_t) in {-1, 0, +1} (+1 keep, 0 clear,
  -1 negate). log|g| is 0 or -inf and the sign rides separately: m_t = max(m_{t-1}, i~_t) where
  g != 0 and m_t = i~_t where g = 0, and f'_t = g_t * exp(m_{t-1} - m_t). Writing f' with g as a
  factor lets the straight-through gradient reach g in every form, also where g = 0 (the
  derivative of the memory w.r.t. g is then the memory that was cleared, capped: see below). The stabilizer m
  depends on g only through which gates are zero, so m carries no gradient to g. Keep (+1) with
  no write preserves the memory bit for bit.
- ``"ternary_decay"``: the forget gate is t_t * a_t with the sign t_t = ternary_gate(f~_t) as in
  ``"ternary"`` and the magnitude log a_t = logsigmoid(|f~_t|) (exact gradient; a in (0.63, 1)
  wherever t != 0), from :func:`ternkit.ops.stc.ternary_decay_gate`. It is the ternary branch
  with log a added where the memory survives: m_t = max(log a_t + m_{t-1}, i~_t) where t != 0,
  m_t = i~_t where t = 0, and f'_t = t_t * exp(log a_t + m_{t-1} - m_t) (``"ternary"`` is
  log a = 0). For f~ > 0.5493 this is exactly the sigmoid gate sigmoid(f~), for f~ < -0.5493 it
  negates and decays by sigmoid(|f~|), in between it clears. There is no exact preserve: a -> 1
  only as f~ -> inf (the stabilized C can still come back unchanged, with the decay moved into
  m). m depends on log a, so here m does carry gradient to f~ (as in sigmoid mode), on top of the
  straight-through term: d g / d f~ = (1 - tanh(f~)^2) * a + t * d a / d f~.

Parallel and chunkwise reproduce the recurrent m_t exactly (the initial-state term included),
so all forms compute the same function and agree in forward and backward. In the ternary modes
the sign of the decay between positions s < t is prod_{r=s+1..t} t_r, exactly -1, 0 or +1: it is
computed in linear space with a cumulative product, whose autograd handles the zeros; only the
exp(i~) terms and, in ``"ternary_decay"``, the cumulative sum of log a (as log f in sigmoid
mode) go through the stabilized exponent.

The straight-through derivative w.r.t. a cleared gate t_r = 0 is the cleared memory seen in the
frame of step r, which carries the factor exp(log a_r + m_{r-1} - m_r) > 0 (log a = 0 in
``"ternary"``): it exceeds 1 exactly when the old memory was written more strongly than the new one,
and it is unbounded (a gap of 10 nats in i~ makes it 2e4). Its forward value is 0 (it multiplies
t_r = 0), so the exponent is capped at 0: the gradient sees the cleared memory at most as strong as
the new write. With the old cap of 30 nats these gradients reached 1e4-1e14 within 100 steps at 8
blocks and lr 3e-3 (global clipping then leaves only their direction, and training diverged); with
the cap at 0 the largest per-tensor gradient norm stays below 4 on the same run. Keep gates
(exponent <= 0 by the max in m) are untouched. The parallel and chunkwise forms subtract the same
excess at the single zero on a path, so all forms still agree exactly, gradients included.

float16/bfloat16 inputs are computed in float32 (cumulative gate sums and the stabilizer lose
too much in 16 bits); h comes back in the input dtype, states stay in float32.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

from ternkit.errors import TernkitError
from ternkit.ops.stc import ternary_decay_gate, ternary_gate
from ternkit.ops.stc_write import STAT_KEYS, stc_write

__all__ = [
    "GATE_MODES",
    "mlstm_recurrent_step",
    "mlstm_recurrent",
    "mlstm_parallel",
    "mlstm_chunkwise",
    "ternary_gate",
    "ternary_decay_gate",
]

GATE_MODES = ("sigmoid", "ternary", "ternary_decay")

# Cap on the exponent (log a_r +) m_{r-1} - m_r at a cleared gate (the only positive exponent): it only shapes the
# straight-through gradient (its forward factor multiplies t_r = 0); see the module doc.
_MAX_CLEARED_EXP = 0.0

# Cap on -m_t in the readout floor exp(-m_t): keeps it (and its gradient) finite in float32; see the module doc.
_MAX_FLOOR_EXP = 60.0

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_gate_mode(gate_mode: str) -> None:
    if gate_mode not in GATE_MODES:
        raise TernkitError(f"Unknown mLSTM gate_mode {gate_mode!r}; use one of {', '.join(GATE_MODES)}.")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
               rank: int, what: str) -> None:
    if q.dim() != rank or q.shape != k.shape or q.shape != v.shape:
        raise TernkitError(f"mLSTM {what} expects q, k, v of one shape with {rank} dims, got "
                           f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; reshape to heads first.")
    if i.shape != q.shape[:-1] or f.shape != q.shape[:-1]:
        raise TernkitError(f"mLSTM {what} expects gates i, f of shape {tuple(q.shape[:-1])}, "
                           f"got {tuple(i.shape)} and {tuple(f.shape)}.")


def _check_state(state: State | None, q: torch.Tensor) -> None:
    if state is None:
        return
    B, NH, DH = q.shape[0], q.shape[1], q.shape[-1]
    want = ((B, NH, DH, DH), (B, NH, DH), (B, NH))
    got = tuple(tuple(t.shape) for t in state)
    if got != want:
        raise TernkitError(f"mLSTM state must be (C, n, m) of shapes {want}, got {got}; "
                           "pass the state an mLSTM op returned.")


def _upcast(*ts: torch.Tensor) -> list[torch.Tensor]:
    """Tensors in at least float32: gates, stabilizer and memory lose too much in 16-bit floats."""
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in ts]


def _zero_state(q: torch.Tensor) -> State:
    """Zero (C, n, m) for q (B, NH, [S,] DH): C (B, NH, DH, DH), n (B, NH, DH), m (B, NH)."""
    B, NH, DH = q.shape[0], q.shape[1], q.shape[-1]
    C = q.new_zeros(B, NH, DH, DH)
    return C, q.new_zeros(B, NH, DH), q.new_zeros(B, NH)


def _readout(num: torch.Tensor, den: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    """h = num / (max(|den|, exp(min(-m, 60))) + eps); num (..., DH), den and m (...)."""
    floor = torch.exp((-m).clamp(max=_MAX_FLOOR_EXP))
    return num / (torch.maximum(den.abs(), floor) + eps).unsqueeze(-1)


# --------------------------------------------------------------------------- recurrent


def mlstm_recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: State | None = None,
    gate_mode: str = "sigmoid",
    eps: float = 1e-6,
    *,
    sparse_write: bool = False,
    stats: dict[str, int] | None = None,
    inplace: bool = False,
    stabilizer_slack: float = 0.0,
) -> tuple[torch.Tensor, State]:
    """One mLSTM step: q, k, v (B, NH, DH), gates i, f (B, NH) -> h (B, NH, DH), state (C, n, m).

    ``state`` is (C (B, NH, DH, DH), n (B, NH, DH), m (B, NH)) or None for zeros. ``i`` and ``f``
    are gate pre-activations. This step is the definition the other forms are tested against.

    ``sparse_write=True`` routes the memory write through :func:`ternkit.ops.stc_write.stc_write`
    (the compiled op, or its pure-torch twin), which touches only the nnz(k) x nnz(v) entries of
    C and skips the decay pass where f' = 1 (inference only: no autograd graph is recorded, so
    call it under ``torch.no_grad()``); it only pays off when k and v are STC-quantized. With
    ``inplace=True`` the fp32 C and n of ``state`` are updated in place and returned (the caller
    gives up the old state; decoding does), so a step costs no copy of C; the dense write does
    the same when autograd is off (decay, then ``addcmul_`` of ``(i' k) v^T``). If a
    ``stats`` dict is given, the write's counters ("total", "written", "decayed") are added to
    it, so one dict can accumulate over steps and layers; pass it to
    :func:`ternkit.ops.stc_write.skip_fraction`.

    ``stabilizer_slack`` > 0 (decoding) keeps the decayed stabilizer m_{t-1} + log f_t unless the
    input gate exceeds it by more than that many nats, instead of raising m to i~ at every such
    step. The decay factor f' is then exactly 1 on most steps, so the sparse write skips its decay
    pass; i' stays below exp(slack). h does not depend on where m sits (C, n and exp(-m) scale
    together) except through the readout's eps, which acts as eps * exp(m) in true units: with a
    lower m the eps term only shrinks, so decoded h can differ from the exact-stabilizer h by up to
    about eps * exp(m) / max(|n.q|, 1) relative (1e-3 at m ~ 7 where |n.q| is below the floor).
    """
    _check_gate_mode(gate_mode)
    _check_qkv(q, k, v, i, f, 3, "recurrent step")
    _check_state(state, q)
    if sparse_write and torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v, i, f) + (tuple(state) if state is not None else ())):
        raise TernkitError("mlstm_recurrent_step(sparse_write=True) is an inference path without gradients; "
                           "run it under torch.no_grad() or use sparse_write=False for training.")
    out_dtype = q.dtype
    q, k, v, i, f = _upcast(q, k, v, i, f)
    C, n, m = _zero_state(q) if state is None else _upcast(*state)
    k = k * (q.shape[-1] ** -0.5)

    def stabilize(m_decayed: torch.Tensor) -> torch.Tensor:
        if stabilizer_slack <= 0:
            return torch.maximum(m_decayed, i)
        return torch.where(i > m_decayed + stabilizer_slack, i, m_decayed)

    if gate_mode == "sigmoid":
        log_f = F.logsigmoid(f)
        m_new = stabilize(log_f + m)
        f_scale = torch.exp(log_f + m - m_new)
    else:
        # Sign g in {-1, 0, +1}, magnitude log a; "ternary" is log a = 0, and skips the addition
        # (m + 0.0 would turn m = -0.0 into +0.0) so that keep stays bit for bit.
        if gate_mode == "ternary":
            g, m_decayed = ternary_gate(f), m
        else:
            g, log_a = ternary_decay_gate(f)
            m_decayed = log_a + m
        cleared = g.detach() == 0
        m_new = torch.where(cleared, i, stabilize(m_decayed))
        f_scale = g * torch.exp((m_decayed - m_new).clamp(max=_MAX_CLEARED_EXP))
    i_scale = torch.exp(i - m_new)

    if sparse_write:
        # contiguous() is a no-op for a decoding state; clone() keeps the caller's state when not in place.
        C_new, n_new = C.contiguous(), n.contiguous()
        if not inplace:
            C_new = C_new.clone() if C_new is C else C_new
            n_new = n_new.clone() if n_new is n else n_new
        counts = stc_write(C_new, n_new, k.contiguous(), v.contiguous(), i_scale.contiguous(), f_scale.contiguous())
        if stats is not None:
            for key in STAT_KEYS:
                stats[key] = stats.get(key, 0) + counts[key]
    elif inplace and not torch.is_grad_enabled():
        # Dense decoding: two passes over C in place instead of three new (B, NH, DH, DH) temporaries.
        C_new = C.mul_(f_scale[..., None, None]).addcmul_((i_scale.unsqueeze(-1) * k).unsqueeze(-1), v.unsqueeze(-2))
        n_new = n.mul_(f_scale.unsqueeze(-1)).add_(i_scale.unsqueeze(-1) * k)
    else:
        C_new = f_scale[..., None, None] * C + i_scale[..., None, None] * (k.unsqueeze(-1) * v.unsqueeze(-2))
        n_new = f_scale.unsqueeze(-1) * n + i_scale.unsqueeze(-1) * k

    num = (q.unsqueeze(-2) @ C_new).squeeze(-2)
    den = (n_new * q).sum(-1)
    return _readout(num, den, m_new, eps).to(out_dtype), (C_new, n_new, m_new)


def mlstm_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    gate_mode: str = "sigmoid",
    initial_state: State | None = None,
    return_final_state: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor | tuple[torch.Tensor, State]:
    """mLSTM over a sequence by looping the step: q, k, v (B, NH, S, DH), i, f (B, NH, S) -> h (B, NH, S, DH).

    With ``return_final_state`` also returns the state (C, n, m) after the last token.
    """
    _check_gate_mode(gate_mode)
    _check_qkv(q, k, v, i, f, 4, "recurrent")
    _check_state(initial_state, q)
    state = initial_state
    hs = []
    for t in range(q.shape[2]):
        h, state = mlstm_recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t],
                                        state=state, gate_mode=gate_mode, eps=eps)
        hs.append(h)
    if hs:
        h_all = torch.stack(hs, dim=2)
    else:
        h_all = q.new_zeros(q.shape)
    if not return_final_state:
        return h_all
    return h_all, (_zero_state(_upcast(q)[0]) if state is None else state)


# --------------------------------------------------------------------------- block (parallel) form


class _SignProducts(torch.autograd.Function):
    """P[t, s] = prod_{r=s+1..t} g_r (s <= t, else 0) for signs g (..., L) in {-1, 0, +1}, with its exact gradient.

    The forward counts zeros and negative signs on each path instead of multiplying; the backward
    is the closed form of the product rule for such g: d P[t, s] / d g_r (s < r <= t) is P[t, s] * g_r
    on a path without zeros and, on a path whose only zero is g_r, the sign of the other factors;
    0 otherwise. Summing G[t, s] over the rectangle s < r <= t takes one prefix sum along s and one
    masked sum along t per case, where torch's cumprod backward (exact too) is a slow path for
    inputs with zeros: it was two fifths of the ternary chunkwise op's fwd + bwd.
    """

    @staticmethod
    def forward(ctx: Any, g: torch.Tensor, path_zeros: torch.Tensor) -> torch.Tensor:
        L = g.shape[-1]
        zeros = g == 0
        cn = torch.cumsum(g < 0, dim=-1, dtype=torch.int32)
        odd = ((cn.unsqueeze(-1) - cn.unsqueeze(-2)) & 1).to(g.dtype)
        sign = 1.0 - 2.0 * odd  # sign of the non-zero factors on (s, t]
        lower = torch.ones(L, L, dtype=torch.bool, device=g.device).tril()
        ctx.save_for_backward(g, zeros, path_zeros, sign)
        return torch.where(lower & (path_zeros == 0), sign, torch.zeros((), dtype=g.dtype, device=g.device))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        g, zeros, path_zeros, sign = ctx.saved_tensors
        L = g.shape[-1]
        strict = torch.ones(L, L, dtype=torch.bool, device=g.device).tril(-1)
        gs = grad * sign

        def rectangle(mask: torch.Tensor) -> torch.Tensor:
            # R[r] = sum over t >= r and s < r of M[t, s], M = gs on ``mask`` (s < t there): exclusive prefix along s,
            # then the rows t >= r of column r.
            m = torch.where(mask, gs, torch.zeros((), dtype=gs.dtype, device=gs.device))
            before = torch.cumsum(m, dim=-1) - m
            return torch.where(strict | torch.eye(L, dtype=torch.bool, device=g.device), before,
                               torch.zeros((), dtype=gs.dtype, device=gs.device)).sum(-2)

        live = rectangle(strict & (path_zeros == 0))
        once = rectangle(strict & (path_zeros == 1))
        return torch.where(zeros, once, g * live), None


def _segment_products(g: torch.Tensor, path_zeros: torch.Tensor) -> torch.Tensor:
    """P (..., L, L) with P[t, s] = prod_{r=s+1..t} g_r for s <= t and 0 above the diagonal; g (..., L) in {-1, 0, +1}.

    ``path_zeros`` (..., L, L): the number of zeros among g_{s+1..t} at [t, s] (the caller counts them
    anyway). Exact in forward and backward for ternary signs (:class:`_SignProducts`), the
    straight-through gradient to cleared gates (g_r = 0) included.
    """
    return _SignProducts.apply(g, path_zeros)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """x with -inf (a token with no live source) replaced by 0, so that no -inf - -inf can follow."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    gate_mode: str,
    block: int,
    state: State | None,
    eps: float,
) -> tuple[torch.Tensor, State]:
    """mLSTM over blocks of ``block`` tokens: q, k, v (B, NH, S, DH), i, f (B, NH, S) -> h (B, NH, S, DH), final state.

    Everything is computed in the frame of the recurrent stabilizer m_t. First m_t for every token
    (a max over live sources within the block and the incoming state; a loop over blocks on
    (B, NH) scalars carries m), then the causal weights of all blocks at once, then a loop over
    blocks that carries (C, n). The tail is padded with gates that leave the state untouched
    (decay exactly 1, i~ = -inf) and cut off again.
    """
    B, NH, S, DH = q.shape
    L = block
    out_dtype = q.dtype
    q, k, v, i, f = _upcast(q, k, v, i, f)
    NC = max(1, -(-S // L))
    pad = NC * L - S
    signed = gate_mode != "sigmoid"  # "ternary" and "ternary_decay": a sign g in {-1, 0, +1} in linear space
    k = k * (DH ** -0.5)
    # g: the sign (None in sigmoid mode); log_decay: log f, log a, or None for "ternary" (log a = 0,
    # whose additions are skipped so that its numbers stay bit for bit those of the pure sign path).
    if gate_mode == "sigmoid":
        g, log_decay = None, F.logsigmoid(f)
    elif gate_mode == "ternary":
        g, log_decay = ternary_gate(f), None
    else:
        g, log_decay = ternary_decay_gate(f)
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g = None if g is None else F.pad(g, (0, pad), value=1.0)
        log_decay = None if log_decay is None else F.pad(log_decay, (0, pad), value=0.0)
        i = F.pad(i, (0, pad), value=float("-inf"))
    q, k, v = (t.reshape(B, NH, NC, L, DH) for t in (q, k, v))
    i = i.reshape(B, NH, NC, L)
    g = None if g is None else g.reshape(B, NH, NC, L)
    log_decay = None if log_decay is None else log_decay.reshape(B, NH, NC, L)
    C, n, m = _zero_state(q) if state is None else _upcast(*state)

    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    neg_inf = torch.full((), float("-inf"), dtype=q.dtype, device=q.device)
    i_src = i.unsqueeze(-2)  # (B, NH, NC, 1, L): source s along the last dim
    if log_decay is not None:
        log_start = torch.cumsum(log_decay, dim=-1)  # log decay magnitude from the block start through t
        log_src = i_src + log_start.unsqueeze(-1) - log_start.unsqueeze(-2)  # i~_s + log decay s -> t
    else:
        log_src = i_src
    if signed:
        # Sign of the decay s -> t is P[t, s] in {-1, 0, +1}; count the zeros on each path to tell live (0),
        # cleared once (1: forward 0, gradient to that one gate) and cleared twice or more (no gradient).
        is_zero = g.detach() == 0
        zc = torch.cumsum(is_zero, dim=-1)
        path_zeros = zc.unsqueeze(-1) - zc.unsqueeze(-2)  # zeros in (s, t] at [t, s]
        P = _segment_products(g, path_zeros)
        from_start = torch.cumprod(g, dim=-1)  # sign of the decay from the block start through t
        mi = torch.where(causal & (path_zeros == 0), log_src, neg_inf).amax(dim=-1)
    else:
        log_src = torch.where(causal, log_src, neg_inf)
        mi = log_src.amax(dim=-1)
    mi = _finite_or_zero(mi)

    def m_after(m_in: torch.Tensor, c: int | slice) -> torch.Tensor:
        """m_t from the incoming stabilizer m_in of a block and the block's own live sources mi."""
        m_carried = m_in if log_decay is None else m_in + log_start[..., c, :]
        if signed:
            return torch.where(zc[..., c, :] == 0, torch.maximum(m_carried, mi[..., c, :]), mi[..., c, :])
        return torch.maximum(m_carried, mi[..., c, :])

    m_in_list = []
    for c in range(NC):
        m_in_list.append(m)
        m = m_after(m.unsqueeze(-1), c)[..., -1]
    m_in = torch.stack(m_in_list, dim=2).unsqueeze(-1)  # (B, NH, NC, 1)
    m_t = m_after(m_in, slice(None))  # (B, NH, NC, L)

    if signed:
        # Excess of the cleared-gate exponent over the cap, at the last zero at or before t: the
        # recurrent step clips exactly there, and every path with one zero passes that zero.
        m_prev = torch.cat([m_in, m_t[..., :-1]], dim=-1)
        if log_decay is not None:
            m_prev = log_decay + m_prev  # the step's log a_t + m_{t-1}
        excess = torch.relu(m_prev - m_t - _MAX_CLEARED_EXP)
        pos = torch.arange(L, device=q.device).expand_as(is_zero)
        last_zero = torch.cummax(torch.where(is_zero, pos, torch.full_like(pos, -1)), dim=-1).values
        excess_z = torch.gather(excess, -1, last_zero.clamp(min=0))
        expo = log_src - m_t.unsqueeze(-1) - torch.where(path_zeros == 1, excess_z.unsqueeze(-1), 0.0)
        D = P * torch.exp(torch.where(causal & (path_zeros <= 1), expo, neg_inf))
        s_expo = m_in - m_t if log_decay is None else m_in + log_start - m_t
        s_expo = s_expo - torch.where(zc == 1, excess_z, 0.0)
        s_scale = from_start * torch.exp(torch.where(zc <= 1, s_expo, neg_inf))
    else:
        D = torch.exp(log_src - m_t.unsqueeze(-1))
        s_scale = torch.exp(m_in + log_start - m_t)

    W = (q @ k.transpose(-1, -2)) * D  # (B, NH, NC, L, L)
    # Each block's own writes to its end state (in the frame of its last m_t), then carry (C, n).
    kw = k * D[..., -1, :].unsqueeze(-1)
    C_own, n_own = kw.transpose(-1, -2) @ v, kw.sum(-2)
    starts: list[tuple[torch.Tensor, torch.Tensor]] = []
    for c in range(NC):
        starts.append((C, n))
        carry = s_scale[..., c, -1]
        C = carry[..., None, None] * C + C_own[:, :, c]
        n = carry[..., None] * n + n_own[:, :, c]
    C_in = torch.stack([st[0] for st in starts], dim=2)  # (B, NH, NC, DH, DH)
    n_in = torch.stack([st[1] for st in starts], dim=2)  # (B, NH, NC, DH)

    num = W @ v + s_scale.unsqueeze(-1) * (q @ C_in)
    den = W.sum(-1) + s_scale * (q @ n_in.unsqueeze(-1)).squeeze(-1)
    h = _readout(num, den, m_t, eps).reshape(B, NH, NC * L, DH)[:, :, :S]
    return h.to(out_dtype), (C, n, m)


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    gate_mode: str = "sigmoid",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Parallel (quadratic) mLSTM from a zero state: q, k, v (B, NH, S, DH), i, f (B, NH, S) -> h (B, NH, S, DH).

    O(S^2) time and memory: the whole sequence is one block of the block form. It matches
    :func:`mlstm_recurrent` including the stabilizer m_t, whose initial-state term (m_0 = 0
    decayed to t) is part of the max.
    """
    _check_gate_mode(gate_mode)
    _check_qkv(q, k, v, i, f, 4, "parallel")
    return _blocks(q, k, v, i, f, gate_mode, max(1, q.shape[2]), None, eps)[0]


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    gate_mode: str = "sigmoid",
    chunk_size: int = 64,
    initial_state: State | None = None,
    return_final_state: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor | tuple[torch.Tensor, State]:
    """mLSTM in chunkwise form: q, k, v (B, NH, S, DH), i, f (B, NH, S) -> h (B, NH, S, DH) [, (C, n, m)].

    Any S: the tail is padded to a multiple of ``chunk_size`` with gates that leave the state
    untouched and cut off again, so the final state is that of the last real token. Within
    chunks the parallel form runs for all chunks at once; Python loops over chunks carry m and
    then (C, n) between them. O(S * chunk_size) memory for the intra-chunk weights.
    """
    _check_gate_mode(gate_mode)
    _check_qkv(q, k, v, i, f, 4, "chunkwise")
    _check_state(initial_state, q)
    try:
        block = operator.index(chunk_size)
    except TypeError:
        block = 0
    if isinstance(chunk_size, bool) or block < 1:
        raise TernkitError(f"mLSTM chunk_size must be a positive integer, got {chunk_size!r}.")
    h, state = _blocks(q, k, v, i, f, gate_mode, block, initial_state, eps)
    return (h, state) if return_final_state else h
