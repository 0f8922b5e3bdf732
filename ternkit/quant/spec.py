"""What a ternary linear layer is: one typed spec (scale kind, activation bits, group size), no torch needed."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from ternkit.schema import Section

__all__ = ["SCALES", "Scale", "TernarySpec"]

Scale = Literal["absmean", "per_row", "lsq", "group"]
#: Weight-scale kinds: per-tensor AbsMean (BitNet b1.58), per-row, learnable LSQ, integer-state groups.
SCALES: tuple[str, ...] = get_args(Scale)


class TernarySpec(Section):
    """How ternary weights are scaled, and whether activations are quantized (BitNet: int8 absmax per token).

    ``scale="group"`` builds the integer-state layer (packed trits, int8 exponents, int64
    correlation accumulators) with one scale per ``group_size`` input columns; the other kinds
    keep a latent float weight trained with a straight-through estimator.
    """

    scale: Scale = "absmean"
    act_bits: Literal[8] | None = None
    group_size: int = Field(32, ge=1, description="input columns per scale group for scale=group")
