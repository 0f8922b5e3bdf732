"""Run folders that survive real life: Ctrl-C and SIGTERM save and exit 130 / 143, one owner per folder, the newest
checkpoint resumes, a finished run is left alone, stray temporary files are cleaned, logs are append-only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (ONE_THREAD_ENV, assert_one_sentence_error, read_metrics, sets, snapshot, start_slow_cli,
                      toy_train_argv, train_losses, wait_for)

from ternkit.checkpoint import checkpoint_step

N_STEPS = 10


def _common(token_cache: Path, name: str) -> list[str]:
    return toy_train_argv(token_cache, N_STEPS, f"name={name}", "checkpoint.every_steps=4", "trainer.val_every=5",
                          "logging.telemetry_every=3", "optimizer.lr=1e-2")


def _wait_for_rows(proc: subprocess.Popen[str], metrics: Path, n: int) -> None:
    """Until ``metrics`` holds ``n`` train/loss rows (training is under way)."""
    wait_for(proc, lambda: metrics.is_file() and len([r for r in read_metrics(metrics.parent.parent)
                                                      if r.get("train/loss")]) >= n, f"{n} logged training steps")


def _trained(cli, argv: list[str], run: Path) -> Path:
    """Train ``argv`` in-process (it must succeed) and return its run folder ``run``."""
    res = cli(argv)
    assert res.code == 0, res.text
    return run


def _rows(run_dir: Path) -> list[tuple[str, ...]]:
    keys = ("step", "train/loss", "val/loss", "lr")
    return [tuple(r.get(k, "") for k in keys) for r in read_metrics(run_dir)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_checkpoint_exits_128_plus_signum_and_resume_matches(sig: int, tmp_path: Path,
                                                                           token_cache: Path) -> None:
    ref = subprocess.run([sys.executable, "-m", "ternkit.cli.main"] + _common(token_cache, "a"), cwd=tmp_path,
                         env={**os.environ, **ONE_THREAD_ENV}, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    proc = start_slow_cli(tmp_path, _common(token_cache, "b"), delay=0.4)
    run_b = tmp_path / "runs" / "b"
    try:
        _wait_for_rows(proc, run_b / "logs" / "metrics.csv", 2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, (out, err)
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1, err
    name = signal.Signals(sig).name
    step = int(torch.load(run_b / "last.ckpt", map_location="cpu", weights_only=True)["global_step"])
    assert 2 <= step < N_STEPS
    assert f"{name}: training stopped at step {step} and saved {Path('runs') / 'b' / 'last.ckpt'}" in lines[0]
    assert "--resume auto" in lines[0] and "Traceback" not in err
    assert not (run_b / "summary.json").exists()  # a cut-short run has no final summary
    res = subprocess.run([sys.executable, "-m", "ternkit.cli.main", "train", str(run_b / "recipe.yaml"), "--no-progress",
                          "--resume", "auto"], cwd=tmp_path, env={**os.environ, **ONE_THREAD_ENV}, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    run_a = tmp_path / "runs" / "a"
    # The whole history, step labels, validation and telemetry rows included, equals the uninterrupted run's.
    assert _rows(run_b) == _rows(run_a)
    assert read_metrics(run_b)[0].keys() == read_metrics(run_a)[0].keys()
    sd_a = torch.load(run_a / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    sd_b = torch.load(run_b / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key


def test_second_ctrl_c_aborts_without_touching_checkpoints(tmp_path: Path, token_cache: Path) -> None:
    mark = tmp_path / "steps.txt"
    proc = start_slow_cli(tmp_path, _common(token_cache, "c"), delay=0.4, mark=mark)
    run = tmp_path / "runs" / "c"
    try:
        wait_for(proc, (run / "last.ckpt").is_file, "the first checkpoint")
        before = snapshot([run / "last.ckpt"])
        assert before, "no checkpoint was written"
        # Both signals inside one step's 0.4 s delay: a first one that lands as a step ends would let the
        # graceful stop finish before the second arrives, which is the other test's case.
        started = len(mark.read_text().splitlines())
        wait_for(proc, lambda: len(mark.read_text().splitlines()) > started, "the next step")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted: aborted at once; checkpoints already on disk are unchanged." in err
    # The abort came before the stop's own save: the step-4 checkpoint is as it was (or, if the save won the
    # race, it was replaced atomically by a complete one); no temporary file is left either way.
    step = int(torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)["global_step"])
    assert step >= 4 and not list(run.glob(".*.tmp"))


def test_run_folder_is_locked_while_a_run_owns_it(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  token_cache: Path) -> None:
    from ternkit.train.guard import RunLock

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "locked"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("a: 1\n")
    before = snapshot([run / "recipe.yaml", run / ".lock"])
    with RunLock(run):
        res = cli(_common(token_cache, "locked"))
        msg = assert_one_sentence_error(res)
        assert f"{Path('runs') / 'locked'} is in use by another ternkit run (pid {os.getpid()})" in msg
        assert "--set name=<new name>" in msg
        assert snapshot([run / "recipe.yaml"]) == {k: v for k, v in before.items() if k.name == "recipe.yaml"}
    # A lock whose owner died (here: released) is free again: the same command trains.
    assert cli(_common(token_cache, "locked")).code == 0


def test_resume_auto_takes_the_newest_checkpoint_and_a_fresh_run_is_refused(cli, monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path, token_cache: Path) -> None:
    monkeypatch.chdir(tmp_path)
    argv = _common(token_cache, "best") + sets("trainer.max_steps=6", "trainer.val_every=3")
    run = _trained(cli, argv, tmp_path / "runs" / "best")
    (run / "last.ckpt").unlink()  # only best.ckpt is left (step 3 or 6, whichever validated lower)
    best_step = int(torch.load(run / "best.ckpt", map_location="cpu", weights_only=True)["global_step"])
    before = snapshot([run / "best.ckpt", run / "logs" / "metrics.csv"])
    res = cli(argv)
    msg = assert_one_sentence_error(res)
    assert "already holds a run (best.ckpt)" in msg and "--resume auto" in msg
    assert snapshot(list(before)) == before
    res = cli(argv + ["--resume", "auto", "--json"])
    assert res.code == 0, res.text
    assert f'"resumed_from": "{Path("runs") / "best" / "best.ckpt"}"' in res.out
    # The history before the resume point is kept; the replayed steps come after it.
    assert sorted(train_losses(run)) == list(range(6)) and best_step in (3, 6)


def test_resuming_a_finished_run_changes_nothing(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 token_cache: Path) -> None:
    monkeypatch.chdir(tmp_path)
    argv = _common(token_cache, "done") + sets("trainer.max_steps=4")
    assert cli(argv).code == 0
    run = tmp_path / "runs" / "done"
    files = [run / n for n in ("last.ckpt", "summary.json", "recipe.yaml", "tokenizer.json")] + [run / "logs" / "metrics.csv"]
    before = snapshot(files)
    res = cli(argv + ["--resume", "auto"])
    assert res.code == 0, res.text
    assert "already finished at step 4" in " ".join(res.out.split())
    assert snapshot(files) == before


def test_stray_tmp_files_are_cleaned_at_the_nextstart_slow_cli(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       token_cache: Path) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "tmp"
    (run / "logs").mkdir(parents=True)
    strays = [run / ".last.ckpt.abc123.tmp", run / "logs" / ".metrics.csv.99.tmp"]
    for p in strays:
        p.write_bytes(b"half a file")
    keep = run / "notes.tmp"  # not one of ternkit's hidden temporaries
    keep.write_text("mine")
    assert cli(_common(token_cache, "tmp") + sets("trainer.max_steps=2")).code == 0
    assert not any(p.exists() for p in strays) and keep.read_text() == "mine"


def test_append_only_log_keeps_rows_before_the_resume_point(tmp_path: Path) -> None:
    from ternkit.train.metrics_log import AppendOnlyCSVLogger

    log = AppendOnlyCSVLogger(tmp_path)
    for step in range(6):
        log.log_metrics({"train/loss": 1.0 + step}, step=step)
    log.log_metrics({"val/loss": 9.0}, step=5)  # a new column widens the header in place
    text = (tmp_path / "logs" / "metrics.csv").read_text()
    assert text.splitlines()[0] == "step,train/loss,val/loss"
    # A resumed run at step 4: rows 4 and 5 are the checkpoint's future and are logged again by the replay.
    log2 = AppendOnlyCSVLogger(tmp_path, keep_before=4)
    log2.log_metrics({"train/loss": 5.0}, step=4)
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == ["0", "1", "2", "3", "4"]
    assert not list((tmp_path / "logs").glob(".*.tmp"))


def test_full_disk_while_logging_is_one_sentence(cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 token_cache: Path) -> None:
    import errno

    import ternkit.train.metrics_log as ml

    monkeypatch.chdir(tmp_path)

    def full(self: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ml._AppendWriter, "save", full)
    msg = assert_one_sentence_error(cli(_common(token_cache, "full") + sets("trainer.max_steps=2")))
    assert "is full (No space left on device)" in msg and "--resume auto" in msg


def test_square_brackets_in_values_and_paths_reach_the_sentence_intact(cli) -> None:
    # rich markup would eat "[5]" or "[such]" (or crash on "[/x]") if the message were printed as markup.
    msg = assert_one_sentence_error(cli(["train", "mlstm_stc", "--set", "trainer.max_steps=[5]", "--dry-run"]))
    assert "got [5]" in msg
    msg = assert_one_sentence_error(cli(["train", "/tmp/no[such]/x[/y].yaml"]))
    assert "/tmp/no[such]/x[/y].yaml" in msg


def test_a_resumed_run_keeps_writing_last_ckpt_and_refuses_new_optimizer_groups(cli, monkeypatch: pytest.MonkeyPatch,
                                                                                tmp_path: Path, token_cache: Path) -> None:
    monkeypatch.chdir(tmp_path)
    # every_steps > max_steps: the first run's only checkpoint is the final one, which names no last_model_path.
    argv = _common(token_cache, "ext") + sets("trainer.max_steps=2", "checkpoint.every_steps=3")
    run = _trained(cli, argv, tmp_path / "runs" / "ext")
    before = snapshot([run / "last.ckpt", run / "logs" / "metrics.csv"])
    # Without the cap the latent ternary weights would share the float matrices' group: another layout.
    res = cli(argv + sets("trainer.max_steps=8", "optimizer.ternary_lr_max=null") + ["--resume", "auto"])
    msg = assert_one_sentence_error(res)
    assert "other optimizer parameter groups" in msg and "optimizer.ternary_lr_max 0.002 -> None" in msg
    assert snapshot(list(before)) == before
    # Extended from its final checkpoint (which carries no last_model_path), the run's step checkpoints still
    # go to last.ckpt, not to a versioned last-v1.ckpt that --resume auto would never see.
    proc = start_slow_cli(tmp_path, argv + sets("trainer.max_steps=8") + ["--resume", "auto"], delay=0.3)
    try:
        _wait_for_rows(proc, run / "logs" / "metrics.csv", 7)
        def at_least_6() -> int | None:
            step = checkpoint_step(run / "last.ckpt")
            return step if step is not None and step >= 6 else None

        step = wait_for(proc, at_least_6, "last.ckpt at step 6", timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert step >= 6 and not list(run.glob("last-v*.ckpt"))


def test_a_row_cut_off_mid_write_is_dropped_when_the_log_reopens(tmp_path: Path) -> None:
    from ternkit.train.metrics_log import AppendOnlyCSVLogger

    log = AppendOnlyCSVLogger(tmp_path)
    for step in range(3):
        log.log_metrics({"train/loss": 1.0 + step}, step=step)
    path = tmp_path / "logs" / "metrics.csv"
    path.write_bytes(path.read_bytes() + b"3,4.0")  # half a row, no newline
    log2 = AppendOnlyCSVLogger(tmp_path, keep_before=3)
    log2.log_metrics({"train/loss": 4.5}, step=3)
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [("0", "1.0"), ("1", "2.0"), ("2", "3.0"),
                                                                              ("3", "4.5")]
