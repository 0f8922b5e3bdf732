"""Write packed exports (safetensors + config + tokenizer) and verify them; loading lives in :mod:`ternkit.checkpoint`."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ternkit import __version__
# Reading exports lives below training and export both (ternkit.checkpoint); re-exported here for callers.
from ternkit.checkpoint import (EXPORT_CONFIG, EXPORT_WEIGHTS, content_digest, is_export_dir,  # noqa: F401
                                load_checkpoint, load_model, load_packed)
from ternkit.errors import TernkitError

__all__ = ["load_checkpoint", "load_model", "export_packed", "load_packed", "check_export", "ExportReport", "pack_model",
           "find_tokenizer", "check_tokenizer_fits", "tokenizer_for"]

_WEIGHTS, _CONFIG = EXPORT_WEIGHTS, EXPORT_CONFIG
_TOKENIZER = "tokenizer.json"


def find_tokenizer(ckpt_path: Path, run_info: dict[str, Any]) -> Path | None:
    """The tokenizer.json that belongs to a checkpoint (in its run folder, from run_info or beside it) or an export folder."""
    if is_export_dir(ckpt_path):
        return ckpt_path / _TOKENIZER if (ckpt_path / _TOKENIZER).is_file() else None
    # Beside the checkpoint first: run_info's run_dir may be relative to another working directory.
    candidates = [ckpt_path.parent / _TOKENIZER]
    if run_info.get("run_dir"):
        candidates.append(Path(run_info["run_dir"]) / _TOKENIZER)
    candidates.append(ckpt_path.parent.parent / _TOKENIZER)
    return next((c for c in candidates if c.is_file()), None)


def tokenizer_for(source: Path, info: dict[str, Any], vocab_size: int, verb: str) -> Any:
    """The tokenizer of the model loaded from ``source`` (``info`` from :func:`load_model`), checked to fit its vocabulary.

    A TernkitError naming ``verb`` (e.g. "generate") when there is none: synthetic-task models have no text.
    """
    tok_path = find_tokenizer(source, info.get("run_info", {}))
    if tok_path is None or not tok_path.exists():
        raise TernkitError(f"no tokenizer.json found for {source} (synthetic-task models have none); {verb} needs a "
                           "text model trained with a tokenizer.")
    return check_tokenizer_fits(tok_path, vocab_size, f"the model in {source}")


def check_tokenizer_fits(tok_path: Path, vocab_size: int, what: str) -> Any:
    """The tokenizer at ``tok_path``; TernkitError when it has ids the model (``vocab_size`` rows) cannot embed."""
    from ternkit.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    if int(tok.vocab_size) > int(vocab_size):
        raise TernkitError(f"{tok_path} has {tok.vocab_size} tokens but {what} has a vocabulary of {vocab_size}; "
                           "put the tokenizer.json the model was trained with beside the checkpoint.")
    return tok


def _trits_and_alpha(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 trits (out, in) and float alpha (per row: (out, 1); otherwise ()) of a latent TernaryLinear."""
    trits = layer.trits()
    alpha = layer.scale_of().detach().float()
    return trits, alpha.reshape(trits.shape[0], 1) if layer.scale == "per_row" else alpha.reshape(())


@torch.no_grad()
def pack_model(model: nn.Module, fmt: str = "2bit") -> nn.Module:
    """Replace every latent TernaryLinear of ``model`` in place by a PackedTernaryLinear (same function); returns it in eval mode.

    The packed layers run :func:`ternkit.ops.ternary_linear.ternary_linear` on the packed trits,
    so this turns a freshly built or trained model into the fast inference model without a file.
    """
    from ternkit.modules.linear import latent_ternary_layers, replace_module
    from ternkit.modules.packed import PackedTernaryLinear

    for name, layer in latent_ternary_layers(model).items():
        trits, alpha = _trits_and_alpha(layer)
        new = PackedTernaryLinear.from_trits(trits, alpha, layer.bias, fmt, layer.act_bits)
        replace_module(model, name, new.to(layer.weight.device))
    return model.eval()


