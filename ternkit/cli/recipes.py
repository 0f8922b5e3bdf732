"""``ternkit recipes``: list the shipped recipes, print one fully resolved, copy one to edit."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.syntax import Syntax
from rich.table import Table

from ternkit.cli.app import app, console, user_errors
from ternkit.errors import TernkitError
from ternkit.recipe import copy_recipe_file, list_recipes, load_recipe, resolve_recipe

recipes_app = typer.Typer(help="List, show and copy the shipped training recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
@user_errors
def list_cmd() -> None:
    """Show every shipped recipe with its description and architecture."""
    found = list_recipes()
    if not found:
        raise TernkitError("no shipped recipes were found; reinstall ternkit or set TERNKIT_RECIPES to a folder of YAML files.")
    t = Table(title="ternkit recipes")
    t.add_column("name", style="bold cyan", no_wrap=True)
    t.add_column("description")
    t.add_column("architecture / data")
    for name in found:
        r = load_recipe(name)
        t.add_row(name, r.description, r.summary())
    console.print(t)
    console.print("Run one with [bold]ternkit train recipes/<name>.yaml[/] or copy it with [bold]ternkit recipes copy <name> my.yaml[/].")


@recipes_app.command("show")
@user_errors
def show_cmd(
    name: str = typer.Argument(..., help="A shipped recipe name (e.g. mlstm_stc) or a YAML path."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a key, e.g. --set trainer.max_steps=200 (repeatable)."),
) -> None:
    """Print a recipe with every default filled in (what training will actually use)."""
    r = load_recipe(name, set_ or [])
    if console.is_terminal:
        console.print(Syntax(r.to_yaml(), "yaml", theme="ansi_dark", background_color="default"))
    else:
        console.print(r.to_yaml(), end="", markup=False, highlight=False, soft_wrap=True)


@recipes_app.command("copy")
@user_errors
def copy_cmd(
    name: str = typer.Argument(..., help="A shipped recipe name (e.g. mlstm_stc) or a YAML path."),
    dest: Path = typer.Argument(..., help="Where to write the copy (a file, or a folder to put NAME.yaml in)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite DEST if it exists."),
) -> None:
    """Copy a recipe's YAML (comments kept) to DEST so you can edit it."""
    src = resolve_recipe(name)
    load_recipe(src)  # refuse to hand out a recipe that does not validate
    target = dest / src.name if dest.is_dir() else dest
    copy_recipe_file(src, target, force)
    console.print(f"copied [bold]{src.stem}[/] to [bold]{target}[/]; train it with [bold]ternkit train {target}[/]")
