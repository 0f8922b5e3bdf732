"""What keeps a run folder whole: one owning process at a time, stray temporary files cleaned, signals that save.

* :class:`RunLock` holds an OS lock on ``<run>/.lock`` while a run owns the folder; the kernel drops
  it when the process dies (even by SIGKILL), so a killed run never leaves it stuck.
* :func:`clean_stray_tmp` removes the ``.*.tmp`` files an earlier run left when it was killed
  mid-write or hit a full disk (checkpoint, log and recipe writes all go through such files).
* :class:`GracefulStop` turns SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) into a checkpoint at
  the end of the current optimizer step and a :class:`RunInterrupted` error that the CLI turns into
  one line and exit code 130 / 143; a second Ctrl-C aborts at once, leaving the last complete
  checkpoint as it was (every checkpoint write is atomic).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L

from ternkit.errors import RunAborted, TernkitError

__all__ = ["RunLock", "clean_stray_tmp", "is_rank_zero", "recover_held_back", "GracefulStop", "RunInterrupted",
           "RunAborted", "LOCK_FILE"]

LOCK_FILE = ".lock"

try:  # POSIX; elsewhere a run folder is not locked (ternkit's compiled ops target Linux and macOS)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "GROUP_RANK")


def is_rank_zero() -> bool:
    """True in the process that owns the run folder: global rank 0 of a (possibly) distributed launch.

    Reads the launchers' variables (torchrun: RANK, LOCAL_RANK, GROUP_RANK; Lightning: NODE_RANK,
    LOCAL_RANK; SLURM: SLURM_PROCID), so every other rank of the same run leaves the folder alone.
    """
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in _RANK_VARS)


class RunLock:
    """An exclusive, non-blocking OS lock on ``run_dir/.lock`` (the owner's pid inside) for the ``with`` block.

    A second process that tries to take it gets one sentence naming the folder and the owner's pid.
    Only rank 0 of a distributed launch locks: the other ranks are the same run.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []  # the folders acquire() made, innermost first

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`TernkitError` when another live process holds it."""
        if fcntl is None or not is_rank_zero():
            return self
        try:
            self._created = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TernkitError(f"cannot use {self.run_dir} as the run folder ({err.strerror or type(err).__name__}); "
                               "point checkpoint.dir at a writable folder.") from None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)  # a file system without flock (some network mounts): run unlocked, as before
                return self
            try:
                owner = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise TernkitError(f"{self.run_dir} is in use by another ternkit run (pid {owner}); wait for it to finish, "
                               "or train into another folder with --set name=<new name>.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock; a folder this lock created and nothing else wrote into is removed again.

        The lock file of a used folder stays: removing it would race a process that is opening it.
        """
        if self._fd is None:
            return
        if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink(missing_ok=True)  # a run that failed before writing anything leaves no folder
            with contextlib.suppress(OSError):
                for d in self._created:
                    d.rmdir()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def recover_held_back(run_dir: Path) -> Path | None:
    """Put a held-back last.ckpt in place when it is newer than last.ckpt (the run was killed before its next step).

    A kill is no evidence against it (a NaN would have discarded it), and it may be up to
    ``checkpoint.every_steps`` steps ahead. An unreadable or older one is left for :func:`clean_stray_tmp`.
    """
    from ternkit.checkpoint import checkpoint_step
    from ternkit.train.callbacks import held_back_path

    last = Path(run_dir) / "last.ckpt"
    held = held_back_path(last)
    if not held.is_file():
        return None
    s_held = checkpoint_step(held)
    s_last = checkpoint_step(last) if last.is_file() else -1
    if s_held is None or (s_last is not None and s_held <= s_last):
        return None
    os.replace(held, last)
    return last


def clean_stray_tmp(run_dir: Path) -> list[Path]:
    """Delete the ``.*.tmp`` files in ``run_dir`` and ``run_dir/logs`` (left by a killed write); returns them.

    A held-back last.ckpt newer than last.ckpt is put in place first (:func:`recover_held_back`).
    """
    recover_held_back(run_dir)
    gone = []
    for folder in (Path(run_dir), Path(run_dir) / "logs"):
        if not folder.is_dir():
            continue
        for p in folder.glob(".*.tmp"):
            if p.is_file():
                p.unlink(missing_ok=True)
                gone.append(p)
    return gone


class RunInterrupted(TernkitError):
    """SIGINT or SIGTERM stopped the run after it saved a checkpoint; exit code 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


_SIGNALS = ("SIGINT", "SIGTERM")


def _ignore_signals() -> None:
    """Ignore SIGINT / SIGTERM for the rest of the process (its last moments: nothing is written any more)."""
    for name in _SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def _leave_now(signum: int, frame: Any) -> None:
    """Exit 128 + signum at once with the abort line (nothing is being written any more)."""
    os.write(2, b"interrupted: aborted at once; checkpoints already on disk are unchanged.\n")
    os._exit(128 + signum)


class GracefulStop(L.Callback):
    """SIGINT / SIGTERM -> checkpoint ``run_dir/last.ckpt`` at the end of the current optimizer step, then stop.

    The handlers are installed when training starts and restored when it ends, in the main thread
    of a single-process run (under DDP Lightning's own handling stays). The checkpoint is written
    where Lightning's step checkpoints are (``on_train_batch_end``), so ``--resume auto`` replays the
    rest of the run exactly; no validation runs after the signal. ``signum`` and ``saved`` (path,
    step) tell the caller what happened; :meth:`error` builds the user's one line.
    """

    def __init__(self, run_dir: Path, val_every: int = 0, max_steps: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.val_every = int(val_every)
        self.max_steps = int(max_steps)
        self.signum: int | None = None
        self.saved: tuple[Path, int] | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise RunAborted(signum)
        self.signum = signum
        name = signal.Signals(signum).name
        again = " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else ""
        # os.write, not print: a handler may run while the main thread is inside a print of its own.
        os.write(2, f"\n{name} received: saving a checkpoint at the end of this step{again}\n".encode())

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in _SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)

    def _restore(self) -> None:
        for sig, old in self._previous.items():
            # After a graceful stop the checkpoint is on disk: another signal while the process winds down
            # leaves at once and quietly, instead of a KeyboardInterrupt traceback from some finalizer.
            signal.signal(sig, old if self.signum is None else _leave_now)
        self._previous = {}

    def linger(self) -> None:
        """After the stop (Lightning's teardown put its own handlers back): later signals leave quietly.

        Until the interpreter shuts down they exit 128 + signum at once; from the ``atexit`` phase on
        they are ignored, because Python's shutdown resets a Python-level handler to the default
        action, and a signal landing there would kill the process (-signum, not 128 + signum).
        """
        if self.signum is not None and threading.current_thread() is threading.main_thread():
            for name in _SIGNALS:
                signal.signal(getattr(signal, name), _leave_now)
            atexit.register(_ignore_signals)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:
            self._install()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.signum is None or self.saved is not None:
            return
        accum = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        if (batch_idx + 1) % accum:
            return  # mid-accumulation: the step is not complete yet
        step = int(trainer.global_step)
        if self.max_steps and step >= self.max_steps:
            return  # the last step: the run finishes (and saves) as it would have
        path = self.run_dir / "last.ckpt"
        trainer.save_checkpoint(str(path), weights_only=False, storage_options={"verified": True})
        self.saved = (path, step)
        trainer.should_stop = True
        scheduled = self.val_every > 0 and step % self.val_every == 0
        loop = trainer.fit_loop.epoch_loop
        if not scheduled and hasattr(loop, "_skip_next_val"):
            # Lightning validates when a run stops early; an uninterrupted run would not validate here, and
            # the resumed one will not either. A scheduled validation runs, as it would have.
            loop._skip_next_val = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def error(self, recipe_arg: str = "RECIPE", signum: int | None = None) -> RunInterrupted:
        """The :class:`RunInterrupted` to raise once ``fit`` has returned after a signal (``signum``: this one)."""
        signum = int(signum if signum is not None else self.signum or signal.SIGTERM)
        name = signal.Signals(signum).name
        if self.saved is None:
            last = self.run_dir / "last.ckpt"
            kept = f"{last} is as it was" if last.is_file() else "no checkpoint was written yet"
            return RunInterrupted(f"{name}: training stopped before this process completed a step, so nothing new was "
                                  f"saved ({kept}); continue it with ternkit train {recipe_arg} --resume auto.", signum)
        path, step = self.saved
        return RunInterrupted(f"{name}: training stopped at step {step} and saved {path}; continue it with "
                              f"ternkit train {recipe_arg} --resume auto.", signum)
