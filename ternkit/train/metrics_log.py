"""The run's metrics.csv, append-only and crash-safe: Lightning's CSV logger without its delete-on-open."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["AppendOnlyCSVLogger", "read_metrics"]


def read_metrics(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a metrics CSV file (([], []) when the file is absent or empty)."""
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _step_of(row: dict[str, str]) -> float | None:
    try:
        return float(row.get("step") or "")
    except ValueError:
        return None


def _write_atomic(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    """The whole CSV through a temporary file, fsynced, then renamed over ``path``: never half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _AppendWriter(ExperimentWriter):
    """Writes every logged row at once (append, flush, fsync) and never deletes what an earlier process wrote.

    ``keep_before``: the step a resumed run continues from. Rows logged at that step or later by the
    interrupted process belong to the checkpoint's future, which the resumed run logs again (the
    replay is exact), so they are dropped once, atomically, when the file is opened; every row
    before it stays as it was. A new column (the first validation, the first telemetry) rewrites
    the file with the wider header through a temporary file and a rename.
    """

    def __init__(self, log_dir: str, keep_before: int) -> None:  # noqa: D107 - ExperimentWriter's own init deletes
        self.hparams: dict[str, Any] = {}
        self.metrics: list[dict[str, Any]] = []
        self.metrics_keys: list[str] = []
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        from lightning.fabric.utilities.cloud_io import get_filesystem

        self._fs = get_filesystem(log_dir)
        os.makedirs(log_dir, exist_ok=True)
        path = Path(self.metrics_file_path)
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):  # a row cut off by a full disk or a kill: drop the fragment
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_bytes(data[: data.rfind(b"\n") + 1])
                os.replace(tmp, path)
        header, rows = read_metrics(path)
        kept = [r for r in rows if (_step_of(r) is None or _step_of(r) < keep_before)]
        if len(kept) != len(rows):
            _write_atomic(path, header, kept)
        self.metrics_keys = header

    def _check_log_dir_exists(self) -> None:  # Lightning deletes the old metrics.csv here
        pass

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        """Record one row and write it through to disk."""
        super().log_metrics(metrics_dict, step)
        self.save()

    def save(self) -> None:
        """Append the pending rows (flush + fsync); widen the header first, atomically, when a column is new."""
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        new = sorted({k for row in self.metrics for k in row} - set(self.metrics_keys))
        exists = path.is_file() and path.stat().st_size > 0
        if new:
            self.metrics_keys = sorted([*self.metrics_keys, *new])
            if exists:
                _write_atomic(path, self.metrics_keys, read_metrics(path)[1])
        with open(path, "a" if exists else "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            if not exists:
                writer.writeheader()
            writer.writerows(self.metrics)
            fh.flush()
            os.fsync(fh.fileno())
        self.metrics = []


class AppendOnlyCSVLogger(CSVLogger):
    """``save_dir/logs/metrics.csv`` that a resumed or killed run never empties (see :class:`_AppendWriter`)."""

    def __init__(self, save_dir: str | os.PathLike[str], keep_before: int = 0) -> None:
        super().__init__(save_dir=str(save_dir), name="logs", version="", flush_logs_every_n_steps=1)
        self._keep_before = int(keep_before)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The append-only writer (created on first use)."""
        if self._experiment is not None:
            return self._experiment
        os.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _AppendWriter(self.log_dir, self._keep_before)
        return self._experiment
