"""Adaptive per-head STC quantizer: alpha * {-1, 0, +1} with a threshold tau that tracks a target zero fraction."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ternkit.errors import TernkitError
from ternkit.ops.stc import stc_quantize, stc_quantize_vector

__all__ = ["STCQuantizer"]

# Beyond this many entries per head a strided subsample is statistically as good (the standard error
# of the 0.75 quantile of 8192 samples is 0.5% of the data's spread, and tau is an EMA on top) and
# keeps the threshold update cheap: with 65536 samples the selections were 18% of a training step.
_MAX_QUANTILE_SAMPLES = 1 << 13


class STCQuantizer(nn.Module):
    """Quantize x (B, NH, S, DH) or (B, NH, DH) per vector to alpha * {-1, 0, +1} with a per-head threshold tau (NH,).

    An entry is zeroed where |x| <= tau[head]; alpha is the mean |x| of the kept entries of that
    vector (see :func:`ternkit.ops.stc.stc_quantize`). The gradient is straight-through (identity)
    everywhere, the zero region included.

    With ``threshold="vector"`` every vector keeps its largest entries and zeroes exactly
    ``round(target_sparsity * DH)`` of them (:func:`ternkit.ops.stc.stc_quantize_vector`); tau is
    then unused. With ``"head"`` (one threshold per head for all vectors), tau adapts so that the
    zero fraction tracks ``target_sparsity``: on the first training batch
    it is set to the ``target_sparsity`` quantile of |x| per head (``initialized`` flags this),
    then every training forward moves it by an EMA (``momentum``) towards the batch quantile.
    In eval mode tau is frozen. ``tau`` and ``initialized`` are persistent buffers, so a
    checkpoint carries them. Under DDP every rank sees different data and its tau drifts apart:
    the training loop should call :meth:`sync_` (mean all-reduce) after the optimizer step, or at
    least before saving a checkpoint.
    """

    tau: torch.Tensor
    initialized: torch.Tensor
    #: Float buffers the training loop keeps equal across DDP ranks (see :meth:`sync_`).
    SYNCED_BUFFERS: ClassVar[tuple[str, ...]] = ("tau",)

    def __init__(self, num_heads: int, target_sparsity: float = 0.75, momentum: float = 0.9,
                 init_tau: float = 0.0, threshold: str = "head") -> None:
        super().__init__()
        if not 0.0 <= target_sparsity < 1.0:
            raise TernkitError(f"target_sparsity must be in [0, 1), got {target_sparsity!r}.")
        if not 0.0 <= momentum < 1.0:
            raise TernkitError(f"STC momentum must be in [0, 1), got {momentum!r}.")
        if threshold not in ("head", "vector"):
            raise TernkitError(f"STC threshold {threshold!r} is not supported; use head or vector.")
        self.threshold = threshold
        self.num_heads = int(num_heads)
        self.target_sparsity = float(target_sparsity)
        self.momentum = float(momentum)
        # init_tau is only used if the module runs in eval mode before it ever saw a training batch.
        self.register_buffer("tau", torch.full((self.num_heads,), float(init_tau)))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # Zero fraction (a 0-d tensor) of the last forward, or in eval mode its output, counted on demand.
        self._last: torch.Tensor | None = None

    @torch.no_grad()
    def batch_quantile(self, x: torch.Tensor) -> torch.Tensor:
        """The ``target_sparsity`` quantile of |x| per head (NH,), x (B, NH, ..., DH)."""
        a = x.detach().abs().float().transpose(0, 1).reshape(self.num_heads, -1)
        n = a.shape[1]
        if n > _MAX_QUANTILE_SAMPLES:
            step = -(-n // _MAX_QUANTILE_SAMPLES)
            a = a[:, ::step]
        # Quantile by selection (O(n)) instead of torch.quantile's full sort, which was a fifth of a
        # main-job training step. The threshold sits halfway between two neighbouring order
        # statistics, never on a data value: an entry exactly at tau would flip between kept and
        # zeroed on 1-ulp differences between the parallel and the step-by-step forms.
        k = int(self.target_sparsity * (a.shape[1] - 1)) + 1
        lo = a.kthvalue(k, dim=1).values
        if k >= a.shape[1]:
            return lo
        return 0.5 * (lo + a.kthvalue(k + 1, dim=1).values)

    @torch.no_grad()
    def update_tau_(self, x: torch.Tensor) -> None:
        """Move tau towards this batch's quantile (EMA); the first call sets it outright."""
        q = self.batch_quantile(x).to(self.tau.dtype)
        if bool(self.initialized):
            self.tau.mul_(self.momentum).add_(q, alpha=1.0 - self.momentum)
        else:
            self.tau.copy_(q)
            self.initialized.fill_(True)

    @torch.no_grad()
    def sync_(self) -> None:
        """Average tau over all ranks (all-reduce mean) when torch.distributed is initialized; no-op otherwise."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.tau, op=dist.ReduceOp.SUM)
            self.tau.div_(dist.get_world_size())
            # A rank that never trained would otherwise keep initialized=False and overwrite tau later.
            flag = self.initialized.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.initialized.copy_(flag.bool())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantized x, same shape (B, NH, S, DH) or (B, NH, DH); updates tau first in training mode."""
        if x.dim() not in (3, 4) or x.shape[1] != self.num_heads:
            raise TernkitError(f"STCQuantizer expects (B, {self.num_heads}, S, DH) or (B, {self.num_heads}, DH), "
                               f"got shape {tuple(x.shape)}; reshape to heads first.")
        if self.threshold == "vector":
            y = stc_quantize_vector(x, self.target_sparsity)
        else:
            if self.training:
                self.update_tau_(x)
            y = stc_quantize(x, self.tau.to(x.dtype).view(1, self.num_heads, *([1] * (x.dim() - 2))))
        # Training: count now (a scalar; keeping y would hold an activation past backward).
        # Inference: keep y and count only when asked; decoding never asks, and it runs per token.
        self._last = (y == 0).float().mean() if self.training else y.detach()
        return y

    @property
    def last_zero_fraction(self) -> float:
        """Fraction of entries zeroed by the last forward (nan before the first)."""
        if self._last is None:
            return float("nan")
        if self._last.dim():
            self._last = (self._last == 0).float().mean()
        return float(self._last)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, target_sparsity={self.target_sparsity}, momentum={self.momentum}, "
                f"threshold={self.threshold}")
