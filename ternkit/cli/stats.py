"""``ternkit stats CKPT``: where the trits sit (--deadzone), expert loads (--moe), STC thresholds (--stc)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ternkit.cli.app import app, console, user_errors


def _print_table(t: Table) -> None:
    """Print a table; piped output is read by people too, so it gets 120 columns instead of rich's 80."""
    if console.is_terminal:
        console.print(t)
    else:
        Console(file=console.file, width=max(console.width, 120)).print(t)


def _fmt(v: Any) -> str:
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(_fmt(x) for x in v) + "]"
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def deadzone_report(model: Any, band: float) -> dict[str, Any]:
    """Per ternary layer dead-zone fractions plus weight-averaged totals, as plain dicts."""
    from ternkit.quant.deadzone import module_deadzone_stats

    layers = {name: st.to_dict() for name, st in module_deadzone_stats(model, band=band).items()}
    total_n = sum(d["numel"] for d in layers.values()) or 1
    totals: dict[str, Any] = {"numel": total_n}
    for key in ("frac_neg", "frac_zero", "frac_pos", "frac_boundary", "frac_zero_inner"):
        vals = [(d[key], d["numel"]) for d in layers.values() if d.get(key) is not None]
        totals[key] = sum(v * n for v, n in vals) / max(sum(n for _, n in vals), 1) if vals else None
    return {"band": band, "layers": layers, "totals": totals}


def _probe_batch(model: Any, src: Path, info: dict[str, Any]) -> tuple[Any, str]:
    """A fixed (4, T) probe: real text (stdlib's textwrap.py) through the model's tokenizer when it has one,
    else seeded random tokens (synthetic-task models have no tokenizer). Returns (tokens, description)."""
    import sysconfig

    import torch

    from ternkit.export import find_tokenizer
    from ternkit.train.tokenizer import load_tokenizer

    cfg = model.config
    t = min(cfg.context_length, 128)
    tok_path = find_tokenizer(src, info.get("run_info", {}))
    text_file = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    if tok_path is not None and tok_path.exists() and text_file.exists():
        ids = load_tokenizer(tok_path).encode(text_file.read_text(errors="replace"))
        if len(ids) >= 4 * t and max(ids) < cfg.vocab_size:
            return torch.tensor(ids[: 4 * t]).view(4, t), "text (stdlib textwrap.py)"
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (4, t), generator=g), "random tokens"


@app.command("stats")
@user_errors
def stats_cmd(
    ckpt: Path = typer.Argument(..., help="A ternkit checkpoint (.ckpt) or an export folder."),
    deadzone: bool = typer.Option(False, "--deadzone", help="Per-layer trit fractions, knife-edge band and deep zeros."),
    band: float = typer.Option(0.1, "--band", help="Half-width of the knife-edge band around |w/alpha| = 0.5."),
    moe: bool = typer.Option(False, "--moe", help="Expert loads of MoE blocks (from the last forward on a probe batch)."),
    stc: bool = typer.Option(False, "--stc", help="STC memory thresholds and zero fractions."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Inspect a checkpoint or export: dead-zone statistics per ternary layer, MoE loads, STC sparsity."""
    import torch

    from ternkit.errors import TernkitError
    from ternkit.export import load_model

    if not 0.0 <= band <= 0.5:
        raise TernkitError(f"--band must lie in [0, 0.5], got {band}; use e.g. --band 0.1.")
    model, info = load_model(ckpt)
    if not (deadzone or moe or stc):
        deadzone = True
    out: dict[str, Any] = {"source": info}
    if deadzone:
        out["deadzone"] = deadzone_report(model, band)
    if moe or stc:
        # Loads and zero fractions are properties of a forward pass: run one on a fixed probe batch.
        probe, probe_kind = _probe_batch(model, ckpt, info)
        out["probe"] = probe_kind
        with torch.no_grad():
            if stc:
                # The skip fraction is a decoding figure: count the sparse writes of 32 greedy steps.
                for block in getattr(model, "blocks", []):
                    block.mlstm.reset_skip_stats()
                model.generate(probe[:1, :16], 32)
            model(probe)
        if moe:
            out["moe"] = model.moe_stats()
            if not out["moe"]:
                raise TernkitError(f"{ckpt} has no MoE blocks; drop --moe.")
        if stc:
            out["stc"] = model.stc_stats()
            if not out["stc"]:
                raise TernkitError(f"{ckpt} has no STC memory (memory_backend is dense); drop --stc.")
    if json_out:
        text = json.dumps(out, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        # Plain text for machines: no highlighting, no wrapping at the terminal width.
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        return
    if deadzone:
        rep = out["deadzone"]
        t = Table(title=f"dead zone of {ckpt} (band {band})")
        # Layer names are the useful part of the table: never fold them, narrow the number columns instead.
        t.add_column("layer", no_wrap=True, min_width=max([len(n) for n in rep["layers"]] + [5]))
        for col in ("weights", "alpha", "-1", "0", "+1", "edge", "deep 0"):
            t.add_column(col, justify="right", no_wrap=True)
        for name, d in rep["layers"].items():
            t.add_row(name, f"{d['numel']:,}", _fmt(d["alpha"]), _fmt(d["frac_neg"]), _fmt(d["frac_zero"]),
                      _fmt(d["frac_pos"]), _fmt(d["frac_boundary"]), _fmt(d["frac_zero_inner"]))
        tot = rep["totals"]
        t.add_section()
        t.add_row("total", f"{tot['numel']:,}", "", _fmt(tot["frac_neg"]), _fmt(tot["frac_zero"]), _fmt(tot["frac_pos"]),
                  _fmt(tot["frac_boundary"]), _fmt(tot["frac_zero_inner"]), style="bold")
        _print_table(t)
    if moe:
        t = Table(title=f"MoE expert loads (probe: {out['probe']})")
        for col in ("block", "tokens per expert", "imbalance", "entropy", "dropped"):
            t.add_column(col)
        for d in out["moe"]:
            t.add_row(str(d["block"]), " ".join(str(int(v)) for v in d.get("tokens_per_expert", [])),
                      _fmt(d.get("load_imbalance")), _fmt(d.get("router_entropy")), _fmt(d.get("dropped_frac")))
        _print_table(t)
    if stc:
        t = Table(title=f"STC memory (probe: {out['probe']})")
        t.add_column("block")
        t.add_column("stats")
        for d in out["stc"]:
            t.add_row(str(d["block"]), ", ".join(f"{k}={_fmt(v)}" for k, v in d.items() if k != "block"))
        _print_table(t)