@dataclass
class ExportReport:
    """What an export wrote: per-kind sizes, bits per ternary weight and the ratio to an fp16 copy."""

    out_dir: Path
    fmt: str
    ternary_weights: int
    ternary_bytes: int
    other_params: int
    other_bytes: int
    file_bytes: int
    tokenizer: Path | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    scale_values: int = 0  # float scales of the latent-weight ternary layers (1 per tensor, or 1 per row)
    scale_bytes: int = 0
    scaled_weights: int = 0  # the trits those scales belong to (integer-state group layers keep their own)

    @property
    def scale_bits_per_weight(self) -> float:
        """Bits of float scale per trit of the latent-weight layers."""
        return 8.0 * self.scale_bytes / max(self.scaled_weights, 1)

    @property
    def bits_per_ternary_weight(self) -> float:
        """Packed bits per ternary weight, padding included (scales counted separately)."""
        return 8.0 * self.ternary_bytes / max(self.ternary_weights, 1)

    @property
    def fp16_bytes(self) -> int:
        """Size of the same model with every parameter in fp16."""
        return 2 * (self.ternary_weights + self.other_params)

    @property
    def ratio_to_fp16(self) -> float:
        """fp16 size / export file size."""
        return self.fp16_bytes / max(self.file_bytes, 1)


