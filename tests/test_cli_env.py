"""The CLI shell: --help on every verb, --version, env, and exit code 2 for user errors."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

import ternkit
from ternkit.cli.app import app, user_errors
from ternkit.cli.main import _VERBS  # noqa: F401  (registers the verbs)
from ternkit.errors import TernkitError

runner = CliRunner()


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and ternkit.__version__ in res.output


def test_help_on_every_verb() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in app.registered_commands:
        name = cmd.name or cmd.callback.__name__
        sub = runner.invoke(app, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)
        assert "Usage" in sub.output
    for group in app.registered_groups:
        sub = runner.invoke(app, [group.name, "--help"])
        assert sub.exit_code == 0, (group.name, sub.output)


def test_env_json_reports_torch_threads_features() -> None:
    res = runner.invoke(app, ["env", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    import torch

    assert rep["torch"] == torch.__version__
    assert rep["threads"] == torch.get_num_threads()
    assert set(rep["cpu_features"]) >= {"AVX2", "AVX-512", "NEON"}
    assert isinstance(rep["compiled_ops"], list)


def test_user_error_exits_2_with_one_sentence() -> None:
    import typer

    local = typer.Typer()

    @local.command()
    @user_errors
    def boom() -> None:
        raise TernkitError("the thing 'x' is missing; create it first.")

    res = runner.invoke(local, [])
    assert res.exit_code == 2
    assert "the thing 'x' is missing; create it first." in res.output
    assert "Traceback" not in res.output


def test_console_script_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "ternkit.cli.main", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and ternkit.__version__ in out.stdout
