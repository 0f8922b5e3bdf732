"""Load ternkit checkpoints and exports, write packed exports (safetensors + config + tokenizer), verify them."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ternkit import __version__
from ternkit.checkpoint import load_checkpoint, model_from_checkpoint, model_from_config
from ternkit.errors import TernkitError

__all__ = ["load_checkpoint", "load_model", "export_packed", "load_packed", "check_export", "ExportReport", "pack_model",
           "find_tokenizer", "check_tokenizer_fits"]

_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"
_TOKENIZER = "tokenizer.json"


def _is_export_dir(path: Path) -> bool:
    return path.is_dir() and (path / _WEIGHTS).exists() and (path / _CONFIG).exists()


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A model in eval mode from a checkpoint file or an export folder, and a dict of facts about the source."""
    path = Path(path)
    if _is_export_dir(path):
        return load_packed(path), {"kind": "export", "path": str(path)}
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    return model, {"kind": "checkpoint", "path": str(path), "global_step": ckpt.get("global_step"),
                   "run_info": ckpt["ternkit"].get("run_info", {})}


def find_tokenizer(ckpt_path: Path, run_info: dict[str, Any]) -> Path | None:
    """The tokenizer.json that belongs to a checkpoint (in its run folder, from run_info or beside it) or an export folder."""
    if _is_export_dir(ckpt_path):
        return ckpt_path / _TOKENIZER if (ckpt_path / _TOKENIZER).is_file() else None
    # Beside the checkpoint first: run_info's run_dir may be relative to another working directory.
    candidates = [ckpt_path.parent / _TOKENIZER]
    if run_info.get("run_dir"):
        candidates.append(Path(run_info["run_dir"]) / _TOKENIZER)
    candidates.append(ckpt_path.parent.parent / _TOKENIZER)
    return next((c for c in candidates if c.is_file()), None)


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


def _swap_in_packed(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    from ternkit.modules.linear import replace_module
    from ternkit.modules.packed import PackedTernaryLinear

    for name, meta in layers.items():
        new = PackedTernaryLinear(meta["in"], meta["out"], meta["fmt"], tuple(meta["alpha_shape"]), meta["bias"],
                                  meta["act_bits"])
        replace_module(model, name, new)


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
    model, info = load_model(ckpt_path)
    if info["kind"] != "checkpoint":
        raise TernkitError(f"{ckpt_path} is already an export; pass the training checkpoint (.ckpt) to export it.")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise TernkitError(f"export folder {out_dir} already exists and is not empty; pass --force to overwrite it or "
                           "choose another -o.")
    cfg = model.config.to_dict()
    tok = find_tokenizer(ckpt_path, info.get("run_info", {}))
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
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "ternkit_version": __version__, "packing": fmt, "config": json.dumps(cfg),
            "ternary_layers": json.dumps(layers_meta)}
    tmp = out_dir / (_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(out_dir / _WEIGHTS)
    (out_dir / _CONFIG).write_text(json.dumps({"ternkit_version": __version__, "packing": fmt, "model": cfg,
                                               "ternary_layers": layers_meta}, indent=2))
    if tok is not None:
        shutil.copyfile(tok, out_dir / _TOKENIZER)
    return ExportReport(out_dir, fmt, tern_w, tern_b, other_params, other_bytes, (out_dir / _WEIGHTS).stat().st_size,
                        out_dir / _TOKENIZER if tok is not None else None, rows, scale_n, scale_b, scaled_w)


def load_packed(path: str | Path) -> nn.Module:
    """Rebuild the model of an export folder (eval mode): ternary layers become PackedTernaryLinear."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not _is_export_dir(path):
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
    model = model_from_config(json.loads(meta["config"]))
    _swap_in_packed(model, json.loads(meta.get("ternary_layers", "{}")))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise TernkitError(f"{path} does not match its config ({str(err).splitlines()[0]}); export it again.") from None
    return model.eval()


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
