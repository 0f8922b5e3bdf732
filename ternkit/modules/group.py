"""Integer-state ternary layers: trits times per-group power-of-two scales refined by int64 accumulators.

Every persistent buffer is an integer. For a weight of shape (rows, cols) split into groups of
``group_size`` consecutive columns (``n_groups = ceil(cols / group_size)``, the last group may be short):

- ``packed_trits`` uint8 (ceil(rows*cols/5),): the trits T in base-3, 5 per byte (1.6 bits);
- ``exponent`` int8 (rows, n_groups): base log2 scale E of each group;
- ``corr_accum`` int64 (rows, n_groups): running sum of ``-score`` where
  ``score = sum_group sign(grad_w) * T`` (gradient/trit correlation);
- ``step`` int64 scalar: number of updates that count in ``corr_accum`` (capped at ``window``);
- ``votes`` int8 or int16 (rows, cols): per-weight flip votes, ``-sign(grad_w)`` summed.

The effective weight is ``w = 2 ** (E + K * corr_accum / (step * group_size)) * T`` (no adjustment
while ``step == 0``). It exists only as an ephemeral float tensor inside ``forward``; a hook on it
captures ``sign(grad_w)`` and :meth:`apply_update` turns the (all-reduced) sign sums into integer
updates once per optimizer step. There is no float shadow weight and no optimizer involvement.

Design choices (why):

- ``score > 0`` means the gradient points along T, so growing |w| raises the loss: the scale must
  shrink, hence ``corr_accum -= score``.
- Window: ``step`` stops growing at ``window``; from then on each update first decays
  ``corr_accum`` by ``round(corr_accum / window)``. The mean ``corr_accum / (step * gs)`` is thus a
  plain average over the first ``window`` updates (big early moves find the scale fast) and an
  exponential moving average afterwards, so a new score always weighs ``1 / window`` and the
  scale keeps responding after any number of steps.
- Rebasing: when ``a = K * corr_accum / (step * gs)`` leaves [-1, 1], its whole part ``u =
  trunc(a)`` moves into E (clamped to ``exponent_range``) and ``round(u * step * gs / K)`` leaves
  ``corr_accum``. The scale is unchanged up to one rounding step, ``K / (2 * step * gs)`` in log2,
  and the EMA, which would otherwise saturate at +-K, turns into an integrator: a persistent
  correlation keeps moving E, one octave at a time.
- A step in which no gradient reached the layer on any rank (e.g. an unrouted expert) leaves the
  state untouched rather than diluting the mean with zero scores.
- Several forwards before one update (gradient accumulation, weight reuse) each add their own
  ``sign(grad_w)``; the sum over micro-batches and ranks is a majority vote, and only its sign
  drives the votes and the scores, so per-step magnitudes do not depend on world size.
- No bias: ternary models here use none; ``bias=True`` raises :class:`TernkitError`.
- ``K``, ``group_size``, ``window`` and ``vote_threshold`` are hyperparameters, not state: load a
  state dict into a layer built with the same values.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ternkit.errors import TernkitError
from ternkit.quant.packing import pack_base3, unpack_base3

__all__ = [
    "GroupTernaryLinear",
    "TernaryRMSNorm",
    "apply_integer_updates",
    "integer_state_layers",
]

_VOTE_DTYPES = {8: torch.int8, 16: torch.int16}
# Measured on the teacher-recovery task (tests/test_group.py): 8 -> ~95% trit agreement, 12 -> ~96.5%, 16 -> ~97%
# at the same speed; larger thresholds trade speed for fewer noise flips.
_DEFAULT_THRESHOLD = {8: 12, 16: 12}


def _local_act_quant_8bit(x: Tensor) -> Tensor:
    """Per-token absmax int8 fake quantization of ``x`` (..., features) with a straight-through backward."""
    scale = 127.0 / x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    xq = torch.clamp(torch.round(x * scale), -128, 127) / scale
    return x + (xq - x).detach()


_ACT_QUANT: Callable[[Tensor], Tensor] | None = None


def _act_quant(x: Tensor) -> Tensor:
    """The project's ``act_quant_8bit`` when importable, else the local twin; imported lazily to avoid cycles."""
    global _ACT_QUANT
    if _ACT_QUANT is None:
        try:
            from ternkit.quant.ternarize import act_quant_8bit

            _ACT_QUANT = act_quant_8bit
        except ImportError:
            _ACT_QUANT = _local_act_quant_8bit
    return _ACT_QUANT(x)


