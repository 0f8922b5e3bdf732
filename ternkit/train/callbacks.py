"""Training callbacks: integer-state updates once per optimizer step, telemetry, atomic checkpoint writes."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from ternkit.checkpoint import checkpoint_step
from ternkit.errors import TernkitError, is_disk_full

__all__ = ["IntegerStateCallback", "TelemetryCallback", "PlainProgress", "AtomicCheckpointIO", "ReplicaCheckCallback",
           "SampleCallback", "held_back_path", "telemetry", "step_integer_state", "replica_state", "replica_digests",
           "sample_text"]


def step_integer_state(model: nn.Module) -> dict[str, int]:
    """Once per optimizer step: apply integer-state layer updates, MoE bias updates, sync STC thresholds.

    Each owner reduces across DDP ranks itself (the integer layers in one batched all-reduce per
    device), so every replica ends the step with identical integers, biases and thresholds.
    Returns how many modules of each kind moved.
    """
    from ternkit.models.moe import update_moe_biases
    from ternkit.modules.group import apply_integer_updates

    counts = {"integer_layers": apply_integer_updates(model), "moe_biases": update_moe_biases(model),
              "stc_thresholds": 0}
    for mod in model.modules():
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
    # stc_stats / moe_stats: one dict per block, {"block": j, ...}; per-head lists become one column per head.
    stc = getattr(model, "stc_stats", None)
    for d in stc() if callable(stc) else []:
        for key, val in d.items():
            if key == "block":
                continue
            if isinstance(val, (list, tuple)):
                for h, v in enumerate(val):
                    out[f"stc/block{d['block']}/{key}/{h}"] = float(v)
            elif isinstance(val, (int, float)) and not isinstance(val, bool):
                out[f"stc/block{d['block']}/{key}"] = float(val)
    moe = getattr(model, "moe_stats", None)
    for d in moe() if callable(moe) else []:
        for key in ("load_imbalance", "aux_loss", "z_loss", "router_entropy", "dropped_frac"):
            if isinstance(d.get(key), (int, float)):
                out[f"moe/block{d['block']}/{key}"] = float(d[key])
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
            # Lightning labels the metrics of the N-th optimizer step N - 1 (global_step is already N here);
            # one label per step keeps a resumed run's history exact at its resume point.
            logger.log_metrics(self.last, step=step - 1)


def replica_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state that ternkit itself keeps in sync across DDP ranks: every integer buffer, and the float buffers a
    module declares in its ``SYNCED_BUFFERS`` (STC thresholds, MoE balancing biases).

    Float parameters are left out: DDP's gradient all-reduce keeps those equal, not ternkit's code.
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, mod in model.named_modules():
        synced = getattr(type(mod), "SYNCED_BUFFERS", ())  # float buffers the module keeps equal across ranks
        for leaf, buf in mod.named_buffers(recurse=False):
            if buf is not None and (not torch.is_floating_point(buf) or leaf in synced):
                out[f"{prefix}.{leaf}" if prefix else leaf] = buf
    return out


def _digest(t: torch.Tensor) -> int:
    """A 63-bit hash of a tensor's dtype, shape and bytes (bit-exact: -0.0 and 0.0 differ)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=8)
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def replica_digests(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """Names (sorted) and int64 hashes (n,) of :func:`replica_state`, for comparing replicas."""
    state = replica_state(model)
    names = sorted(state)
    return names, torch.tensor([_digest(state[n]) for n in names], dtype=torch.int64)


class ReplicaCheckCallback(L.Callback):
    """At the end of training, checks that every DDP rank holds the same integer state, STC tau and MoE bias.

    Each rank hashes :func:`replica_state`; the hashes are all-gathered and compared. ``identical``
    is None with a single process, else True/False on every rank; ``differing`` names the buffers
    that disagree. A mismatch warns loudly: the replicas have silently become different models.
    """

    def __init__(self) -> None:
        self.identical: bool | None = None
        self.differing: list[str] = []
        self.world_size = 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.world_size = int(trainer.world_size)
        if self.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        names, local = replica_digests(pl_module.model)
        # gloo gathers CPU tensors; nccl needs them on the rank's device.
        dev = torch.device("cpu") if torch.distributed.get_backend() == "gloo" else pl_module.device
        local = local.to(dev)
        gathered = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, local)
        ref = gathered[0].cpu()
        bad = torch.zeros(len(names), dtype=torch.bool)
        for other in gathered[1:]:
            bad |= other.cpu() != ref
        self.differing = [n for n, b in zip(names, bad.tolist()) if b]
        self.identical = not self.differing
        if not self.identical and trainer.is_global_zero:
            shown = ", ".join(self.differing[:5]) + (" ..." if len(self.differing) > 5 else "")
            warnings.warn(f"DDP replicas ended training with DIFFERENT integer state/STC tau/MoE bias in "
                          f"{len(self.differing)} buffer(s): {shown}; the ranks' models have diverged, please report this.",
                          RuntimeWarning, stacklevel=2)


