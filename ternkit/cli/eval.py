"""``ternkit eval SOURCE``: loss, perplexity and bits per byte on text files or the run's validation split."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import typer
from rich.table import Table

from ternkit.cli.app import app, console, err_console, user_errors


@app.command("eval")
@user_errors
def eval_cmd(
    source: Path = typer.Argument(..., help="A checkpoint (.ckpt) or an export folder (ternkit export --packed)."),
    data: Optional[List[Path]] = typer.Option(None, "--data", help="A UTF-8 text file to score (repeatable); "
                                              "default: the run's own validation split (checkpoints only)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Context-length windows per forward for --data (the "
                                   "validation split is scored in the run's trainer.batch_size, as training did)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score at most this many tokens."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file "
                                             "('-' prints JSON instead of the table)."),
) -> None:
    """Score a model on text: mean loss (nats/token), perplexity and bits per UTF-8 byte.

    Bits per byte compare runs with different tokenizers (bytes vs BPE). A checkpoint is scored
    with its float training layers, so without --data its loss is the run's last val/loss; an
    export runs its packed layers.
    """
    from ternkit.eval import check_eval_args, check_json_path, evaluate, write_json

    check_eval_args(batch_size, max_tokens)  # cheap mistakes before the model loads
    if json_path is not None:
        check_json_path(json_path)
    with _progress_bar() as progress:
        out = evaluate(source, data or None, batch_size=batch_size, max_tokens=max_tokens, progress=progress)
    if json_path is not None and str(json_path) == "-":
        console.print(json.dumps(out, indent=2), markup=False, highlight=False, soft_wrap=True)
        return
    console.print(_table(out))
    if out["capped"]:
        console.print(f"--max-tokens {out['max_tokens']} cut the text: {out['tokens']:,} tokens scored, not all of it.",
                      highlight=False)
    if json_path is not None:
        write_json(json_path, out)
        console.print(f"wrote {json_path}", highlight=False, markup=False)


def _table(out: dict[str, Any]) -> Table:
    """The results as a two-column rich table."""
    t = Table(title="eval")
    t.add_column("what")
    t.add_column("value", justify="right", overflow="fold")
    bpb = out["bits_per_byte"]
    data = out["data"]
    rows = [("loss (nats/token)", f"{out['loss']:.4f}"), ("perplexity", f"{out['perplexity']:.3f}"),
            ("bits/byte", "-" if bpb is None else f"{bpb:.4f}"),
            ("tokens", f"{out['tokens']:,}" + (" (capped by --max-tokens)" if out["capped"] else "")),
            ("bytes", f"{out['bytes']:,}"),
            ("source", f"{out['source']} ({out['kind']}" + (f", step {out['global_step']})"
                                                            if out.get("global_step") is not None else ")")),
            ("data", ", ".join(data) if isinstance(data, list) else str(data))]
    for k, v in rows:
        t.add_row(k, v)
    return t


@contextlib.contextmanager
def _progress_bar() -> Iterator[Optional[Callable[[int, int], None]]]:
    """A rich progress bar over batches on stderr when it is a terminal; yields its callback (None otherwise)."""
    if not err_console.is_terminal:
        yield None  # a pipe or a log file gets the results only
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err_console,
                  transient=True) as bar:
        task = bar.add_task("eval", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