def _dist_world_size() -> int:
    """World size of the default process group, 1 when torch.distributed is absent or not initialized."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def _round_div(num: Tensor, den: int) -> Tensor:
    """Integer ``num / den`` rounded half away from zero (int64 in, int64 out), so decay has no sign bias."""
    return torch.sign(num) * ((num.abs() + den // 2) // den)


class _IntegerScaleState(nn.Module):
    """Shared integer state and update rule of a (rows, cols) trit matrix with per-group scales.

    Subclasses register the buffers with :meth:`_init_state`, build ``w_eff`` with
    :meth:`_weight_leaf` in ``forward`` and inherit :meth:`apply_update`.
    """

    vote_threshold: int

    def _setup(self, rows: int, cols: int, group_size: int, K: float, vote_bits: int,
               vote_threshold: int | None, window: int, exponent_range: tuple[int, int],
               buffer_shape: tuple[int, ...]) -> None:
        if group_size < 1:
            raise TernkitError(f"group_size must be a positive integer, got {group_size}; pass e.g. group_size=32.")
        if vote_bits not in _VOTE_DTYPES:
            raise TernkitError(f"vote_bits must be 8 or 16, got {vote_bits}; pass vote_bits=8 (int8 votes) or 16.")
        dtype = _VOTE_DTYPES[vote_bits]
        vmax = torch.iinfo(dtype).max
        thr = _DEFAULT_THRESHOLD[vote_bits] if vote_threshold is None else vote_threshold
        if isinstance(thr, bool) or not isinstance(thr, int) or not 1 <= thr <= vmax:
            raise TernkitError(f"vote_threshold must be an int in [1, {vmax}] for {vote_bits}-bit votes, got {thr!r}; pick one in range.")
        if not (isinstance(window, int) and window >= 1):
            raise TernkitError(f"window must be a positive int, got {window!r}; pass e.g. window=256.")
        if not (math.isfinite(K) and K > 0):
            raise TernkitError(f"K must be a positive finite number, got {K!r}; pass e.g. K=4.0.")
        lo, hi = exponent_range
        if not -128 <= lo <= hi <= 127:
            raise TernkitError(f"exponent_range must satisfy -128 <= lo <= hi <= 127, got {exponent_range}; pass e.g. (-24, 8).")
        self._rows, self._cols = rows, cols
        self._shape = buffer_shape  # shape of trits()/votes as the user sees them
        self.group_size = int(group_size)
        self.n_groups = -(-cols // group_size)
        self.K = float(K)
        self.vote_bits = int(vote_bits)
        self.vote_threshold = int(thr)
        self.window = int(window)
        self.exponent_range = (int(lo), int(hi))
        self._sign_sum: Tensor | None = None  # int16 (rows, cols): sum of sign(grad_w) since the last update

    def _init_state(self, trits: Tensor, exponent: Tensor) -> None:
        """Register the persistent integer buffers from int8 trits (rows, cols) and int exponents (rows, n_groups)."""
        gshape = self._group_shape()
        self.register_buffer("packed_trits", pack_base3(trits))
        self.register_buffer("exponent", exponent.to(torch.int8).reshape(gshape).clone())
        self.register_buffer("corr_accum", torch.zeros(gshape, dtype=torch.int64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("votes", torch.zeros(self._shape, dtype=_VOTE_DTYPES[self.vote_bits]))
        # Unpacked copy of T for speed; rebuilt from packed_trits after load_state_dict.
        self.register_buffer("_trits_cache", trits.to(torch.int8).reshape(self._shape).clone(), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def _group_shape(self) -> tuple[int, ...]:
        return (self.n_groups,) if len(self._shape) == 1 else (self._rows, self.n_groups)

    # ---- views --------------------------------------------------------------------------------

    def refresh_trits_cache(self) -> None:
        """Rebuild the unpacked int8 trit cache from ``packed_trits`` (call after editing the buffer by hand)."""
        with torch.no_grad():
            t = unpack_base3(self.packed_trits, self._shape).to(self.packed_trits.device)
            self._trits_cache = t

    def trits(self) -> Tensor:
        """The trits T as int8, shape (out, in) (``(dim,)`` for a norm); a copy."""
        return self._trits_cache.clone()

    def _log2_scales(self) -> Tensor:
        """log2 of the group scales, E + K * corr / (step * gs), as float64 (float32 on MPS), shape (rows, n_groups)."""
        dt = torch.float32 if self.corr_accum.device.type == "mps" else torch.float64
        step = self.step.to(dt)
        adj = self.K * self.corr_accum.to(dt) / (step.clamp(min=1.0) * self.group_size)
        adj = torch.where(self.step > 0, adj, torch.zeros_like(adj))
        return (self.exponent.to(dt) + adj).reshape(self._rows, self.n_groups)

    def scales(self) -> Tensor:
        """Group scales ``2 ** (E + K * corr / (step * gs))`` as float32, shape (out, n_groups) (``(n_groups,)`` for a norm)."""
        return torch.exp2(self._log2_scales()).to(torch.float32).reshape(self._group_shape())

    def _expanded_scales(self) -> Tensor:
        s = torch.exp2(self._log2_scales()).to(torch.float32)
        return s.repeat_interleave(self.group_size, dim=1)[:, : self._cols]

    def effective_weight(self) -> Tensor:
        """The float weight ``scale * T``, shape (out, in) (``(dim,)`` for a norm), without gradient."""
        with torch.no_grad():
            w = self._expanded_scales() * self._trits_cache.reshape(self._rows, self._cols).to(torch.float32)
        return w.reshape(self._shape)

    def persistent_bytes(self) -> float:
        """Bytes of persistent (state_dict) buffers per weight: packed trits + votes + per-group E and corr + step."""
        total = sum(b.numel() * b.element_size() for b in self._persistent_buffers())
        return total / float(self._rows * self._cols)

    def _persistent_buffers(self) -> list[Tensor]:
        skip = self._non_persistent_buffers_set
        return [b for n, b in self._buffers.items() if b is not None and n not in skip]

    # ---- forward helpers --------------------------------------------------------------------

    def _weight_leaf(self) -> Tensor:
        """Ephemeral float32 ``w_eff`` (buffer shape); under grad mode a leaf whose hook records sign(grad)."""
        w = self.effective_weight()
        if not torch.is_grad_enabled():
            return w
        w = w.requires_grad_(True)
        w.register_hook(self._capture_grad)
        return w

    def _capture_grad(self, grad: Tensor) -> None:
        sign = torch.sign(grad.detach()).to(torch.int16).reshape(self._rows, self._cols)
        if self._sign_sum is None or self._sign_sum.device != sign.device:
            self._sign_sum = sign
        else:
            self._sign_sum += sign

    # ---- integer update -----------------------------------------------------------------------

    def _take_sign_sum(self) -> Tensor | None:
        """Pop the pending sign sums as int32 (rows, cols), or None when no backward reached the layer."""
        s, self._sign_sum = self._sign_sum, None
        return None if s is None else s.to(torch.int32)

    def _zero_sign_sum(self) -> Tensor:
        return torch.zeros(self._rows, self._cols, dtype=torch.int32, device=self.votes.device)

    @torch.no_grad()
    def apply_update(self) -> bool:
        """Apply one integer update from the sign sums captured since the last call; True if the state changed.

        With torch.distributed initialized and world size > 1 the sign sums are all-reduced (SUM)
        first, so every rank applies the same update; every rank must then call this, in the same
        order, even where the layer saw no gradient.
        """
        s = self._take_sign_sum()
        if _dist_world_size() > 1:
            s = self._zero_sign_sum() if s is None else s.to(self.votes.device)
            torch.distributed.all_reduce(s, op=torch.distributed.ReduceOp.SUM)
        elif s is None:
            return False
        return self._apply_sign_sum(s)

    @torch.no_grad()
    def _apply_sign_sum(self, sign_sum: Tensor) -> bool:
        """Integer update from summed gradient signs (rows, cols): scores into corr/step/E, votes into trits."""
        g = torch.sign(sign_sum.to(self.votes.device)).to(torch.int8)
        if not bool(g.any()):
            return False
        rows, cols, gs, ng = self._rows, self._cols, self.group_size, self.n_groups
        t = self._trits_cache.view(rows, cols)
        prod = g * t  # {-1, 0, 1}
        if ng * gs != cols:
            prod = F.pad(prod, (0, ng * gs - cols))
        score = prod.view(rows, ng, gs).sum(dim=2, dtype=torch.int64)  # (rows, ng), in [-gs, gs]

        corr = self.corr_accum.view(rows, ng)
        # Window: step grows up to `window`, then corr decays by 1/window so the mean becomes an EMA.
        step = int(self.step)
        if step >= self.window:
            corr -= _round_div(corr, self.window)
        else:
            self.step += 1
            step += 1
        corr -= score
        self._rebase(step)

        # Trits: votes += -sign(grad), saturating; a vote reaching the threshold steps its trit.
        vinfo = torch.iinfo(self.votes.dtype)
        v = (self.votes.view(rows, cols).to(torch.int32) - g).clamp_(vinfo.min, vinfo.max)
        fire = v.abs() >= self.vote_threshold
        if bool(fire.any()):
            new_t = (t + torch.sign(v) * fire).clamp_(-1, 1).to(torch.int8)
            v.masked_fill_(fire, 0)
            if not torch.equal(new_t, t):
                self._trits_cache.copy_(new_t.view(self._shape))
                self.packed_trits.copy_(pack_base3(new_t))
        self.votes.copy_(v.view(self._shape))
        return True

    @torch.no_grad()
    def _rebase(self, step: int) -> None:
        """Fold whole octaves of the adjustment into E and take them out of corr_accum (scale continuous to 1 rounding step)."""
        rows, ng = self._rows, self.n_groups
        corr = self.corr_accum.view(rows, ng)
        dt = torch.float32 if corr.device.type == "mps" else torch.float64
        denom = float(max(step, 1) * self.group_size)
        adj = corr.to(dt) * (self.K / denom)
        over = adj.abs() > 1.0
        if not bool(over.any()):
            return
        exp = self.exponent.view(rows, ng)
        units = torch.trunc(adj).to(torch.int64) * over
        lo, hi = self.exponent_range
        old_e = exp.to(torch.int64)
        new_e = (old_e + units).clamp_(lo, hi)
        corr -= torch.round((new_e - old_e).to(dt) * (denom / self.K)).to(torch.int64)
        exp.copy_(new_e)


def _refresh_after_load(module: nn.Module, incompatible_keys: object) -> None:
    module.refresh_trits_cache()  # type: ignore[operator]
    module._sign_sum = None  # captured signs refer to the old state


def _ternarize_groups(w: Tensor, group_size: int, per_group: bool = True) -> tuple[Tensor, Tensor]:
    """Absmean-ternarize ``w`` (rows, cols): int8 trits (rows, cols) and exponents round(log2 absmean) (rows, n_groups).

    ``per_group`` takes the absmean of each group; otherwise one absmean for the whole matrix (a random
    init, whose per-group absmeans differ only by sampling noise).
    """
    rows, cols = w.shape
    ng = -(-cols // group_size)
    if per_group:
        pad = ng * group_size - cols
        wp = F.pad(w.abs(), (0, pad)).view(rows, ng, group_size)
        counts = torch.full((ng,), group_size, dtype=w.dtype, device=w.device)
        counts[-1] = group_size - pad
        gamma = wp.sum(dim=2) / counts  # (rows, ng)
    else:
        gamma = w.abs().mean().expand(rows, ng)
    gamma = gamma.clamp(min=2.0 ** -126)
    g_full = gamma.repeat_interleave(group_size, dim=1)[:, :cols]
    trits = torch.clamp(torch.round(w / g_full), -1, 1).to(torch.int8)
    exponent = torch.round(torch.log2(gamma))
    return trits, exponent


class GroupTernaryLinear(_IntegerScaleState):
    """Linear layer ``y = x @ w_eff.T`` (..., in) -> (..., out) with all-integer state (see module docstring).

    Args:
        in_features, out_features: weight shape is (out_features, in_features).
        bias: must be False (no bias support; ternary models here use none).
        group_size: columns per scale group; ``n_groups = ceil(in_features / group_size)``.
        K: log2 range of the fractional adjustment, ``K * mean_corr`` with mean_corr in [-1, 1].
        vote_bits: 8 (int8 votes) or 16 (int16 votes).
        vote_threshold: |vote| at which a trit steps one place (-1 -> 0 -> +1); default 12.
        act_bits: None (float activations) or 8 (per-token absmax int8 fake quantization, STE).
        window: cap of ``step``; past it the correlation mean is an EMA with weight 1/window.
        exponent_range: clamp of the int8 base exponent E.
        init_std: std of the random normal init, absmean-ternarized as a whole, E = round(log2 absmean)
            (default 1/sqrt(in_features), so E = round(log2(0.8 / sqrt(in_features)))).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
                 K: float = 4.0, vote_bits: int = 8, vote_threshold: int | None = None,
                 act_bits: int | None = None, window: int = 256,
                 exponent_range: tuple[int, int] = (-24, 8), init_std: float | None = None) -> None:
        super().__init__()
        if bias:
            raise TernkitError("GroupTernaryLinear has no bias (its state is integer-only); pass bias=False.")
        if act_bits not in (None, 8):
            raise TernkitError(f"act_bits must be None or 8, got {act_bits!r}; pass act_bits=8 or leave it unset.")
        if in_features < 1 or out_features < 1:
            raise TernkitError(f"in_features and out_features must be positive, got ({in_features}, {out_features}); fix the layer sizes.")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.act_bits = act_bits
        self._setup(out_features, in_features, group_size, K, vote_bits, vote_threshold, window,
                    exponent_range, (out_features, in_features))
        std = 1.0 / math.sqrt(in_features) if init_std is None else float(init_std)
        trits, exponent = _ternarize_groups(torch.randn(out_features, in_features) * std, self.group_size, per_group=False)
        lo, hi = self.exponent_range
        self._init_state(trits, exponent.clamp(lo, hi))

    @torch.no_grad()
    def load_float_weight(self, weight: Tensor) -> None:
        """Reset the state from a float weight (out, in): per-group absmean trits and E = round(log2 absmean)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise TernkitError(f"weight has shape {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}; pass a matching weight.")
        dev = self.packed_trits.device
        trits, exponent = _ternarize_groups(weight.detach().float().to(dev), self.group_size)
        lo, hi = self.exponent_range
        self.packed_trits.copy_(pack_base3(trits))
        self._trits_cache.copy_(trits)
        self.exponent.copy_(exponent.clamp(lo, hi).to(torch.int8))
        self.corr_accum.zero_()
        self.step.zero_()
        self.votes.zero_()
        self._sign_sum = None

    def forward(self, x: Tensor) -> Tensor:
        """``F.linear(x, w_eff)``: x (..., in) -> (..., out); the weight gradient's signs are captured for apply_update."""
        if x.shape[-1] != self.in_features:
            raise TernkitError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}; check the model's widths.")
        if self.act_bits == 8:
            x = _act_quant(x)
        w = self._weight_leaf()
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        return F.linear(x, w)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"K={self.K}, vote_bits={self.vote_bits}, vote_threshold={self.vote_threshold}, "
                f"window={self.window}, act_bits={self.act_bits}")


