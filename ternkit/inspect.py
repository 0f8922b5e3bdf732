"""What a trained model looks like inside: dead-zone statistics, MoE expert loads, STC thresholds and skip fraction.

``ternkit stats`` prints :func:`inspect_model`'s report; Python users get the same dict.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ternkit.errors import TernkitError

__all__ = ["deadzone_report", "inspect_model", "probe_batch"]

# Real text every Python install has: the probe for MoE loads and STC sparsity of text models.
_PROBE_TEXT = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"


def _check_band(band: float) -> None:
    if not 0.0 <= band <= 0.5:
        raise TernkitError(f"--band must lie in [0, 0.5], got {band}; use e.g. --band 0.1.")


def deadzone_report(model: nn.Module, band: float) -> dict[str, Any]:
    """Per ternary layer dead-zone fractions plus weight-averaged totals, as plain dicts."""
    from ternkit.quant.deadzone import module_deadzone_stats

    _check_band(band)
    layers = {name: st.to_dict() for name, st in module_deadzone_stats(model, band=band).items()}
    total_n = sum(d["numel"] for d in layers.values()) or 1
    totals: dict[str, Any] = {"numel": total_n}
    for key in ("frac_neg", "frac_zero", "frac_pos", "frac_boundary", "frac_zero_inner"):
        vals = [(d[key], d["numel"]) for d in layers.values() if d.get(key) is not None]
        totals[key] = sum(v * n for v, n in vals) / max(sum(n for _, n in vals), 1) if vals else None
    return {"band": band, "layers": layers, "totals": totals}


def probe_batch(model: nn.Module, source: Path, info: dict[str, Any]) -> tuple[torch.Tensor, str]:
    """A fixed (4, T) probe: real text (stdlib's textwrap.py) through the model's tokenizer when it has one,
    else seeded random tokens (synthetic-task models have no tokenizer). Returns (tokens, description)."""
    from ternkit.export import find_tokenizer
    from ternkit.tokenizer import load_tokenizer

    cfg = model.config
    t = min(cfg.context_length, 128)
    tok_path = find_tokenizer(source, info.get("run_info", {}))
    if tok_path is not None and tok_path.exists() and _PROBE_TEXT.exists():
        ids = load_tokenizer(tok_path).encode(_PROBE_TEXT.read_text(errors="replace"))
        if len(ids) >= 4 * t and max(ids) < cfg.vocab_size:
            return torch.tensor(ids[: 4 * t]).view(4, t), "text (stdlib textwrap.py)"
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (4, t), generator=g), "random tokens"


def inspect_model(source: str | Path, deadzone: bool = True, band: float = 0.1, moe: bool = False,
                  stc: bool = False) -> dict[str, Any]:
    """Report on a checkpoint or export: ``deadzone`` per ternary layer, ``moe`` expert loads, ``stc`` memory sparsity.

    MoE loads and STC zero fractions are properties of a forward pass, so those run the model on a
    fixed probe batch; the STC skip fraction is a decoding figure, counted over 32 greedy steps.
    """
    from ternkit.export import load_model

    source = Path(source)
    _check_band(band)  # before the model loads: a typo should not cost a checkpoint read
    model, info = load_model(source)
    out: dict[str, Any] = {"source": info}
    if deadzone:
        out["deadzone"] = deadzone_report(model, band)
    if moe or stc:
        probe, probe_kind = probe_batch(model, source, info)
        out["probe"] = probe_kind
        with torch.no_grad():
            if stc:
                model.reset_skip_stats()
                model.generate(probe[:1, :16], 32)
            model(probe)
        if moe:
            out["moe"] = model.moe_stats()
            if not out["moe"]:
                raise TernkitError(f"{source} has no MoE blocks; drop --moe.")
        if stc:
            out["stc"] = model.stc_stats()
            if not out["stc"]:
                raise TernkitError(f"{source} has no STC memory (memory_backend is dense); drop --stc.")
    return out
