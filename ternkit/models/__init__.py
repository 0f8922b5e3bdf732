"""Models: mLSTM layer, MoE block, the xLSTM language model and their dataclass configs."""

from __future__ import annotations

from ternkit.models.config import MLSTMLayerConfig, XLSTMLMConfig
from ternkit.models.lm import XLSTMLM, SwiGLU, XLSTMBlock
from ternkit.models.mlstm import MLSTMLayer

__all__ = ["MLSTMLayer", "MLSTMLayerConfig", "SwiGLU", "XLSTMBlock", "XLSTMLM", "XLSTMLMConfig"]

try:  # the MoE block is optional for every model without a "moe" FFN
    from ternkit.models.moe import MoEConfig, MoEFFN  # noqa: F401

    __all__ += ["MoEConfig", "MoEFFN"]
except ImportError:  # pragma: no cover - only while moe.py is absent
    pass
