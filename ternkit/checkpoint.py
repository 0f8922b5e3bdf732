"""Reading ternkit checkpoints and export folders: safe loading, the model they hold. Below both training and export."""

from __future__ import annotations

import hashlib
import json
import re
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


# ------------------------------------------------------------------ exports (written by ternkit.export)

#: The files of an export folder.
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
_WEIGHTS, _CONFIG = EXPORT_WEIGHTS, EXPORT_CONFIG


def is_export_dir(path: Path) -> bool:
    """True when ``path`` is a folder holding an export's weights and config."""
    return path.is_dir() and (path / _WEIGHTS).exists() and (path / _CONFIG).exists()


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A model in eval mode from a checkpoint file or an export folder, and a dict of facts about the source."""
    path = Path(path)
    if is_export_dir(path):
        return load_packed(path), {"kind": "export", "path": str(path)}
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, path), checkpoint_facts(ckpt, path)


def checkpoint_facts(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """What :func:`load_model` says about a loaded checkpoint: kind, path, global step and the run's info."""
    return {"kind": "checkpoint", "path": str(path), "global_step": ckpt.get("global_step"),
            "run_info": ckpt["ternkit"].get("run_info", {})}


def _swap_in_packed(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    from ternkit.modules.linear import replace_module
    from ternkit.modules.packed import PackedTernaryLinear

    for name, meta in layers.items():
        new = PackedTernaryLinear(meta["in"], meta["out"], meta["fmt"], tuple(meta["alpha_shape"]), meta["bias"],
                                  meta["act_bits"])
        replace_module(model, name, new)


def content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 (hex) over every tensor of a state dict, sorted by name: its name, dtype, shape and bytes.

    Stored in an export's metadata and checked by :func:`load_packed`: a bit flipped in the
    weights (a bad disk, a truncated copy) is refused instead of generating garbage. About 1-2 GB/s.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _metadata_json(weights: Path, meta: dict[str, str], key: str, default: str | None = None) -> Any:
    """The JSON value under ``key`` in a safetensors file's metadata; TernkitError naming the file and key when it is bad."""
    try:
        return json.loads(meta[key] if default is None else meta.get(key, default))
    except (KeyError, json.JSONDecodeError):
        raise TernkitError(f"{weights}: its metadata key '{key}' is not valid JSON; export the checkpoint "
                           "again.") from None


def _check_config_file(path: Path, stored: Any) -> None:
    """Refuse an export whose config.json cannot be read or describes another model than its weights.

    The model is rebuilt from the config inside model.safetensors (it travels with the weights);
    config.json is what people read and edit, so a broken or edited one is reported instead of
    being silently ignored.
    """
    cfg_path = path / _CONFIG
    fix = "restore it by exporting the checkpoint again"
    try:
        obj = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise TernkitError(f"cannot read {cfg_path} ({err.strerror or type(err).__name__}); check its permissions.") from None
    except UnicodeDecodeError as err:
        raise TernkitError(f"{cfg_path} is not UTF-8 text (byte {err.start}); {fix}.") from None
    except json.JSONDecodeError as err:
        raise TernkitError(f"{cfg_path} is not valid JSON (line {err.lineno}, column {err.colno}); {fix}.") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise TernkitError(f"{cfg_path} has no 'model' key (the model config); {fix}.")
    edited = config_from_stored(obj["model"], cfg_path, fix).to_dict()
    weights = config_from_stored(stored, path / _WEIGHTS, "export the checkpoint again").to_dict()
    diff = [k for k in weights if k != "extra" and weights[k] != edited.get(k)]
    if diff:
        shown = ", ".join(f"{k}={edited.get(k)!r} vs {weights[k]!r}" for k in diff[:3])
        raise TernkitError(f"{cfg_path} describes another model than {_WEIGHTS} holds ({shown}); the weights decide "
                           f"the shape, so {fix}.")


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild the model of an export folder (eval mode): ternary layers become PackedTernaryLinear."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not is_export_dir(path):
        raise TernkitError(f"{path} is not a ternkit export (it needs {_WEIGHTS} and {_CONFIG}); run "
                           "'ternkit export --packed CKPT -o DIR' first.")
    try:
        with safe_open(str(path / _WEIGHTS), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path / _WEIGHTS))
    except Exception as err:
        raise TernkitError(f"{path / _WEIGHTS} could not be read ({type(err).__name__}); the export is damaged: export again.") from None
    if "ternkit_version" not in meta or "config" not in meta:
        raise TernkitError(f"{path / _WEIGHTS} has no ternkit metadata; it was not written by 'ternkit export'.")
    want = meta.get("content_sha256")
    if want is not None and content_digest(tensors) != want:  # exports older than the hash carry none
        raise TernkitError(f"{path / _WEIGHTS} failed its integrity check (the sha256 of its tensors differs from the "
                           "one recorded at export), so the file is damaged, e.g. a flipped bit or a bad copy: export "
                           "the checkpoint again or copy the export anew.")
    stored = _metadata_json(path / _WEIGHTS, meta, "config")
    layers = _metadata_json(path / _WEIGHTS, meta, "ternary_layers", "{}")
    _check_config_file(path, stored)
    model = model_from_config(stored, path / _WEIGHTS)
    try:
        _swap_in_packed(model, layers)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise TernkitError(f"{path / _WEIGHTS}: its 'ternary_layers' metadata is malformed ({type(err).__name__}); "
                           "export the checkpoint again.") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise TernkitError(f"{path} does not match its config ({str(err).splitlines()[0]}); export it again.") from None
    return model.eval()