class TernaryRMSNorm(_IntegerScaleState):
    """RMSNorm over the last dim, x (..., dim) -> (..., dim), whose gain is a trit (init +1) times an integer-state group scale.

    The gain's state (``packed_trits``, ``exponent``, ``corr_accum``, ``step``, ``votes``) follows
    the same scheme and :meth:`apply_update` as :class:`GroupTernaryLinear`, with shapes (dim,) and
    (n_groups,). E starts at 0, so the initial gain is exactly 1.
    """

    def __init__(self, dim: int, group_size: int = 32, eps: float = 1e-6, K: float = 4.0, vote_bits: int = 8,
                 vote_threshold: int | None = None, window: int = 256,
                 exponent_range: tuple[int, int] = (-24, 8)) -> None:
        super().__init__()
        if dim < 1:
            raise TernkitError(f"dim must be positive, got {dim}; fix the model width.")
        self.dim = int(dim)
        self.eps = float(eps)
        self._setup(1, dim, group_size, K, vote_bits, vote_threshold, window, exponent_range, (dim,))
        self._init_state(torch.ones(dim, dtype=torch.int8), torch.zeros(self.n_groups, dtype=torch.int8))

    def forward(self, x: Tensor) -> Tensor:
        """``rms_norm(x) * gain``: x (..., dim) -> (..., dim); the gain gradient's signs are captured for apply_update."""
        if x.shape[-1] != self.dim:
            raise TernkitError(f"input has {x.shape[-1]} features, the norm expects {self.dim}; check the model's widths.")
        w = self._weight_leaf()
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
        return F.rms_norm(x, (self.dim,), eps=self.eps) * w

    def extra_repr(self) -> str:
        return f"dim={self.dim}, group_size={self.group_size}, eps={self.eps}, K={self.K}, vote_threshold={self.vote_threshold}"


