"""A run killed with SIGKILL mid-way (twice: once more during the resumed run) and resumed with --resume auto
reaches the same loss at the same step as an uninterrupted run (toy scale, CPU): model, optimizer, schedule, STC thresholds, integer accumulators, data position."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import (ONE_THREAD_ENV, read_metrics, run_cli_subprocess, sets, slow_cli_script, start_slow_cli,
                      toy_train_argv, train_losses, wait_for)

from ternkit.checkpoint import checkpoint_step

N_STEPS = 12
EVERY = 4



def _kill_after_checkpoint(proc: subprocess.Popen[str], last: Path, min_step: int, timeout: float = 240) -> int:
    """SIGKILL ``proc`` once ``last`` holds a checkpoint at step >= ``min_step``; returns that step."""
    def reached() -> int | None:
        step = checkpoint_step(last) if last.exists() else None
        return step if step is not None and step >= min_step else None

    step = wait_for(proc, reached, f"a checkpoint at step >= {min_step}", timeout)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return step


@pytest.mark.parametrize("variant", ["stc", pytest.param("group", marks=pytest.mark.slow)])
def test_sigkill_then_resume_matches_uninterrupted(variant: str, tmp_path: Path, token_cache: Path) -> None:
    # The group variant also accumulates 2 micro-batches per step: the data position is then 2 * global_step.
    extra = ["quant.scale=group", "trainer.grad_accum=2"] if variant == "group" else []
    common = toy_train_argv(token_cache, N_STEPS, *extra, f"checkpoint.every_steps={EVERY}", "trainer.val_every=5",
                            "optimizer.lr=1e-2")
    # One intra-op thread per process (ONE_THREAD_ENV): A and B share the cores, and a thread count that cannot
    # change under load keeps every CPU reduction in one fixed order (bit-identical runs).
    # B first (slowed), A alongside it: both see the same seed, data and recipe, only the name differs.
    proc_b = start_slow_cli(tmp_path, common + sets("name=b"), 0.4)
    proc_a = start_slow_cli(tmp_path, common + sets("name=a"), 0)
    try:
        killed_at = _kill_after_checkpoint(proc_b, tmp_path / "runs" / "b" / "last.ckpt", EVERY)
        _, err_a = proc_a.communicate(timeout=300)
        assert proc_a.returncode == 0, err_a
    finally:
        for proc in (proc_a, proc_b):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert EVERY <= killed_at < N_STEPS

    # Killed a second time, during the resumed run, once it has written a checkpoint of its own: the log
    # must still hold every step from before the first resume point (nothing logged is rewritten or lost).
    start_resumed = start_slow_cli(tmp_path, common + sets("name=b") + ["--resume", "auto"], 0.4)
    try:
        killed_again = _kill_after_checkpoint(start_resumed, tmp_path / "runs" / "b" / "last.ckpt", killed_at + EVERY)
    finally:
        if start_resumed.poll() is None:
            start_resumed.kill()
            start_resumed.communicate()
    assert killed_at < killed_again < N_STEPS

    res_b = run_cli_subprocess(common + sets("name=b") + ["--resume", "auto"], cwd=tmp_path,
                               script=str(slow_cli_script(tmp_path)), env=ONE_THREAD_ENV)
    assert res_b.returncode == 0, res_b.stderr

    run_a, run_b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    loss_a, loss_b = train_losses(run_a), train_losses(run_b)
    # B's log keeps its history from before each kill and continues it after each resume point, one row per
    # step (the rows of the steps replayed after a resume point replace nothing that came before it).
    assert sorted(loss_a) == sorted(loss_b) == list(range(N_STEPS)), (sorted(loss_a), sorted(loss_b))
    steps_b = [int(r["step"]) for r in read_metrics(run_b) if r.get("train/loss")]
    assert steps_b == list(range(N_STEPS)), steps_b
    # Same batch, weights, optimizer state, LR, tau and integer state at every step, after the resume point too.
    for step in range(N_STEPS):
        assert loss_b[step] == pytest.approx(loss_a[step], abs=1e-6, rel=0), (step, killed_at, loss_a[step], loss_b[step])
    sum_a = json.loads((run_a / "summary.json").read_text())
    sum_b = json.loads((run_b / "summary.json").read_text())
    assert sum_b["steps"] == sum_a["steps"] == N_STEPS
    assert sum_b["resumed_from"] is not None and sum_a["resumed_from"] is None
    assert sum_b["train_loss"] == pytest.approx(sum_a["train_loss"], abs=1e-6, rel=0)
    # Final states agree too: every tensor of the model (trits, scales, tau, accumulators).
    sd_a = torch.load(run_a / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    sd_b = torch.load(run_b / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        if sd_a[key].is_floating_point():
            assert torch.allclose(sd_a[key], sd_b[key], atol=1e-6, rtol=0), key
        else:
            assert torch.equal(sd_a[key], sd_b[key]), key
