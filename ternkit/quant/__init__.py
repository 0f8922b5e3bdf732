"""Ternarizers (STE), ternary linear layers, packing formats and dead-zone statistics."""

from __future__ import annotations

from ternkit.quant.linear import SCALES, TernaryLinear, swap_linear, ternary_modules
from ternkit.quant.ternarize import (
    absmean_ternarize,
    act_quant_8bit,
    lsq_ternarize,
    per_row_ternarize,
)

__all__ = [
    "SCALES",
    "TernaryLinear",
    "swap_linear",
    "ternary_modules",
    "absmean_ternarize",
    "per_row_ternarize",
    "lsq_ternarize",
    "act_quant_8bit",
]