def integer_state_layers(model: nn.Module) -> list[nn.Module]:
    """Modules of ``model`` (itself included) that have a callable ``apply_update``, in ``modules()`` order."""
    return [m for m in model.modules() if callable(getattr(m, "apply_update", None))]


@torch.no_grad()
def apply_integer_updates(model: nn.Module) -> int:
    """Call ``apply_update()`` on every integer-state layer of ``model``; returns how many were called.

    Run once per optimizer step, after backward (and after all gradient-accumulation micro-batches).
    Under torch.distributed with world size > 1 the sign sums of this module's own layers travel in
    one all-reduce per device (in ``modules()`` order, so all ranks must hold the same model); other
    modules with ``apply_update`` are called as they are and do their own reduction.
    """
    layers = integer_state_layers(model)
    if _dist_world_size() > 1:
        ours = [m for m in layers if isinstance(m, _IntegerScaleState)]
        by_device: dict[torch.device, list[_IntegerScaleState]] = {}
        for m in ours:
            by_device.setdefault(m.votes.device, []).append(m)
        for dev, mods in by_device.items():
            sums = []
            for m in mods:
                s = m._take_sign_sum()
                sums.append(m._zero_sign_sum() if s is None else s.to(dev))
            flat = torch.cat([s.reshape(-1) for s in sums])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            for m, part in zip(mods, torch.split(flat, [s.numel() for s in sums])):
                m._apply_sign_sum(part.view(m._rows, m._cols))
        for m in layers:
            if not isinstance(m, _IntegerScaleState):
                m.apply_update()
        return len(layers)
    for m in layers:
        m.apply_update()
    return len(layers)