@torch.no_grad()
def sample_text(model: nn.Module, tok: Any, prompt: str, n: int, seed: int) -> str:
    """``prompt`` followed by ``n`` sampled tokens (temperature 0.8, top-40), decoded; the model's mode is restored.

    Sampling uses its own generator, and eval mode freezes STC thresholds and MoE load counts, so a
    sample leaves the training state (and thus a resumed run's replay) untouched.
    """
    was_training = model.training
    model.eval()
    try:
        ids = tok.encode(prompt) or [0]
        g = torch.Generator().manual_seed(seed)
        dev = next(model.parameters()).device
        out = model.generate(torch.tensor([ids], device=dev), n, greedy=False, temperature=0.8, top_k=40, generator=g)
        return tok.decode(out[0].tolist())
    finally:
        model.train(was_training)


class SampleCallback(L.Callback):
    """Every ``every`` optimizer steps, prints a sample from ``prompt`` on rank 0 (above the progress bar)."""

    def __init__(self, every: int, tokenizer: Any, prompt: str, n_tokens: int, seed: int) -> None:
        self.every = int(every)
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.n_tokens = int(n_tokens)
        self.seed = int(seed)
        self.samples: dict[int, str] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every <= 0 or step == 0 or step % self.every or not trainer.is_global_zero:
            return
        if step in self.samples:  # gradient accumulation: several batches end at the same step
            return
        text = sample_text(pl_module.model, self.tokenizer, self.prompt, self.n_tokens, self.seed)
        self.samples[step] = text
        pl_module.print(f"--- sample at step {step} ---\n{text}")


