"""Reading ternkit checkpoints: safe loading, the model they hold. Below both training and export."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ternkit.errors import TernkitError

__all__ = ["RUN_CHECKPOINTS", "checkpoint_step", "config_from_stored", "load_checkpoint", "model_from_checkpoint",
           "model_from_config", "other_checkpoints", "state_dict_mismatch", "use_another"]


def config_from_stored(cfg: Any, source: str | Path, fix: str | Callable[[], str] = "use another checkpoint") -> Any:
    """The :class:`ModelConfig` of a stored model-config dict; a bad one is one TernkitError naming ``source`` and the key.

    ``fix`` ends the sentence: what to do about a damaged or hand-edited file (a callable is asked
    only when the config is bad).
    """
    from ternkit.models.config import ModelConfig, migrate_model_config

    def damaged() -> str:
        return f"the file was damaged or hand-edited, so {fix() if callable(fix) else fix}"

    if not isinstance(cfg, dict):
        raise TernkitError(f"{source}: the model config is a {type(cfg).__name__}, not a mapping; {damaged()}.")
    try:
        cfg = migrate_model_config(cfg)  # an older format's own sentence (it says how to fix it) passes through
    except TernkitError as err:
        raise TernkitError(f"{source}: {err}") from None
    except (TypeError, ValueError):  # a value JSON cannot hold (a tensor, a set): not a config ternkit wrote
        raise TernkitError(f"{source}: the model config holds values that are not plain numbers, strings or lists; "
                           f"{damaged()}.") from None
    if cfg.get("vocab_size") is None:
        raise TernkitError(f"{source}: the model config lacks the key 'vocab_size'; {damaged()}.")
    try:
        return ModelConfig.from_dict(cfg)
    except TernkitError as err:
        # ModelConfig's sentence names the key; put the file first so the user knows where to look.
        raise TernkitError(f"{source}: {str(err).removeprefix('model config: ').rstrip('.')}; {damaged()}.") from None


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


#: Checkpoints a run folder holds by these names (besides step*.ckpt), offered first as alternatives to a broken one.
RUN_CHECKPOINTS = ("last.ckpt", "best.ckpt")


def checkpoint_step(path: str | Path) -> int | None:
    """The global_step stored in the checkpoint ``path`` (memory-mapped, not loaded whole); None when unreadable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # unreadable, truncated or not ours: the callers treat it as "no step known"
        return None


def other_checkpoints(path: str | Path) -> list[Path]:
    """The checkpoints beside ``path`` (``*.ckpt`` in its folder, not ``path`` itself): last, best, step* newest first, others.

    Hidden files (a held-back ``.last.ckpt.unverified.tmp``, a temporary write) are not offered, nor
    files that are not a whole zip archive (torch's format): a truncated one has lost its directory.
    """
    path = Path(path)
    try:
        same = path.resolve()
        found = [p for p in path.parent.glob("*.ckpt")
                 if p.is_file() and not p.name.startswith(".") and p.resolve() != same and zipfile.is_zipfile(p)]
    except OSError:  # an unreadable folder offers nothing
        return []
    named = [p for n in RUN_CHECKPOINTS for p in found if p.name == n]
    # step0000012.ckpt: zero-padded, so the names sort by step.
    steps = sorted((p for p in found if p.name.startswith("step") and p not in named), key=lambda p: p.name,
                   reverse=True)
    rest = sorted(p for p in found if p not in named and p not in steps)
    return named + steps + rest


def use_another(path: str | Path, shown: int = 3) -> str:
    """What to do instead of using the broken checkpoint ``path``, as a clause naming checkpoints that exist beside it."""
    others = other_checkpoints(path)
    if not others:
        return (f"restore it from a copy or train the run again (no other checkpoint exists beside it in "
                f"{Path(path).parent})")
    names = [str(p) for p in others[:shown]]
    more = len(others) - len(names)
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" or {names[-1]}"
    return f"use another checkpoint such as {listed}" + (f" ({more} more beside it)" if more else "")


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
                           f"or not a torch file: {use_another(path)}.") from None
    if not isinstance(ckpt, dict) or "ternkit" not in ckpt or "state_dict" not in ckpt:
        raise TernkitError(f"{path} is not a ternkit checkpoint (no ternkit metadata); pass a checkpoint written by "
                           "'ternkit train'.")
    meta = ckpt["ternkit"]
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        what = "is not a mapping" if not isinstance(meta, dict) else (
            "lacks the key 'model_config'" if "model_config" not in meta else "has a 'model_config' that is not a mapping")
        raise TernkitError(f"{path}: its ternkit metadata {what}, so the model cannot be rebuilt; the file was damaged "
                           f"or hand-edited, so {use_another(path)}.")
    if not isinstance(ckpt["state_dict"], dict) or not isinstance(meta.get("run_info", {}), dict):
        raise TernkitError(f"{path}: its 'state_dict' or ternkit 'run_info' is not a mapping; the file was damaged or "
                           f"hand-edited, so {use_another(path)}.")
    config_from_stored(meta["model_config"], path, lambda: use_another(path))
    return ckpt


def _shape(t: Any) -> str:
    """A tensor's shape as ``(2, 3)``; the type name for a value that is not a tensor."""
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _listed(names: list[str], shown: int) -> str:
    """The first ``shown`` of ``names``, comma-separated, with how many more there are."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f", ... {more} more" if more > 0 else "")


def state_dict_mismatch(expected: dict[str, Any], stored: dict[str, Any], shown: int = 3) -> str:
    """What differs between a model's ``expected`` state dict and a ``stored`` one: counts and the first names.

    Empty when the keys and shapes agree. E.g. ``2 tensors missing (a.weight, b.bias), 1 with the wrong
    shape (emb.weight (256, 32) in the checkpoint vs (300, 32) in the model)``.
    """
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    wrong = [k for k in expected if k in stored and _shape(stored[k]) != _shape(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor{'s' * (len(missing) != 1)} missing ({_listed(missing, shown)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_listed(unexpected, shown)})")
    if wrong:
        shapes = [f"{k} {_shape(stored[k])} in the checkpoint vs {_shape(expected[k])} in the model" for k in wrong]
        parts.append(f"{len(wrong)} with the wrong shape ({_listed(shapes, shown)})")
    return ", ".join(parts)


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> nn.Module:
    """The model a loaded checkpoint holds (its config and weights), in eval mode."""
    model = model_from_config(ckpt["ternkit"]["model_config"], path)
    sd = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        # torch's message spans many lines and lists every key; name the first few of each kind instead.
        what = state_dict_mismatch(model.state_dict(), sd) or " ".join(str(err).split())[:300]
        fix = use_another(path) if Path(path).is_file() else "use another checkpoint"
        raise TernkitError(f"{path} does not match its own model config ({what}); the checkpoint is damaged or from "
                           f"an incompatible ternkit version, so {fix}.") from None
    return model.eval()
