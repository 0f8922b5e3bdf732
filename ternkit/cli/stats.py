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
    from ternkit.inspect import inspect_model

    if not (deadzone or moe or stc):
        deadzone = True
    out = inspect_model(ckpt, deadzone=deadzone, band=band, moe=moe, stc=stc)
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
