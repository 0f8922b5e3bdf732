"""Shared fixtures for the training-stack tests: toy recipe overrides, in-process and subprocess CLI runs,
and one trained toy checkpoint (session-scoped) reused by the stats, export and error tests."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

# Before torch loads: spinning OpenMP threads slow every test ~10x when two processes share cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent


# Runs the CLI with every training step slowed down (numerics untouched), so that the test can kill
# the process between two checkpoints instead of racing a run that finishes in a second.
SLOW_MAIN = """
import os, sys, time
from ternkit.train.module import TernkitLM

_orig = TernkitLM.training_step
_delay = float(os.environ.get("TERNKIT_TEST_STEP_DELAY", "0"))
_mark = os.environ.get("TERNKIT_TEST_STEP_MARK")  # a file that gets one line as each step starts its delay


def _slow(self, batch, batch_idx):
    if _mark:
        with open(_mark, "a") as fh:
            fh.write(f"{batch_idx}\\n")
    time.sleep(_delay)
    return _orig(self, batch, batch_idx)


TernkitLM.training_step = _slow
from ternkit.cli.main import main

sys.argv[0] = "ternkit"
main()
"""


def sets(*items: str) -> list[str]:
    """``--set`` flags for each ``key=value`` item."""
    out: list[str] = []
    for item in items:
        out += ["--set", item]
    return out


def toy_text_sets(cache_dir: Path | str, steps: int = 4) -> list[str]:
    """Overrides that shrink a stdlib-text recipe to seconds on a CPU (shared token cache)."""
    return sets(
        "model.n_blocks=1", "model.d_model=32", "model.n_heads=4", "model.context_length=32", "model.chunk_size=32",
        "data.max_chars=60000", f"data.cache_dir={cache_dir}", f"trainer.max_steps={steps}", "trainer.batch_size=4",
        f"trainer.val_every={steps}", "trainer.val_batches=2", "trainer.log_every=1", "trainer.sample_tokens=4",
        "schedule.warmup_steps=1", "logging.tensorboard=false", "trainer.accelerator=cpu", "trainer.devices=1",
    )


def toy_train_argv(cache_dir: Path | str, steps: int, *items: str) -> list[str]:
    """``train mlstm_stc --no-progress`` at toy size for ``steps`` steps, plus ``--set`` for each item."""
    return ["train", "mlstm_stc", "--no-progress"] + toy_text_sets(cache_dir, steps) + sets(*items)


#: One intra-op thread per CLI process: runs that share the cores keep every CPU reduction in one fixed
#: order (bit-identical runs), and the repo on the path.
ONE_THREAD_ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def slow_cli_script(cwd: Path) -> Path:
    """``cwd/slow_main.py``: the CLI with every training step slowed down by $TERNKIT_TEST_STEP_DELAY seconds."""
    script = cwd / "slow_main.py"
    script.write_text(SLOW_MAIN)
    return script


def wait_for(proc: subprocess.Popen[str], check: Callable[[], Any], what: str, timeout: float = 180) -> Any:
    """Poll ``check()`` every 50 ms while ``proc`` runs; its first truthy value, or a test failure naming ``what``.

    ``proc`` ending first fails with its output (and ``check`` errors count as "not yet": files
    are being written while we read them); the timeout kills ``proc``.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) before {what}:\n{out}\n{err}")
        try:
            value = check()
        except (OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def start_slow_cli(cwd: Path, argv: list[str], delay: float, mark: Path | None = None) -> subprocess.Popen[str]:
    """``ternkit ARGV`` in ``cwd`` as a background process, each training step ``delay`` seconds slower.

    ``mark``: a file that gets one line at the start of each step's delay, so a test can act inside it.
    """
    env = {**os.environ, **ONE_THREAD_ENV, "TERNKIT_TEST_STEP_DELAY": str(delay)}
    if mark is not None:
        env["TERNKIT_TEST_STEP_MARK"] = str(mark)
    return subprocess.Popen([sys.executable, str(slow_cli_script(cwd))] + argv, cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@dataclass
class CliResult:
    """Exit code and captured output of one in-process CLI call."""

    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        """stdout and stderr together."""
        return self.out + self.err


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``ternkit ARGV`` in this process; returns a :class:`CliResult`."""
    import ternkit.cli.main  # noqa: F401  (registers the verbs)
    from ternkit.cli.app import exit_code_of

    def run(argv: list[str]) -> CliResult:
        capsys.readouterr()
        code = exit_code_of([str(a) for a in argv])
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run


def run_cli_subprocess(argv: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None,
                       script: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m ternkit.cli.main ARGV`` (or ``python SCRIPT ARGV``) in ``cwd``; raises on timeout."""
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONPATH", str(REPO))
    cmd = [sys.executable, script] if script else [sys.executable, "-m", "ternkit.cli.main"]
    return subprocess.run(cmd + [str(a) for a in argv], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """Rows of ``logs/metrics.csv`` of a run."""
    with open(run_dir / "logs" / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from metrics.csv (the last row wins when a resumed run logged a step again)."""
    out: dict[int, float] = {}
    for row in read_metrics(run_dir):
        if row.get("train/loss"):
            out[int(row["step"])] = float(row["train/loss"])
    return out


def error_line(text: str) -> str:
    """The text of the single ``error:`` line in CLI output (asserts there is exactly one)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0].removeprefix("error:").strip()


def assert_one_sentence_error(res: CliResult, full_stop: bool = True) -> str:
    """Exit code 2, no traceback, one ``error:`` line holding one sentence; returns the sentence.

    ``full_stop=False`` tolerates a sentence without its final punctuation (a known cosmetic gap).
    """
    assert res.code == 2, res.text
    assert "Traceback" not in res.text, res.text
    msg = error_line(res.err)
    if full_stop:
        assert msg.endswith((".", "?")), msg
    # A second sentence would start after ". " with a capital letter.
    assert not re.search(r"[.?!]\s+[A-Z]", msg), msg
    return msg


def snapshot(paths: list[Path]) -> dict[Path, tuple[bytes, int]]:
    """Bytes and mtime of each existing file, to prove later that nothing was touched."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths if p.is_file()}


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    """Temporarily change the working directory (session fixtures cannot use monkeypatch)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token cache for every toy stdlib run, so the corpus is tokenized once per session."""
    return tmp_path_factory.mktemp("token_cache")


TOY_STEPS = 12


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory: pytest.TempPathFactory, token_cache: Path) -> Path:
    """Run folder of a toy mlstm_stc training (STC memory, ternary gate, 12 steps), trained once per session."""
    import ternkit.cli.main  # noqa: F401
    from ternkit.cli.app import exit_code_of

    base = tmp_path_factory.mktemp("toy_run")
    run_dir = base / "runs" / "toy"
    argv = ["train", "mlstm_stc", "--no-progress"] + toy_text_sets(token_cache, TOY_STEPS) + sets(
        "name=toy", f"checkpoint.dir={run_dir}", "optimizer.lr=1e-2", "logging.telemetry_every=4",
        "checkpoint.every_steps=4", "trainer.val_every=6")
    with chdir(base):
        code = exit_code_of(argv)
    assert code == 0, f"toy training failed with exit code {code}"
    return run_dir


@pytest.fixture(scope="session")
def toy_moe_run(tmp_path_factory: pytest.TempPathFactory, token_cache: Path) -> Path:
    """Run folder of a toy moe_ternary training (4 experts, top-2), trained once per session."""
    import ternkit.cli.main  # noqa: F401
    from ternkit.cli.app import exit_code_of

    base = tmp_path_factory.mktemp("toy_moe")
    run_dir = base / "runs" / "moe"
    argv = ["train", "moe_ternary", "--no-progress"] + toy_text_sets(token_cache, 3) + sets(
        "name=moe", f"checkpoint.dir={run_dir}", "model.moe.experts=4", "model.moe.top_k=2", "model.moe.hidden=16")
    with chdir(base):
        code = exit_code_of(argv)
    assert code == 0, f"toy MoE training failed with exit code {code}"
    return run_dir


@pytest.fixture
def keep_threads():
    """Restore torch's thread count after a test that sets --threads."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def flat(text: str) -> str:
    """``text`` with every run of whitespace folded to one space (rich wraps table cells)."""
    return " ".join(text.split())
