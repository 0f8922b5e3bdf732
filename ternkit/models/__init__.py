"""Models: mLSTM layer, MoE block, the xLSTM language model and their one typed config."""

from __future__ import annotations

from ternkit.models.config import ModelConfig, MoEConfig, XLSTMLMConfig, migrate_model_config
from ternkit.models.lm import XLSTMLM, SwiGLU, XLSTMBlock
from ternkit.models.mlstm import MLSTMLayer
from ternkit.models.moe import MoEFFN

__all__ = ["MLSTMLayer", "ModelConfig", "MoEConfig", "MoEFFN", "SwiGLU", "XLSTMBlock", "XLSTMLM", "XLSTMLMConfig",
           "migrate_model_config"]
