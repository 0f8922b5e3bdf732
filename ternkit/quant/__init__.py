"""Ternary formats and pure functions: ternarizers (STE), packing, dead-zone statistics and the TernarySpec.

Nothing here builds a layer: the nn modules that use these live in :mod:`ternkit.modules`.
"""

from __future__ import annotations

from ternkit.quant.spec import SCALES, TernarySpec
from ternkit.quant.ternarize import (
    absmean_ternarize,
    act_quant_8bit,
    lsq_ternarize,
    per_row_ternarize,
)

__all__ = [
    "SCALES",
    "TernarySpec",
    "absmean_ternarize",
    "per_row_ternarize",
    "lsq_ternarize",
    "act_quant_8bit",
]
