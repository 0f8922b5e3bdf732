"""The LightningModule that trains an xLSTM LM (mLSTM/STC/MoE) on next-token or masked-target batches."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from ternkit import __version__
from ternkit.errors import TernkitError
from ternkit.models.config import ModelConfig
from ternkit.recipe import OptimizerConfig, ScheduleConfig, TrainerConfig
from ternkit.train.optim import build_optimizer, lr_factor, weight_decay_factor

__all__ = ["TernkitLM", "NonFiniteLossError", "DivergenceError", "DivergenceMonitor", "masked_cross_entropy"]


#: Optimizer-group settings that come from the recipe (restored over a checkpoint's by ``on_train_start``).
_RECIPE_GROUP_KEYS = ("initial_lr", "betas", "eps", "weight_decay", "base_wd", "lr_scale", "momentum", "nesterov",
                      "ns_coefficients", "ns_steps", "adjust_lr_fn")


def _np_state_to_safe(state: tuple[Any, ...]) -> dict[str, Any]:
    """numpy's RNG state as tensors and ints, loadable with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _np_state_from_safe(d: dict[str, Any]) -> tuple[Any, ...]:
    return (d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])


class NonFiniteLossError(TernkitError):
    """The training loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class DivergenceError(TernkitError):
    """The training loss stayed far above its best running level; the run stops and keeps its checkpoints."""


class DivergenceMonitor:
    """Spike ratio = loss / the lowest running (EMA) loss so far; divergence = ``patience`` spiking steps in a row.

    A run that diverges without a NaN (loss 2.5 -> 6.5 over 200 steps) is caught here: the ratio
    is logged every step, and ``update`` returns True once the loss has stayed above
    ``factor`` times its best running level for ``patience`` consecutive steps. The running level
    is a bias-corrected EMA; its minimum counts only after ``warmup`` steps (the LR warm-up), so
    the first noisy steps set no standard. The state travels in checkpoints so a resumed run decides the same.
    """

    def __init__(self, factor: float | None, patience: int, decay: float = 0.95, warmup: int = 20) -> None:
        self.factor, self.patience, self.decay, self.warmup = factor, patience, decay, warmup
        self.ema = 0.0
        self.count = 0
        self.best = math.inf
        self.best_step = -1
        self.over = 0
        self.ratio = 1.0

    def update(self, loss: float, step: int) -> bool:
        """Take one step's loss; True when the run counts as diverged."""
        self.count += 1
        self.ema = self.decay * self.ema + (1.0 - self.decay) * loss
        level = self.ema / (1.0 - self.decay ** self.count)
        if self.count >= self.warmup and level < self.best:
            self.best, self.best_step = level, step
        self.ratio = loss / self.best if math.isfinite(self.best) and self.best > 0 else 1.0
        spiking = self.factor is not None and self.ratio > self.factor
        self.over = self.over + 1 if spiking else 0
        return self.over >= self.patience

    def state_dict(self) -> dict[str, float | int]:
        """Plain numbers for a checkpoint."""
        return {"ema": self.ema, "count": self.count, "best": self.best, "best_step": self.best_step, "over": self.over}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.ema, self.count, self.best = float(d["ema"]), int(d["count"]), float(d["best"])
        self.best_step, self.over = int(d["best_step"]), int(d["over"])


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits (B, S, V) against targets (B, S), skipping targets equal to ``ignore_index``.

    Synthetic tasks (parity, MQAR) mark unsupervised positions with ``ignore_index``; a batch with
    no supervised position gives 0 rather than NaN.
    """
    flat = targets.flatten()
    ce = F.cross_entropy(logits.float().flatten(0, 1), flat, reduction="sum", ignore_index=ignore_index)
    return ce / (flat != ignore_index).sum().clamp(min=1)


class TernkitLM(L.LightningModule):
    """Lightning wrapper of :class:`ternkit.models.lm.XLSTMLM` with AdamW/Muon, warmup + cosine and a NaN guard.

    Batches are ``(x, y)`` token windows (B, S); tasks whose loss counts only some positions
    (parity, MQAR) mark the others with -100 in ``y``. The loss is cross-entropy plus the model's weighted MoE losses.
    Checkpoints also carry the RNG states and the ternkit version, so a resumed run replays exactly.
    """

    def __init__(self, model_config: ModelConfig | dict[str, Any], optimizer: OptimizerConfig | dict[str, Any],
                 schedule: ScheduleConfig | dict[str, Any], max_steps: int, run_info: dict[str, Any] | None = None,
                 divergence: dict[str, Any] | None = None) -> None:
        super().__init__()
        # Typed here, stored as plain data: a checkpoint's hyper-parameters must load with weights_only=True.
        cfg = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(model_config)
        self.opt_cfg = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(**optimizer)
        self.sched_cfg = schedule if isinstance(schedule, ScheduleConfig) else ScheduleConfig(**schedule)
        model_config, optimizer, schedule = (cfg.to_dict(), self.opt_cfg.model_dump(mode="json"),
                                             self.sched_cfg.model_dump(mode="json"))
        self.save_hyperparameters()
        from ternkit.models.lm import XLSTMLM

        # The trainer section's divergence_* settings; what is not given takes the recipe's default.
        t = TrainerConfig(**{f"divergence_{k}": v for k, v in (divergence or {}).items()})
        # The best running level counts from the end of the LR warm-up, when the loss starts to mean something.
        self.divergence = DivergenceMonitor(t.divergence_factor, t.divergence_patience,
                                            warmup=max(1, self.sched_cfg.warmup_steps))
        self.divergence_stop = t.divergence_stop
        self._div_window: list[torch.Tensor] = []  # losses of the micro-batches of the current optimizer step

        self.model = XLSTMLM(cfg)
        self._t_last: float | None = None
        self.last_train_loss = float("nan")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, S, V) for tokens (B, S)."""
        return self.model(tokens)

    def _losses(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        ce = masked_cross_entropy(logits, y)
        ntok = int(x.numel())
        return ce, self.model.aux_loss(), ntok

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy + weighted MoE losses; stops the run with a clear message on a non-finite loss."""
        ce, aux, ntok = self._losses(batch)
        loss = ce + aux
        io = getattr(self.trainer.strategy, "checkpoint_io", None) if self._trainer is not None else None
        if not torch.isfinite(loss).item():
            if callable(getattr(io, "discard", None)):
                io.discard()  # the checkpoint before this step led straight to the NaN: keep the one before it
            raise NonFiniteLossError(self._non_finite_message(loss.item()))
        if callable(getattr(io, "promote", None)):
            io.promote()
        now = time.perf_counter()
        if self._t_last is not None:
            dt = max(now - self._t_last, 1e-9)
            self.log("tok/s", ntok * self.trainer.world_size / dt, prog_bar=True, on_step=True, logger=False)
            # Throughput in the run's own log (the time since the previous micro-batch, validation included).
            self.log("perf/tokens_per_s", ntok * self.trainer.world_size / dt, on_step=True)
            self.log("perf/step_s", dt, on_step=True)
        else:
            self._t_first = now
        self.log("perf/wall_s", now - getattr(self, "_t_first", now), on_step=True)
        self._t_last = now
        self.last_train_loss = float(ce.detach())
        diverged = self._watch_divergence(ce.detach(), batch_idx)
        self.log("train/loss", ce, prog_bar=True, on_step=True)
        self.log("train/spike", self.divergence.ratio, prog_bar=True, on_step=True)
        if diverged and self.divergence_stop:
            raise DivergenceError(self._divergence_message())
        if aux.requires_grad or aux.item() != 0.0:
            self.log("train/aux", aux, on_step=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        self.log("tokens", float(ntok * (self.global_step + 1) * self.trainer.world_size), on_step=True)
        return loss

    def _non_finite_message(self, value: float) -> str:
        """One sentence: the bad loss, the step, which checkpoint survives, what to do."""
        run_dir = (self.hparams.get("run_info") or {}).get("run_dir")
        last = Path(run_dir) / "last.ckpt" if run_dir else None
        if last is not None and last.is_file():
            try:
                good = torch.load(last, map_location="cpu", weights_only=True).get("global_step")
            except Exception:  # a checkpoint we cannot read says nothing about the step
                good = None
            kept = f"the last good checkpoint {last}" + (f" (step {good})" if good is not None else "") + " is kept"
            fix = "then resume with --resume auto"
        else:
            kept = "no checkpoint was written before it (lower checkpoint.every_steps to keep one)"
            fix = "then train again"
        return (f"the training loss became {value} at step {self.global_step}, so the run stopped and {kept}: "
                f"lower optimizer.lr or set trainer.grad_clip, {fix}.")

    def _watch_divergence(self, ce: torch.Tensor, batch_idx: int) -> bool:
        """Feed the monitor once per optimizer step: the window's mean loss, averaged over ranks so all decide alike."""
        self._div_window.append(ce)
        accum = int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1)
        if (batch_idx + 1) % accum:
            return False
        loss = torch.stack(self._div_window).mean()
        self._div_window = []
        if self.trainer.world_size > 1:
            loss = self.trainer.strategy.reduce(loss, reduce_op="mean")
        return self.divergence.update(float(loss), self.global_step)

    def _divergence_message(self) -> str:
        """One sentence: how far the loss rose, since when, which checkpoints survive, what to do."""
        d = self.divergence
        run_dir = (self.hparams.get("run_info") or {}).get("run_dir")
        kept = [p for p in ("best.ckpt", "last.ckpt") if run_dir and (Path(run_dir) / p).is_file()]
        where = f"{', '.join(str(Path(run_dir) / p) for p in kept)} kept" if kept else "no checkpoint written yet"
        return (f"the training loss diverged: {self.last_train_loss:.3f} at step {self.global_step} has stayed above "
                f"{d.factor:g}x its best running level {d.best:.3f} (step {d.best_step}) for {d.patience} steps, so the "
                f"run stopped ({where}): lower optimizer.lr, raise schedule.warmup_steps or set trainer.grad_clip, "
                "or set trainer.divergence_stop false to train on.")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Validation cross-entropy (logged as val/loss)."""
        x, y = batch[0], batch[1]
        logits = self.model(x)
        ce = masked_cross_entropy(logits, y)
        self.log("val/loss", ce, prog_bar=True, on_epoch=True, sync_dist=True)
        sup = y != -100
        if not bool(sup.all()):  # synthetic tasks: accuracy on the supervised positions
            acc = (logits.argmax(-1)[sup] == y[sup]).float().mean()
            self.log("val/acc", acc, prog_bar=True, on_epoch=True, sync_dist=True)
        return ce

    def configure_optimizers(self) -> Any:
        """AdamW or Muon+AdamW with warmup + cosine (optionally BitNet two-stage) stepped every optimizer step."""
        o, s = self.opt_cfg, self.sched_cfg
        opt = build_optimizer(self.model, o.name, o.lr, o.weight_decay, tuple(o.betas), eps=o.eps, momentum=o.momentum,
                              ternary_lr_scale=o.ternary_lr_scale, ternary_weight_decay=o.ternary_weight_decay,
                              ternary_lr_max=o.ternary_lr_max)
        max_steps = int(self.hparams.max_steps)

        def factor(step: int) -> float:
            return lr_factor(step, max_steps, s.warmup_steps, s.kind, s.min_lr_ratio, o.two_stage, o.two_stage_at)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        # This recipe's settings per group, before a resumed run's checkpoint overwrites them (on_train_start).
        self._recipe_groups = [{k: g[k] for k in _RECIPE_GROUP_KEYS if k in g} for g in opt.param_groups]
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_train_start(self) -> None:
        """A resumed run trains with this recipe's optimizer and schedule settings, not the checkpoint's.

        Lightning restores every optimizer group's hyper-parameters (LR, betas, eps, weight decay)
        and the scheduler's base LRs from the checkpoint; the advice after a NaN ("lower
        optimizer.lr, then resume") needs the recipe's to win. With unchanged settings this puts
        back the very same numbers (the LR is recomputed exactly as the scheduler computes it).
        """
        groups = getattr(self, "_recipe_groups", None)
        if not groups or not self.trainer.lr_scheduler_configs:
            return
        opt = self.trainer.optimizers[0]
        sched = self.trainer.lr_scheduler_configs[0].scheduler
        if len(groups) != len(opt.param_groups) or not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            return
        for g, want in zip(opt.param_groups, groups):
            g.update(want)
        sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        sched._last_lr = lrs

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Apply the weight-decay schedule (BitNet two-stage: decay off in the second half)."""
        if not self.opt_cfg.two_stage:
            return
        f = weight_decay_factor(self.global_step, int(self.hparams.max_steps), True, self.opt_cfg.two_stage_at)
        for opt in self.trainer.optimizers:
            for g in opt.param_groups:
                g["weight_decay"] = g.get("base_wd", g["weight_decay"]) * f

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Tag the checkpoint as ternkit's and store every RNG state."""
        checkpoint["ternkit"] = {"version": __version__, "model_config": self.model.config.to_dict(),
                                 "run_info": self.hparams.get("run_info") or {}}
        checkpoint["ternkit"]["divergence"] = self.divergence.state_dict()
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": _np_state_to_safe(np.random.get_state()),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states and the divergence monitor saved by :meth:`on_save_checkpoint`."""
        div = (checkpoint.get("ternkit") or {}).get("divergence")
        if div:
            self.divergence.load_state_dict(div)
        rng = checkpoint.get("rng")
        if not rng:
            return
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(_np_state_from_safe(rng["numpy"]))
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    @property
    def perplexity(self) -> float:
        """exp of the last training cross-entropy."""
        return math.exp(min(self.last_train_loss, 50.0))
