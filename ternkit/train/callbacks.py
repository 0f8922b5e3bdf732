"""Training callbacks: integer-state updates once per optimizer step, telemetry, atomic checkpoint writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

__all__ = ["IntegerStateCallback", "TelemetryCallback", "AtomicCheckpointIO", "telemetry", "step_integer_state"]


def step_integer_state(model: nn.Module) -> dict[str, int]:
    """Once per optimizer step: apply integer-state layer updates, MoE bias updates, sync STC thresholds.

    Each piece all-reduces across DDP ranks inside its own method, so every replica ends the step
    with identical integers, biases and thresholds. Returns how many modules of each kind moved.
    """
    counts = {"integer_layers": 0, "moe_biases": 0, "stc_thresholds": 0}
    for mod in model.modules():
        if callable(getattr(mod, "apply_update", None)):
            mod.apply_update()
            counts["integer_layers"] += 1
        if callable(getattr(mod, "update_bias", None)):
            mod.update_bias()
            counts["moe_biases"] += 1
        if callable(getattr(mod, "sync_", None)):
            mod.sync_()
            counts["stc_thresholds"] += 1
    return counts


class IntegerStateCallback(L.Callback):
    """Runs :func:`step_integer_state` after the last backward of every optimizer step (before the step itself)."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        step_integer_state(pl_module.model)


def telemetry(model: nn.Module, band: float = 0.1) -> dict[str, float]:
    """Flat dict of per-layer health numbers: trit fractions, boundary fraction, STC tau/skip, MoE load and losses."""
    from ternkit.quant.deadzone import module_deadzone_stats

    out: dict[str, float] = {}
    for name, st in module_deadzone_stats(model, band=band).items():
        d = st.to_dict()
        for key in ("frac_neg", "frac_zero", "frac_pos", "frac_boundary"):
            if d.get(key) is not None:
                out[f"trits/{name}/{key}"] = float(d[key])
    stc = getattr(model, "stc_stats", None)
    if callable(stc):
        for name, d in stc().items():
            for key, val in d.items():
                if isinstance(val, (int, float)):
                    out[f"stc/{name}/{key}"] = float(val)
    moe = getattr(model, "moe_stats", None)
    if callable(moe):
        for name, d in moe().items():
            for key in ("load_imbalance", "aux_loss", "z_loss", "router_entropy", "dropped_frac"):
                if isinstance(d.get(key), (int, float)):
                    out[f"moe/{name}/{key}"] = float(d[key])
    return out


class TelemetryCallback(L.Callback):
    """Every ``every`` optimizer steps, logs :func:`telemetry` of the model to the run's loggers."""

    def __init__(self, every: int = 50, band: float = 0.1) -> None:
        self.every = max(int(every), 1)
        self.band = band
        self.last: dict[str, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or not trainer.is_global_zero:
            return
        self.last = telemetry(pl_module.model, self.band)
        for logger in trainer.loggers:
            logger.log_metrics(self.last, step=step)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs, then renames it into place.

    A run killed mid-write leaves the previous checkpoint intact instead of a truncated file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is as readable as any file
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