# ------------------------------------------------------------------ starting a run from another model's weights

_EXPERT_KEY = re.compile(r"^(?P<ffn>.*\.ffn)\.(?:experts\.\d+|shared)\.(?P<proj>w1|w3|w2)\.(?P<kind>weight|bias)$")


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every ternary layer also given as a float ``<name>.weight`` (out, in).

    Latent-weight layers already hold one (the latent weight, the best start for more training).
    Packed export layers give T * alpha / d, d the fraction of non-zero trits (per row for per-row
    scales): a latent weight that AbsMean (per tensor or per row, as exported) ternarizes back to
    the same T and the same alpha, so the start computes the export's function; alpha itself is
    kept only where it is one scalar (an LSQ target takes it as is). Integer-state group layers
    give their scale * T.
    """
    from ternkit.modules.group import GroupTernaryLinear
    from ternkit.modules.packed import PackedTernaryLinear

    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if isinstance(mod, PackedTernaryLinear):
            t = mod.trits().float()
            alpha = mod.alpha.detach().float()
            nonzero = (t != 0).float()
            density = nonzero.mean(dim=-1, keepdim=True) if alpha.dim() else nonzero.mean()
            sd[f"{name}.weight"] = t * alpha / density.clamp(min=1.0 / t.shape[-1])
            sd.pop(f"{name}.packed", None)
            if alpha.dim():
                sd.pop(f"{name}.alpha", None)
        elif isinstance(mod, GroupTernaryLinear):
            sd[f"{name}.weight"] = mod.effective_weight()
    return sd


def _derived(key: str, target: torch.Tensor, src: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, str, str]:
    """(tensor, source key, label) for a target key the source does not have: an MoE expert from the dense SwiGLU FFN.

    Upcycling (Komatsuzaki et al.): every expert (and the shared one) starts as a copy of the block's
    dense FFN; the fused W1|W3 (2H, D) of the dense layout splits into the experts' W1 and W3.
    (None, "", "") when no source tensor fits.
    """
    m = _EXPERT_KEY.match(key)
    if m is None:
        return None, "", ""
    ffn, proj, kind = m["ffn"], m["proj"], m["kind"]
    plain = f"{ffn}.{proj}.{kind}"
    if plain in src:
        return src[plain], plain, plain
    fused_key = f"{ffn}.w13.{kind}"
    fused = src.get(fused_key)
    if proj in ("w1", "w3") and fused is not None and fused.shape[0] == 2 * target.shape[0]:
        half = target.shape[0]
        part = fused[:half] if proj == "w1" else fused[half:]
        return part, fused_key, f"{fused_key}[{'first' if proj == 'w1' else 'second'} half]"
    return None, "", ""


def _expand_block_diagonal(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """Blocks (NB, bs, bs) as the full block-diagonal matrix (NB*bs, NB*bs) when that is ``t``'s shape, else None."""
    if s.dim() == 3 and t.dim() == 2 and s.shape[1] == s.shape[2] and tuple(t.shape) == (s.shape[0] * s.shape[1],) * 2:
        return torch.block_diag(*s)
    return None


