"""The Typer application object and the error handling every verb shares."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ternkit import __version__
from ternkit.errors import TernkitError, RunAborted

app = typer.Typer(
    name="ternkit",
    help="Train ternary ({-1, 0, +1}) language models and ship them small and fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

_state = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Wrap a CLI verb: a ``TernkitError`` becomes one red sentence on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TernkitError as err:
            if _state["debug"]:
                raise
            code = int(getattr(err, "exit_code", 2))
            label = "[bold red]error:[/]" if code == 2 else "[yellow]interrupted:[/]"
            err_console.print(f"{label} {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=code) from None
        except (KeyboardInterrupt, RunAborted) as err:
            err_console.print("[yellow]interrupted:[/] aborted at once; checkpoints already on disk are unchanged.")
            raise typer.Exit(code=128 + int(getattr(err, "signum", 2))) from None

    return wrapper  # type: ignore[return-value]


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"ternkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """Train ternary language models from recipes, inspect their trits, export them packed."""
    _state["debug"] = debug


def exit_code_of(argv: list[str]) -> int:
    """Run the CLI in-process on ``argv`` and return its exit code (used by tests)."""
    try:
        app(args=argv, prog_name="ternkit", standalone_mode=True)
    except SystemExit as exc:  # typer/click always exits
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(exit_code_of(sys.argv[1:]))
