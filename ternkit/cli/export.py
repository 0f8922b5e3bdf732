"""``ternkit export CKPT --packed``: packed safetensors + config.json + tokenizer.json, with a size table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ternkit.cli.app import app, console, user_errors


# fp32 dot products of a few hundred terms summed in another order (the packed kernels) differ by
# about 1e-7 of the largest logit; measured 7e-7-9e-7 on the main job.
_CHECK_BOUND = 2e-6


@app.command("export")
@user_errors
def export_cmd(
    ckpt: Path = typer.Argument(..., help="The checkpoint to export (e.g. runs/<name>/last.ckpt)."),
    packed: bool = typer.Option(False, "--packed", help="Pack ternary weights (required: the only export kind today)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder (default: <run dir>/export)."),
    fmt: str = typer.Option("base3", "--format", help="Trit packing: base3 (1.6 bits) or 2bit (SIMD-friendly)."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output folder."),
    check: bool = typer.Option(False, "--check", help="Verify the export's logits equal the checkpoint's (max difference "
                               "<= 2e-6 of the largest logit: fp32 rounding)."),
) -> None:
    """Export a checkpoint with packed ternary weights; --check verifies the rebuilt model's logits."""
    from ternkit.errors import TernkitError
    from ternkit.export import check_export, export_packed

    if not packed:
        raise TernkitError("ternkit export needs --packed (packed ternary safetensors is the only export format).")
    out_dir = out if out is not None else ckpt.parent / "export"
    rep = export_packed(ckpt, out_dir, fmt=fmt, force=force)
    t = Table(title=f"export {out_dir} ({fmt})")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("ternary weights", f"{rep.ternary_weights:,}")
    t.add_row("bits per ternary weight", f"{rep.bits_per_ternary_weight:.3f}")
    t.add_row("ternary bytes", f"{rep.ternary_bytes / 1e6:.3f} MB")
    if rep.scale_values:
        t.add_row("ternary scales", f"{rep.scale_bytes / 1e6:.3f} MB ({rep.scale_values:,} floats, "
                  f"{rep.scale_bits_per_weight:.3f} bit/weight)")
    t.add_row("other tensors", f"{rep.other_bytes / 1e6:.3f} MB ({rep.other_params:,} float values)")
    t.add_row("model.safetensors", f"{rep.file_bytes / 1e6:.3f} MB")
    t.add_row("fp16 size of the same model", f"{rep.fp16_bytes / 1e6:.3f} MB")
    t.add_row("ratio to fp16", f"{rep.ratio_to_fp16:.2f}x smaller")
    t.add_row("tokenizer.json", "copied" if rep.tokenizer else "none (synthetic task or not found)")
    console.print(t)
    if rep.rows:
        lt = Table(title="ternary layers")
        lt.add_column("layer", overflow="fold")
        lt.add_column("shape", justify="right")
        lt.add_column("bits/weight", justify="right")
        for row in rep.rows:
            lt.add_row(row["layer"], "x".join(str(d) for d in row["shape"]), f"{row['bits_per_weight']:.3f}")
        console.print(lt)
    if check:
        diff = check_export(ckpt, out_dir)
        if diff > _CHECK_BOUND:
            raise TernkitError(f"export check failed: max |logit diff| {diff:.3g} of the largest logit > {_CHECK_BOUND:g}; "
                               "please report this with the checkpoint.")
        console.print(f"check: max |logit diff| vs checkpoint = {diff:.2e} of the largest logit "
                      f"(<= {_CHECK_BOUND:g}) [green]ok[/]")
