"""Entry point of the ``ternkit`` console script: imports every verb module, then runs the app."""

from __future__ import annotations

import importlib

from ternkit.cli.app import app

# One module per verb; each registers itself on ``app`` at import.
_VERBS = ("env", "train", "recipes", "stats", "export", "generate", "eval", "bench")
for _name in _VERBS:
    importlib.import_module(f"ternkit.cli.{_name}")


def main() -> None:
    """Run the ternkit CLI."""
    app(prog_name="ternkit")


if __name__ == "__main__":  # pragma: no cover
    main()
