"""Reading ternkit checkpoints: safe loading, the model they hold. Below both training and export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ternkit.errors import TernkitError

__all__ = ["load_checkpoint", "model_from_checkpoint", "model_from_config"]


def model_from_config(cfg: dict[str, Any]) -> nn.Module:
    """A freshly initialised :class:`ternkit.models.lm.XLSTMLM` from a stored model-config dict (any stored format)."""
    from ternkit.models.config import ModelConfig
    from ternkit.models.lm import XLSTMLM

    return XLSTMLM(ModelConfig.from_dict(cfg))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ternkit Lightning checkpoint safely (weights_only) and check that it is one of ours."""
    path = Path(path)
    if not path.exists():
        raise TernkitError(f"checkpoint {path} does not exist; pass the path of a .ckpt file (e.g. runs/<name>/last.ckpt).")
    if path.is_dir():
        raise TernkitError(f"{path} is a folder, not a checkpoint; pass a .ckpt file, or an export folder to commands that take one.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle with code in it, not a torch file at all
        raise TernkitError(f"{path} could not be read as a checkpoint ({type(err).__name__}); it may be truncated "
                           "or not a torch file: use another checkpoint such as last.ckpt.") from None
    if not isinstance(ckpt, dict) or "ternkit" not in ckpt or "state_dict" not in ckpt:
        raise TernkitError(f"{path} is not a ternkit checkpoint (no ternkit metadata); pass a checkpoint written by "
                           "'ternkit train'.")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> nn.Module:
    """The model a loaded checkpoint holds (its config and weights), in eval mode."""
    model = model_from_config(ckpt["ternkit"]["model_config"])
    sd = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise TernkitError(f"{path} does not match its own model config ({first}); the checkpoint is damaged or from "
                           "an incompatible ternkit version.") from None
    return model.eval()