@torch.no_grad()
def init_weights_from(model: nn.Module, source: str | Path) -> dict[str, Any]:
    """Load the weights of the model in ``source`` (a checkpoint or an export folder) into ``model``, in place.

    Tensors are matched by name. A float twin's block-diagonal q/k/v blocks become the full ternary
    q/k/v matrices; a dense FFN fills every MoE expert (upcycling); float or packed weights enter
    latent ternary layers as their latent weights and integer-state group layers through their own
    ternarization; LSQ scales the source does not have restart at 2 mean|W|. Tensors this model has
    and the source lacks keep their fresh initialization (e.g. a router, STC thresholds). Raises a
    ``TernkitError`` naming the tensors when shapes differ, or when nothing matches. Returns what
    happened: ``{"source", "kind", "loaded", "converted", "kept_init", "ignored"}``.
    """
    from ternkit.modules.group import GroupTernaryLinear
    from ternkit.modules.linear import TernaryLinear

    path = Path(source)
    if not path.exists():
        raise TernkitError(f"init_from {path} does not exist; pass a ternkit checkpoint (.ckpt) or an export folder.")
    src_model, info = load_model(path)
    src = float_state(src_model)
    tgt = model.state_dict()
    groups = {n: m for n, m in model.named_modules() if isinstance(m, GroupTernaryLinear)}
    new: dict[str, torch.Tensor] = {}
    loaded, converted, kept, wrong = [], [], [], []
    used: set[str] = set()
    for key, t in tgt.items():
        s = src.get(key)
        how = ""
        if s is None:
            s, from_key, how = _derived(key, t, src)
            if s is None:
                kept.append(key)
                continue
            used.add(from_key)
        else:
            used.add(key)
        if tuple(s.shape) != tuple(t.shape):
            full = _expand_block_diagonal(s, t)
            if full is None:
                wrong.append(f"{key} {_shape(s)} in {path.name} vs {_shape(t)} here")
                continue
            s, how = full, f"{key} (block-diagonal {_shape(s)} expanded)"
        new[key] = s.to(dtype=t.dtype, device=t.device)
        (converted if how else loaded).append(how or key)
    for name, mod in groups.items():
        own = [k for k in tgt if k.startswith(f"{name}.")]
        w = src.get(f"{name}.weight")
        if any(k in kept for k in own) and w is not None:
            if tuple(w.shape) != (mod.out_features, mod.in_features):
                wrong.append(f"{name}.weight {_shape(w)} in {path.name} vs {_shape(torch.empty(mod.out_features, mod.in_features))} here")
                continue
            for k in own:
                new.pop(k, None)
            kept = [k for k in kept if k not in own]
            used.add(f"{name}.weight")
            converted.append(f"{name} (ternarized from {name}.weight)")
            mod.load_float_weight(w)
    if wrong:
        raise TernkitError(f"init_from {path}: {len(wrong)} tensor{'s' * (len(wrong) != 1)} differ in shape from this "
                           f"recipe's model ({_listed(wrong, 3)}); make the recipe's model sizes match the source's, "
                           "or start from another checkpoint.")
    if not new and not converted:
        raise TernkitError(f"init_from {path}: none of its tensors has a name this recipe's model uses; start from a "
                           "checkpoint or export of the same architecture (xlstm_lm).")
    # tgt's tensors share storage with the model's, so the group layers' in-place loads above stay.
    model.load_state_dict({**tgt, **new}, strict=True)
    for name, mod in model.named_modules():
        if isinstance(mod, TernaryLinear) and mod.alpha is not None and f"{name}.alpha" in kept:
            mod.alpha.copy_(2.0 * mod.weight.abs().mean())  # LSQ's own init, from the weight just loaded
    ignored = sorted(k for k in src if k not in used and k not in tgt)
    return {"source": str(path), "kind": info["kind"], "loaded": len(loaded), "converted": converted,
            "kept_init": kept, "ignored": ignored}
