"""``ternkit bench``: in-process, interleaved benchmarks that report median ratios against a dense baseline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ternkit.cli.app import app, console, user_errors

bench_app = typer.Typer(help="Benchmarks: same process, interleaved repeats, median times, ratio vs dense.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _parse_ek(s: str) -> tuple[int, int]:
    from ternkit.errors import TernkitError

    try:
        e, k = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise TernkitError(f"config {s!r} must look like 12x3 (experts x top_k).") from None
    if not 1 <= k <= e:
        raise TernkitError(f"config {s!r}: top_k must lie in [1, experts].")
    return e, k


@bench_app.command("moe")
@user_errors
def bench_moe(
    configs: Optional[List[str]] = typer.Option(None, "--config", help="experts x top_k (repeatable); default 12x3, 8x2, 64x8."),
    modes: Optional[List[str]] = typer.Option(None, "--mode", help="fwd and/or fwdbwd (repeatable); default both."),
    d_model: int = typer.Option(256, "--d-model"),
    hidden: int = typer.Option(256, "--hidden", help="Expert hidden width."),
    tokens: int = typer.Option(4096, "--tokens"),
    repeats: int = typer.Option(7, "--repeats"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's choice)."),
    float_experts: bool = typer.Option(False, "--float-experts", help="nn.Linear experts instead of ternary ones."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
) -> None:
    """Top-k MoE FFN vs running every expert on every token (issue 4's throughput figure)."""
    import torch

    from ternkit.bench import bench_moe_vs_dense, machine_info
    from ternkit.errors import TernkitError

    if threads is not None:
        torch.set_num_threads(threads)
    grid = [_parse_ek(c) for c in (configs or ["12x3", "8x2", "64x8"])]
    modes = modes or ["fwd", "fwdbwd"]
    for m in modes:
        if m not in ("fwd", "fwdbwd"):
            raise TernkitError(f"--mode {m!r} is not a mode; use fwd or fwdbwd.")
    t = Table(title=f"MoE FFN vs all experts dense (D={d_model}, hidden={hidden}, {tokens} tokens, "
                    f"{torch.get_num_threads()} threads, median of {repeats})")
    for col in ("E", "k", "mode", "moe ms", "dense ms", "ratio", "ideal", "max |diff|"):
        t.add_column(col, justify="right")
    results = []
    for e, k in grid:
        for mode in modes:
            r = bench_moe_vs_dense(e, k, d_model, hidden, tokens, mode, repeats, ternary=not float_experts)
            results.append(r)
            t.add_row(str(e), str(k), mode, f"{r['moe_s'] * 1e3:.1f}", f"{r['dense_s'] * 1e3:.1f}",
                      f"{r['ratio']:.2f}x", f"{r['ideal']:.2f}x", f"{r['max_abs_diff']:.1e}")
    console.print(t)
    if json_path is not None:
        json_path.write_text(json.dumps({"benchmark": "moe", "machine": machine_info(), "results": results}, indent=2))
        console.print(f"wrote {json_path}")