def _same_path(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder (after resolving links and ``..``)."""
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _check_destination(ckpt_path: Path, out_dir: Path, force: bool) -> None:
    """Refuse an export folder that is a file, the checkpoint's own folder, or (without ``force``) not empty."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TernkitError(f"-o {out_dir} is a file, not a folder; pass -o the path of a new or empty folder.")
    if _same_path(out_dir, ckpt_path.parent):
        # --force would put model.safetensors, config.json and tokenizer.json among the run's own files.
        raise TernkitError(f"-o {out_dir} is the folder that holds {ckpt_path.name}; an export there would mix with "
                           f"the run's files, so pass -o {out_dir / 'export'} instead.")
    try:
        non_empty = out_dir.is_dir() and any(out_dir.iterdir())
    except OSError as err:
        raise TernkitError(f"cannot look into the export folder {out_dir} ({err.strerror or type(err).__name__}); "
                           "pass -o a folder you can read and write.") from None
    if non_empty and not force:
        raise TernkitError(f"export folder {out_dir} already exists and is not empty; pass --force to overwrite it or "
                           "choose another -o.")


def _save_weights(save_file: Callable[..., None], tensors: dict[str, torch.Tensor], path: Path,
                  meta: dict[str, str]) -> None:
    """``save_file`` (safetensors) to ``path``; its I/O failures come back as OSError with the errno."""
    try:
        save_file(tensors, str(path), metadata=meta)
    except OSError:
        raise
    except Exception as err:  # safetensors' Rust error carries the OS error only in its text
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def _write_all_or_nothing(out_dir: Path, writers: list[tuple[str, Callable[[Path], None]]]) -> None:
    """Write every file of an export into ``out_dir`` (created if needed), or none of them.

    Each file is first written under a temporary name beside its place, and the temporaries are
    renamed over the final names only once all of them are complete. On any failure the
    temporaries and the folders this call created are removed, so the folder holds what it held
    before; an OSError (full disk, read-only folder) becomes one sentence naming the fix.
    """
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # innermost first
    staged: list[tuple[Path, Path]] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, write in writers:
            tmp = out_dir / f".{name}.{os.getpid()}.tmp"
            staged.append((tmp, out_dir / name))
            write(tmp)
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException as err:  # Ctrl-C included: no temporary is left behind either way
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        if not isinstance(err, OSError):
            raise
        if err.errno == errno.ENOSPC:
            fix = "free some disk space or pass -o a folder on another disk"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = "pass -o a folder you can write to"
        else:
            fix = "check the folder and pass -o another one if it persists"
        raise TernkitError(f"cannot write the export to {out_dir} ({err.strerror or type(err).__name__}); nothing was "
                           f"written: {fix}.") from None


def export_packed(ckpt_path: str | Path, out_dir: str | Path, fmt: str = "base3", force: bool = False) -> ExportReport:
    """Write ``out_dir`` with model.safetensors (packed trits + scales, other tensors as they are), config.json, tokenizer.json.

    Refuses an existing non-empty ``out_dir`` unless ``force``. safetensors metadata carries
    format "pt", the ternkit version, the packing and the model config.
    """
    from safetensors.torch import save_file

    from ternkit.quant.packing import FORMATS, pack_trits

    if fmt not in FORMATS:
        raise TernkitError(f"unknown packing format {fmt!r}; use --format base3 or --format 2bit.")
    ckpt_path = Path(ckpt_path)
    out_dir = Path(out_dir)
    _check_destination(ckpt_path, out_dir, force)  # before the checkpoint is even read: nothing to undo
    model, info = load_model(ckpt_path)
    if info["kind"] != "checkpoint":
        raise TernkitError(f"{ckpt_path} is already an export; pass the training checkpoint (.ckpt) to export it.")
    cfg = model.config.to_dict()
    tok = find_tokenizer(ckpt_path, info.get("run_info", {}))
    run_dir = info.get("run_info", {}).get("run_dir")
    if run_dir and _same_path(out_dir, Path(run_dir)):
        raise TernkitError(f"-o {out_dir} is the run folder of {ckpt_path}; an export there would mix with the run's "
                           f"files, so pass -o {out_dir / 'export'} instead.")
    if tok is not None and _same_path(out_dir / _TOKENIZER, tok):
        raise TernkitError(f"-o {out_dir} holds the tokenizer.json this export copies ({tok}); pass -o "
                           f"{out_dir / 'export'} instead.")
    if tok is not None:
        check_tokenizer_fits(tok, cfg["vocab_size"], f"the model in {ckpt_path}")
    from ternkit.modules.linear import latent_ternary_layers

    latent = latent_ternary_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, dict[str, Any]] = {}
    rows = []
    tern_w = tern_b = 0
    skip = set()
    scale_n = scale_b = 0
    for name, layer in latent.items():
        trits, alpha = _trits_and_alpha(layer)
        packed, _ = pack_trits(trits, fmt)
        tensors[f"{name}.packed"] = packed.contiguous()
        tensors[f"{name}.alpha"] = alpha.contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().contiguous()
        layers_meta[name] = {"in": layer.in_features, "out": layer.out_features, "fmt": fmt,
                             "alpha_shape": list(alpha.shape), "bias": layer.bias is not None,
                             "act_bits": layer.act_bits}
        skip.update({f"{name}.weight", f"{name}.alpha", f"{name}.bias"})
        tern_w += trits.numel()
        tern_b += packed.numel()
        scale_n += alpha.numel()
        scale_b += alpha.numel() * alpha.element_size()
        rows.append({"layer": name, "shape": list(trits.shape), "bits_per_weight": 8.0 * packed.numel() / trits.numel()})
    scaled_w = tern_w  # the trits the float scales belong to, before the group layers add theirs
    # Integer-state group layers are already packed (base-3 trits + integer scales): they travel as they are.
    from ternkit.modules.group import GroupTernaryLinear

    for name, mod in model.named_modules():
        if isinstance(mod, GroupTernaryLinear):
            n = mod.in_features * mod.out_features
            tern_w += n
            tern_b += mod.packed_trits.numel()
            rows.append({"layer": name, "shape": [mod.out_features, mod.in_features],
                         "bits_per_weight": 8.0 * mod.packed_trits.numel() / n})
    other_params = other_bytes = 0
    for key, val in model.state_dict().items():
        if key in skip:
            continue
        tensors[key] = val.detach().contiguous()
        if torch.is_floating_point(val):
            other_params += val.numel()
        other_bytes += val.numel() * val.element_size()
    # Tied weights share storage; safetensors refuses shared tensors, so each gets its own copy.
    seen: dict[int, str] = {}
    for key in list(tensors):
        ptr = tensors[key].untyped_storage().data_ptr()
        if ptr in seen and tensors[key].numel():
            tensors[key] = tensors[key].clone()
        seen[ptr] = key
    digest = content_digest(tensors)
    meta = {"format": "pt", "ternkit_version": __version__, "packing": fmt, "config": json.dumps(cfg),
            "ternary_layers": json.dumps(layers_meta), "content_sha256": digest}
    config_text = json.dumps({"ternkit_version": __version__, "packing": fmt, "model": cfg,
                              "ternary_layers": layers_meta, "content_sha256": digest}, indent=2)
    writers: list[tuple[str, Callable[[Path], None]]] = [
        (_WEIGHTS, lambda tmp: _save_weights(save_file, tensors, tmp, meta)),
        (_CONFIG, lambda tmp: tmp.write_text(config_text, encoding="utf-8")),
    ]
    if tok is not None:
        writers.append((_TOKENIZER, lambda tmp: shutil.copyfile(tok, tmp)))
    _write_all_or_nothing(out_dir, writers)
    return ExportReport(out_dir, fmt, tern_w, tern_b, other_params, other_bytes, (out_dir / _WEIGHTS).stat().st_size,
                        out_dir / _TOKENIZER if tok is not None else None, rows, scale_n, scale_b, scaled_w)


@torch.no_grad()
def check_export(ckpt_path: str | Path, export_dir: str | Path, seq_len: int = 32, seed: int = 0) -> float:
    """Max |logit difference| between the checkpoint's ternarized forward and the export's, on random tokens (fp32),
    divided by max(1, the largest |logit|): fp32 sums in another order differ by ~1e-7 of the values summed."""
    ref, _ = load_model(ckpt_path)
    packed = load_packed(export_dir)
    vocab = ref.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, seq_len), generator=g)
    with torch.no_grad():
        a, b = ref(tokens).float(), packed(tokens).float()
    return float((a - b).abs().max() / a.abs().max().clamp(min=1.0))
