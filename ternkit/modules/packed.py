"""Inference-only ternary linear rebuilt from packed trits: y (..., out) = x (..., in) @ (alpha * T)^T + b."""

from __future__ import annotations

import torch
from torch import nn

from ternkit.ops.ternary_linear import ternary_linear
from ternkit.quant.packing import pack_2bit, pack_trits, unpack_trits

__all__ = ["PackedTernaryLinear"]


class PackedTernaryLinear(nn.Module):
    """A ternary linear layer whose persistent state is packed trits (uint8), alpha and an optional bias.

    ``packed`` holds the (out, in) trits in ``fmt`` ("base3" or "2bit"); ``alpha`` is a scalar ()
    or per-row (out, 1) float scale. The forward runs :func:`ternkit.ops.ternary_linear.ternary_linear`
    on the 2-bit trits (a base-3 layer repacks itself to 2 bits once, into a non-persistent
    cache), so no float copy of the weight is ever made for the forward; it computes the
    training layer's ternarized forward up to float summation order. :meth:`ternary_weight`
    still gives ``alpha * T`` in float for statistics.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str = "base3", alpha_shape: tuple[int, ...] = (),
                 bias: bool = False, act_bits: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.act_bits = in_features, out_features, fmt, act_bits
        empty, _ = pack_trits(torch.zeros(out_features, in_features, dtype=torch.int8), fmt)
        self.register_buffer("packed", empty)
        self.register_buffer("alpha", torch.ones(alpha_shape))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("_weight", None, persistent=False)
        self.register_buffer("_packed_2bit", None, persistent=False)

    @classmethod
    def from_trits(cls, trits: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None = None, fmt: str = "base3",
                   act_bits: int | None = None) -> "PackedTernaryLinear":
        """Pack int8 trits (out, in) with scale alpha (() or (out, 1)) into a new layer."""
        out_f, in_f = trits.shape
        layer = cls(in_f, out_f, fmt, tuple(alpha.shape), bias is not None, act_bits)
        layer.packed = pack_trits(trits, fmt)[0]
        layer.alpha = alpha.detach().float().clone()
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def trits(self) -> torch.Tensor:
        """The trits T as int8 (out, in)."""
        return unpack_trits(self.packed, self.fmt, (self.out_features, self.in_features))

    @property
    def weight(self) -> torch.Tensor:
        """alpha * T (out, in): the layer's effective weight, so weight-based statistics (dead zone) work on an export."""
        return self.ternary_weight()

    def scale_of(self) -> torch.Tensor:
        """alpha, broadcastable to (out, in)."""
        return self.alpha

    def ternary_weight(self) -> torch.Tensor:
        """alpha * T (out, in) as float, cached after the first call."""
        if self._weight is None or self._weight.device != self.packed.device:
            self._weight = self.trits().to(self.alpha.dtype) * self.alpha
        return self._weight

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._weight = self._packed_2bit = None  # new trits or alpha: drop the caches
        super()._load_from_state_dict(*args, **kwargs)

    def packed_2bit(self) -> torch.Tensor:
        """The trits as uint8 (out, ceil(in/128)*32) in the 2-bit layout the kernel reads (cached for base3)."""
        if self.fmt == "2bit":
            return self.packed
        if self._packed_2bit is None or self._packed_2bit.device != self.packed.device:
            self._packed_2bit = pack_2bit(self.trits())
        return self._packed_2bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y (..., out) from x (..., in) by the ternary_linear op on the packed trits."""
        return ternary_linear(x, self.packed_2bit(), self.alpha, self.in_features, act_bits=self.act_bits,
                              bias=self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, act_bits={self.act_bits}"
