"""``ternkit train RECIPE``: train from a recipe, with --set overrides, --resume, --print-config and --dry-run."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ternkit.cli.app import app, console, user_errors


@app.command("train")
@user_errors
def train_cmd(
    recipe: str = typer.Argument(..., help="Recipe YAML path (recipes/mlstm_stc.yaml) or a shipped recipe name."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key, e.g. --set trainer.max_steps=200 (repeatable)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto' (the run's last.ckpt if any) or a checkpoint path."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved recipe as YAML and stop."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Build data and model, print parameter counts by kind, stop."),
    no_progress: bool = typer.Option(False, "--no-progress", help="A plain line on stderr every trainer.log_every steps "
                                     "instead of the live bar (what a pipe or a log file gets anyway)."),
    json_out: bool = typer.Option(False, "--json", help="Print the run summary as JSON at the end."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Start a new run from the weights of this "
                                            "checkpoint or export (the recipe's init_from)."),
) -> None:
    """Train a ternary model from a recipe; writes runs/<name>/ (recipe, tokenizer, checkpoints, logs)."""
    from ternkit.recipe import load_recipe
    from ternkit.train.run import train

    r = load_recipe(recipe, [*(set_ or []), *([f"init_from={json.dumps(init_from)}"] if init_from else [])])
    if print_config:
        console.print(r.to_yaml(), end="", highlight=False, markup=False, soft_wrap=True)
        return
    res = train(r, resume=resume, dry_run=dry_run, progress="plain" if no_progress else True)
    if dry_run:
        t = Table(title=f"{r.name}: parameters by kind")
        t.add_column("kind")
        t.add_column("count", justify="right")
        for k, v in res.counts.items():
            t.add_row(k, f"{v:,}")
        console.print(t)
        console.print(f"dry run: data and model built, nothing trained (run folder would be {res.run_dir}).")
        return
    if res.global_rank != 0:
        return  # under DDP every rank runs this command; one summary is enough
    if res.finished and not json_out:
        console.print(f"{res.run_dir} already finished at step {res.steps} (trainer.max_steps {r.trainer.max_steps}); "
                      "nothing was trained or written: raise trainer.max_steps with --set to train further.",
                      highlight=False, markup=False)
        return
    if json_out:
        console.print_json(json.dumps(res.to_dict()))
        return
    lines = [f"steps: {res.steps}", f"train loss: {res.train_loss:.4f}"]
    if res.val_loss is not None:
        lines.append(f"val loss: {res.val_loss:.4f}")
    if res.val_acc is not None:
        lines.append(f"val accuracy: {res.val_acc:.4f}")
    if res.resumed_from:
        lines.append(f"resumed from: {res.resumed_from}")
    lines.append(f"run dir: {res.run_dir}  (last.ckpt, recipe.yaml, logs/)")
    console.print(Panel("\n".join(lines), title=f"ternkit train {r.name}", expand=False))
    if res.sample is not None:
        console.print(Panel(Text(res.sample), title="sample", expand=False))