class PlainProgress(L.Callback):
    """One plain line on stderr every ``every`` optimizer steps and after each validation (no terminal needed).

    For logs that are not a terminal (nohup, a pipe, a scheduler's log file), where a live progress
    bar shows nothing until the end: ``step 200/800 | loss 1.4521 | lr 1.85e-03 | 51,230 tok/s | 0:01:12``.
    """

    def __init__(self, every: int, max_steps: int, stream: Any = None) -> None:
        self.every = max(int(every), 1)
        self.max_steps = int(max_steps)
        self.stream = stream
        self._t0 = 0.0
        self._last: tuple[float, int] | None = None  # (time, step) of the previous line

    def _write(self, text: str) -> None:
        out = self.stream or sys.stderr
        out.write(text + "\n")
        out.flush()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._last = (self._t0, int(trainer.global_step))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = int(trainer.global_step)
        if not trainer.is_global_zero or step % self.every or (self._last is not None and self._last[1] == step):
            return
        now = time.perf_counter()
        t_prev, s_prev = self._last or (self._t0, 0)
        tokens = int(batch[0].numel()) * int(getattr(trainer, "accumulate_grad_batches", 1) or 1) * trainer.world_size
        tps = tokens * (step - s_prev) / max(now - t_prev, 1e-9)
        self._last = (now, step)
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        loss = getattr(pl_module, "last_train_loss", float("nan"))
        self._write(f"step {step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | "
                    f"{_clock(now - self._t0)}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        val = trainer.callback_metrics.get("val/loss")
        if trainer.is_global_zero and val is not None and not trainer.sanity_checking:
            self._write(f"step {int(trainer.global_step)}/{self.max_steps} | val loss {float(val):.4f}")


def _clock(seconds: float) -> str:
    """h:mm:ss of a duration."""
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs, then renames it into place.

    A run killed mid-write leaves the previous checkpoint intact instead of a truncated file.
    ``last.ckpt`` written during training (Lightning's step checkpoints) is held back as
    ``.last.ckpt.unverified.tmp`` until the next step's loss is finite (:meth:`promote`, called by
    the training step); after a NaN it is dropped (:meth:`discard`), so the kept last.ckpt is
    always one whose next step was finite and resuming from it does not NaN on its first batch.
    ``storage_options={"verified": True}`` writes last.ckpt at once (the end of training, a signal).
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: tuple[Path, Path] | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (last.ckpt held back until verified, see the class).

        A failed write (full disk, read-only folder) raises one :class:`TernkitError` sentence naming
        the checkpoint and the one kept; the held-back last.ckpt is dropped then, so no ``.tmp`` stays.
        """
        path = Path(path)
        try:
            if path.name == "last.ckpt" and not (storage_options or {}).get("verified"):
                pending = held_back_path(path)
                _write_atomic(checkpoint, pending, shown=path)
                self._pending = (pending, path)
                return
            _write_atomic(checkpoint, path)
            if path.name == "last.ckpt":
                self.discard()  # only now: until the new file is in place, the held-back one may be the newest
        except TernkitError:
            # The held-back last.ckpt was never verified, and on a full disk its space is better freed:
            # the checkpoint the sentence names as intact is the one already in place.
            self.discard()
            raise

    def promote(self) -> None:
        """The step after the held-back last.ckpt was finite: put it in place."""
        if self._pending is not None:
            pending, final = self._pending
            self._pending = None
            if pending.is_file():
                os.replace(pending, final)

    def discard(self) -> None:
        """Drop a held-back last.ckpt (its next step was not finite, or a verified one replaces it)."""
        if self._pending is not None:
            self._pending[0].unlink(missing_ok=True)
            self._pending = None


def held_back_path(last: Path) -> Path:
    """Where :class:`AtomicCheckpointIO` holds ``last`` (a run's last.ckpt) until the next step is finite."""
    return last.with_name(f".{last.name}.unverified.tmp")


def _write_atomic(checkpoint: dict[str, Any], path: Path, shown: Path | None = None) -> None:
    """torch.save ``checkpoint`` to ``path`` through a fsynced temporary file in the same folder and a rename.

    An ``OSError`` (full disk, no permission) removes the temporary file and becomes one
    :class:`TernkitError` sentence naming the checkpoint as ``shown`` (default ``path``).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise TernkitError(_write_failed(err, shown or path, checkpoint)) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(checkpoint, fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is as readable as any file
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise TernkitError(_write_failed(err, shown or path, checkpoint)) from None
        raise


def _write_failed(err: OSError, path: Path, checkpoint: dict[str, Any]) -> str:
    """The sentence for a checkpoint ``path`` that could not be written: what failed, what is kept, what to do."""
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    at = f" at step {step}" if isinstance(step, int) else ""
    reason = err.strerror or type(err).__name__
    folder = path.parent
    # Every write goes through a temporary file and a rename, so whatever checkpoint is in place is whole.
    kept = sorted((p for p in folder.glob("*.ckpt") if p.is_file() and not p.name.startswith(".")),
                  key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"))
    if is_disk_full(err):
        fix = f"free some disk space on the disk holding {folder}"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {folder} writable (or point checkpoint.dir at a folder you can write to)"
    else:
        fix = f"check the disk holding {folder}"
    recipe = folder / "recipe.yaml"
    again = f"ternkit train {recipe} --resume auto" if recipe.is_file() else "the same ternkit train command with --resume auto"
    if kept:
        prev = kept[-1]
        prev_step = checkpoint_step(prev)
        shown = f"{prev} (step {prev_step})" if prev_step is not None else str(prev)
        return (f"could not write checkpoint {path}{at} ({reason}), so training stopped; the previous checkpoint "
                f"{shown} is intact: {fix}, then continue with {again}.")
    return (f"could not write checkpoint {path}{at} ({reason}), so training stopped before any checkpoint was kept: "
            f"{fix}, then start again with {again}.")
