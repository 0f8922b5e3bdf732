"""Reading ternkit checkpoints: safe loading, the model they hold. Below both training and export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ternkit.errors import TernkitError

__all__ = ["config_from_stored", "load_checkpoint", "model_from_checkpoint", "model_from_config"]


def config_from_stored(cfg: Any, source: str | Path, fix: str = "use another checkpoint") -> Any:
    """The :class:`ModelConfig` of a stored model-config dict; a bad one is one TernkitError naming ``source`` and the key.

    ``fix`` ends the sentence: what to do about a damaged or hand-edited file.
    """
    from ternkit.models.config import ModelConfig, migrate_model_config

    damaged = f"the file was damaged or hand-edited, so {fix}"
    if not isinstance(cfg, dict):
        raise TernkitError(f"{source}: the model config is a {type(cfg).__name__}, not a mapping; {damaged}.")
    try:
        cfg = migrate_model_config(cfg)  # an older format's own sentence (it says how to fix it) passes through
    except TernkitError as err:
        raise TernkitError(f"{source}: {err}") from None
    except (TypeError, ValueError):  # a value JSON cannot hold (a tensor, a set): not a config ternkit wrote
        raise TernkitError(f"{source}: the model config holds values that are not plain numbers, strings or lists; "
                           f"{damaged}.") from None
    if cfg.get("vocab_size") is None:
        raise TernkitError(f"{source}: the model config lacks the key 'vocab_size'; {damaged}.")
    try:
        return ModelConfig.from_dict(cfg)
    except TernkitError as err:
        # ModelConfig's sentence names the key; put the file first so the user knows where to look.
        raise TernkitError(f"{source}: {str(err).removeprefix('model config: ').rstrip('.')}; {damaged}.") from None


def model_from_config(cfg: dict[str, Any], source: str | Path = "model config") -> nn.Module:
    """A freshly initialised :class:`ternkit.models.lm.XLSTMLM` from a stored model-config dict (any stored format).

    The size is checked against this machine's memory before anything is allocated.
    """
    from ternkit.models.config import check_model_fits
    from ternkit.models.lm import XLSTMLM

    config = config_from_stored(cfg, source)
    try:
        check_model_fits(config, fix=f"load it on a machine with more memory, or check that {source} was not "
                                     "hand-edited")
    except TernkitError as err:
        raise TernkitError(f"{source}: {err}") from None
    return XLSTMLM(config)


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
    meta = ckpt["ternkit"]
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        what = "is not a mapping" if not isinstance(meta, dict) else (
            "lacks the key 'model_config'" if "model_config" not in meta else "has a 'model_config' that is not a mapping")
        raise TernkitError(f"{path}: its ternkit metadata {what}, so the model cannot be rebuilt; the file was damaged "
                           "or hand-edited, so use another checkpoint such as last.ckpt.")
    if not isinstance(ckpt["state_dict"], dict) or not isinstance(meta.get("run_info", {}), dict):
        raise TernkitError(f"{path}: its 'state_dict' or ternkit 'run_info' is not a mapping; the file was damaged or "
                           "hand-edited, so use another checkpoint such as last.ckpt.")
    config_from_stored(meta["model_config"], path, "use another checkpoint such as last.ckpt")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> nn.Module:
    """The model a loaded checkpoint holds (its config and weights), in eval mode."""
    model = model_from_config(ckpt["ternkit"]["model_config"], path)
    sd = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise TernkitError(f"{path} does not match its own model config ({first}); the checkpoint is damaged or from "
                           "an incompatible ternkit version.") from None
    return model.eval()
