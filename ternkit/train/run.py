"""One training run from a recipe: run folder, data, model, Lightning Trainer, resume, sample, summary."""

from __future__ import annotations

import json
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ternkit.errors import TernkitError, is_disk_full
from ternkit.models.config import ModelConfig
from ternkit.recipe import Recipe

__all__ = ["model_config_from_recipe", "parameter_counts", "train", "TrainResult", "resolve_resume"]


def model_config_from_recipe(recipe: Recipe, vocab_size: int) -> ModelConfig:
    """The recipe's model config with the data's vocabulary size filled in (a recipe's own vocab_size wins)."""
    return recipe.model.with_vocab(vocab_size)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Weights by kind: ``ternary`` (latent or integer-state trits), ``float`` (everything else trainable), and
    ``integer_state``: the integer buffers (packed trits, exponents, accumulators, votes), flags excluded."""
    from ternkit.modules.linear import ternary_modules

    tern = 0
    tern_ids: set[int] = set()
    for _, mod in ternary_modules(model):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            tern += w.numel()
            tern_ids.add(id(w))
        else:
            tern += int(getattr(mod, "in_features", 0)) * int(getattr(mod, "out_features", 0))
    flt = sum(p.numel() for p in model.parameters() if id(p) not in tern_ids)
    # Persistent state only (state_dict): the unpacked trit cache of group layers is not state.
    ints = sum(t.numel() for t in model.state_dict().values()
               if not torch.is_floating_point(t) and t.dtype != torch.bool)
    return {"ternary": tern, "float": flt, "integer_state": ints}


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints a run folder holds: last.ckpt, best.ckpt and step*.ckpt that exist."""
    from ternkit.checkpoint import RUN_CHECKPOINTS

    found = [run_dir / n for n in RUN_CHECKPOINTS if (run_dir / n).is_file()]
    return found + sorted(p for p in run_dir.glob("step*.ckpt") if p.is_file())


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: None, ``auto`` or a path that must exist.

    ``auto``: the run folder's newest readable checkpoint by global_step (last.ckpt wins a tie),
    or None when the folder holds none; a folder whose every checkpoint is unreadable is refused.
    """
    if resume is None:
        return None
    if resume == "auto":
        found = run_checkpoints(run_dir)
        if not found:
            return None
        from ternkit.checkpoint import checkpoint_step

        steps = {p: checkpoint_step(p) for p in found}
        readable = [p for p in found if steps[p] is not None]
        if not readable:
            names = ", ".join(p.name for p in found)
            raise TernkitError(f"--resume auto: no checkpoint in {run_dir} can be read ({names}); pass a good one "
                               "with --resume PATH, or start a new run with --set name=<new name>.")
        return max(readable, key=lambda p: (steps[p], p.name == "last.ckpt"))
    path = Path(resume)
    if not path.exists():
        raise TernkitError(f"--resume {resume}: no such checkpoint; pass an existing .ckpt or --resume auto.")
    return path


@dataclass
class TrainResult:
    """What a finished (or dry) run produced."""

    run_dir: Path
    steps: int = 0
    train_loss: float = float("nan")
    val_loss: float | None = None
    val_acc: float | None = None
    sample: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    resumed_from: str | None = None
    last_ckpt: Path | None = None
    replicas: int = 1
    replicas_identical: bool | None = None
    global_rank: int = 0
    finished: bool = False  # resumed a run that had already reached max_steps: nothing trained or written
    changed_on_resume: dict[str, list[Any]] = field(default_factory=dict)  # setting -> [checkpoint's, recipe's]
    init_from: dict[str, Any] | None = None  # what init_from loaded (ternkit.checkpoint.init_weights_from's report)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable summary."""
        return {"run_dir": str(self.run_dir), "steps": self.steps, "train_loss": self.train_loss,
                "val_loss": self.val_loss, "val_acc": self.val_acc, "sample": self.sample, "counts": self.counts,
                "resumed_from": self.resumed_from, "last_ckpt": str(self.last_ckpt) if self.last_ckpt else None,
                "replicas": self.replicas, "replicas_identical": self.replicas_identical, "finished": self.finished,
                "changed_on_resume": self.changed_on_resume, "init_from": self.init_from}


def _loggers(recipe: Recipe, run_dir: Path, resume_step: int = 0) -> list[Any]:
    from ternkit.train.metrics_log import AppendOnlyCSVLogger

    out: list[Any] = []
    if recipe.logging.csv:
        out.append(AppendOnlyCSVLogger(run_dir, keep_before=resume_step))
    tb = recipe.logging.tensorboard
    if tb:
        try:
            import tensorboard  # noqa: F401

            from lightning.pytorch.loggers import TensorBoardLogger

            out.append(TensorBoardLogger(save_dir=str(run_dir), name="tb", version=""))
        except ImportError:
            if tb is True:
                raise TernkitError("logging.tensorboard is true but tensorboard is not installed; pip install tensorboard "
                                   "or set logging.tensorboard to auto.") from None
    return out


def _quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (accelerator lines, tips) out of the user's terminal; warnings still show."""
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _strategy(name: str, cfg: ModelConfig) -> Any:
    """Lightning strategy for ``trainer.strategy``; plain DDP gets ternkit's settings, anything else passes through.

    ternkit keeps its own buffers (integer accumulators, STC tau, MoE bias) identical across ranks by
    all-reducing their updates once per optimizer step, so DDP's per-forward broadcast of every buffer
    from rank 0 is turned off: it would cost a copy of all integer state per forward and hide a broken
    sync from the end-of-run replica check. MoE experts that get no token in a step have no gradient,
    so DDP must look for unused parameters there.
    """
    if name != "ddp":
        return name
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(broadcast_buffers=False, find_unused_parameters="moe" in cfg.ffn_kinds())


def resume_changes(ckpt: dict[str, Any], recipe: Recipe) -> dict[str, list[Any]]:
    """``{"optimizer.lr": [old, new], ...}``: the optimizer, schedule and max_steps settings a resume changes."""
    hp = ckpt.get("hyper_parameters") or {}
    now = {"optimizer": recipe.optimizer.model_dump(mode="json"), "schedule": recipe.schedule.model_dump(mode="json")}
    out: dict[str, list[Any]] = {}
    for section, values in now.items():
        old = hp.get(section) or {}
        for key, new in values.items():
            before = old.get(key)
            if isinstance(before, tuple):
                before = list(before)
            if key in old and before != new:
                out[f"{section}.{key}"] = [before, new]
    if "max_steps" in hp and int(hp["max_steps"]) != recipe.trainer.max_steps:
        out["trainer.max_steps"] = [int(hp["max_steps"]), recipe.trainer.max_steps]
    return out


def _optimizer_layout(o: dict[str, Any]) -> tuple[str, bool]:
    """(optimizer name, whether latent ternary weights get a group of their own) of an optimizer section."""
    from ternkit.train.optim import wants_ternary_group

    own = wants_ternary_group(float(o.get("ternary_lr_scale", 1.0)), o.get("ternary_weight_decay"),
                              o.get("ternary_lr_max"))
    return str(o.get("name", "adamw")), own


def _check_same_optimizer_layout(ckpt: dict[str, Any], recipe: Recipe, ckpt_path: Path) -> None:
    """Refuse a resume whose optimizer settings change its parameter groups (the state cannot be carried over)."""
    old = (ckpt.get("hyper_parameters") or {}).get("optimizer") or {}
    new = recipe.optimizer.model_dump(mode="json")
    if not old or _optimizer_layout(old) == _optimizer_layout(new):
        return
    keys = [k for k in ("name", "ternary_lr_scale", "ternary_weight_decay", "ternary_lr_max")
            if old.get(k, new[k] if k != "name" else "adamw") != new[k]]
    shown = ", ".join(f"optimizer.{k} {old.get(k)!r} -> {new[k]!r}" for k in keys)
    raise TernkitError(f"{ckpt_path} was trained with other optimizer parameter groups ({shown}), whose state a resume "
                       "cannot carry over; keep the run's own values, or start a new run with --set name=<new name>.")


def _save_final(trainer: Any, last: Path) -> None:
    """Write ``last`` (at once, not held back) after ``fit`` returned.

    Lightning counts a resumed checkpoint's logging step one on (it expects saves from inside the
    step, before that counter moves); this save comes after it moved, so it stores the in-step
    value: a run extended later logs steps N, N+1, ... with no gap.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    epoch_loop._batches_that_stepped -= 1
    try:
        trainer.save_checkpoint(str(last), weights_only=False, storage_options={"verified": True})
    finally:
        epoch_loop._batches_that_stepped += 1


def _finished_result(run_dir: Path, ckpt_path: Path, done: int) -> TrainResult:
    """The result of resuming a run that already reached its max_steps: its summary, nothing rewritten."""
    res = TrainResult(run_dir=run_dir, steps=done, resumed_from=str(ckpt_path), last_ckpt=ckpt_path, finished=True)
    try:
        old = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    for key in ("train_loss", "val_loss", "val_acc"):
        if isinstance(old.get(key), (int, float)):
            setattr(res, key, float(old[key]))
    res.counts = old.get("counts") or {}
    return res


def _tokenizer_bytes(tok: Any) -> bytes:
    """The tokenizer.json that ``tok.save`` writes, as bytes."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return tok.save(d).read_bytes()


def _step_progress_bar() -> type:
    from lightning.pytorch.callbacks import RichProgressBar

    class StepProgressBar(RichProgressBar):
        """Rich progress bar labelled by optimizer steps: ternkit trains by max_steps over an endless stream,
        so Lightning's "Epoch 0/-2" label means nothing."""

        def _get_train_description(self, current_epoch: int) -> str:
            return "train"

    return StepProgressBar


def train(recipe: Recipe, resume: str | None = None, dry_run: bool = False, progress: bool | str = True,
          console: Any = None) -> TrainResult:
    """Train the model a recipe describes, writing ``runs/<name>/`` (recipe, tokenizer, checkpoints, logs, summary).

    ``resume``: None (a run folder holding a checkpoint is then refused), ``"auto"`` (the folder's
    newest checkpoint) or a checkpoint path. ``dry_run`` builds data and model, counts parameters
    by kind and stops. ``progress``: True (a live bar on a terminal, plain lines on stderr every
    ``trainer.log_every`` steps otherwise), ``"plain"`` (always plain lines) or False (nothing).
    The run folder is locked while the run owns it (a second run into it is
    refused); SIGINT / SIGTERM save a checkpoint at the end of the step and raise
    :class:`ternkit.train.guard.RunInterrupted`.
    """
    from ternkit.train.guard import RunLock, clean_stray_tmp, is_rank_zero
    from ternkit.train.preflight import check_before_training

    check_before_training(recipe, dry_run=dry_run)  # GPU, memory, tokenizer file: refused before the folder is touched
    if dry_run:
        return _train(recipe, resume, dry_run, progress)
    with RunLock(recipe.run_dir):
        if is_rank_zero():
            clean_stray_tmp(recipe.run_dir)
        try:
            return _train(recipe, resume, dry_run, progress)
        except OSError as err:
            if not is_disk_full(err):
                raise
            # A log, summary or recipe write hit a full disk (checkpoint writes say so themselves).
            raise TernkitError(f"the disk holding {recipe.run_dir} is full ({err.strerror or 'no space left'}), so "
                               "training stopped; the checkpoints already written are intact: free some space, then "
                               f"continue with ternkit train {recipe.run_dir / 'recipe.yaml'} --resume auto.") from None


def _init_from(model: Any, source: str, written_tok: Path | None) -> dict[str, Any]:
    """Load ``source``'s weights into the fresh ``model`` and say so on stderr; on failure remove the tokenizer.json
    this run just wrote (``written_tok``), so that a refused run leaves no folder behind."""
    from ternkit.checkpoint import init_weights_from
    from ternkit.train.guard import is_rank_zero

    try:
        rep = init_weights_from(model, source)
    except TernkitError:
        if written_tok is not None:
            written_tok.unlink(missing_ok=True)
        raise
    if is_rank_zero():
        conv = f", {len(rep['converted'])} converted" if rep["converted"] else ""
        kept = (f"; {len(rep['kept_init'])} keep their initialization ({', '.join(rep['kept_init'][:3])}"
                f"{', ...' if len(rep['kept_init']) > 3 else ''})") if rep["kept_init"] else ""
        sys.stderr.write(f"init_from {source} ({rep['kind']}): {rep['loaded']} tensors loaded{conv}{kept}\n")
    return rep


def _train(recipe: Recipe, resume: str | None, dry_run: bool, progress: bool | str) -> TrainResult:
    """:func:`train` inside the run folder's lock."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ternkit.checkpoint import load_checkpoint
    from ternkit.train.callbacks import (AtomicCheckpointIO, IntegerStateCallback, PlainProgress,
                                        ReplicaCheckCallback, SampleCallback, TelemetryCallback, sample_text)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ternkit.train.data import TernkitDataModule
    from ternkit.train.guard import GracefulStop, is_rank_zero
    from ternkit.train.module import TernkitLM
    from ternkit.tokenizer import write_text_atomic

    _quiet_lightning()
    run_dir = recipe.run_dir
    ckpt_path = resolve_resume(resume, run_dir)
    held = run_checkpoints(run_dir)
    if resume is None and not dry_run and held:
        raise TernkitError(f"{run_dir} already holds a run ({', '.join(p.name for p in held)}); pass --resume auto to "
                           "continue it, or --set name=<new name> to start another.")
    ckpt_cfg = None
    ckpt_meta: dict[str, Any] = {}
    resume_step = 0
    if ckpt_path is not None:
        ckpt_meta = load_checkpoint(ckpt_path)
        ckpt_cfg = ckpt_meta["ternkit"]["model_config"]
        resume_step = int(ckpt_meta.get("global_step", 0))
        if resume_step >= recipe.trainer.max_steps and not dry_run:
            # Nothing to train: leave the folder (summary, logs, checkpoints) exactly as it is.
            return _finished_result(run_dir, ckpt_path, resume_step)
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    tok_file = run_dir / "tokenizer.json"
    had_tok = tok_file.is_file()
    dm = TernkitDataModule(recipe, run_dir)
    dm.setup()  # writes tokenizer.json only into a run folder that has none
    cfg = model_config_from_recipe(recipe, dm.vocab_size)
    tok_changed = had_tok and dm.tokenizer is not None and tok_file.read_bytes() != _tokenizer_bytes(dm.tokenizer)
    if tok_changed and ckpt_path is None and not dry_run:
        dm.tokenizer.save(run_dir)  # a new run in a folder left by an earlier attempt: this recipe's tokenizer wins
    if ckpt_cfg is not None:
        ckpt_cfg = ModelConfig.from_dict(ckpt_cfg).to_dict()  # an older checkpoint's format, migrated
    if ckpt_cfg is not None and ckpt_cfg.get("vocab_size") != cfg.vocab_size:
        raise TernkitError(f"the checkpoint's vocabulary ({ckpt_cfg.get('vocab_size')}) does not match this recipe's "
                           f"tokenizer ({cfg.vocab_size}); resume with the tokenizer the run was trained with.")
    if ckpt_cfg is not None:
        want = cfg.to_dict()
        diff = [k for k in want if k != "extra" and want[k] != ckpt_cfg.get(k)]
        if diff:
            shown = ", ".join(f"{k}={ckpt_cfg.get(k)!r} vs {want[k]!r}" for k in diff[:3])
            raise TernkitError(f"{ckpt_path} holds a different model than this recipe describes ({shown}); resume with "
                               "the run's own recipe.yaml or start a new run with --set name=<new name>.")
    if ckpt_path is not None and tok_changed:
        raise TernkitError(f"this recipe's tokenizer differs from the one {run_dir} was trained with (tokenizer.json); "
                           "resume with the run's own recipe.yaml.")
    module = TernkitLM(cfg.to_dict(), recipe.optimizer.model_dump(mode="json"), recipe.schedule.model_dump(mode="json"),
                       recipe.trainer.max_steps, run_info={"run_dir": str(run_dir), "name": recipe.name},
                       divergence={"factor": recipe.trainer.divergence_factor,
                                   "patience": recipe.trainer.divergence_patience,
                                   "stop": recipe.trainer.divergence_stop})
    init_report = None
    if recipe.init_from and ckpt_path is None:  # a resume continues from its checkpoint's own weights
        init_report = _init_from(module.model, recipe.init_from, tok_file if not had_tok else None)
    counts = parameter_counts(module.model)
    if recipe.trainer.compile and not dry_run:
        module.model.compile()  # in place: the state dict, checkpoints and exports keep their keys
    result = TrainResult(run_dir=run_dir, counts=counts, resumed_from=str(ckpt_path) if ckpt_path else None,
                         init_from=init_report)
    if dry_run:
        return result
    if ckpt_path is not None:
        result.changed_on_resume = resume_changes(ckpt_meta, recipe)
        _check_same_optimizer_layout(ckpt_meta, recipe, ckpt_path)
        if result.changed_on_resume and is_rank_zero():
            shown = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in result.changed_on_resume.items())
            sys.stderr.write(f"resuming {ckpt_path} (step {resume_step}) with changed settings, "
                             f"which apply from the next step: {shown}\n")
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "resumes.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(ckpt_path),
                                     "step": resume_step,
                                     "changed": result.changed_on_resume}) + "\n")

    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
    t = recipe.trainer
    every = recipe.checkpoint.every_steps or None
    replicas = ReplicaCheckCallback()
    val_steps = min(t.val_every, t.max_steps)  # optimizer steps between validations
    stop = GracefulStop(run_dir, val_every=val_steps, max_steps=t.max_steps)
    callbacks: list[Any] = [
        stop,
        # No version counter: a resumed run whose checkpoint carries no last_model_path must still write
        # last.ckpt (Lightning would pick last-v1.ckpt, which --resume auto and the NaN hold-back never see).
        ModelCheckpoint(dirpath=str(run_dir), filename="step{step:07d}", save_last=True, save_top_k=0,
                        every_n_train_steps=every, auto_insert_metric_name=False, enable_version_counter=False),
        IntegerStateCallback(),
        TelemetryCallback(recipe.logging.telemetry_every),
        replicas,
    ]
    if recipe.checkpoint.keep_best:
        callbacks.append(ModelCheckpoint(dirpath=str(run_dir), filename="best", monitor="val/loss", mode="min",
                                         save_top_k=1, save_last=False, auto_insert_metric_name=False,
                                         enable_version_counter=False))
    if t.sample_every > 0 and dm.tokenizer is not None:
        callbacks.append(SampleCallback(t.sample_every, dm.tokenizer, t.sample_prompt, t.sample_tokens, recipe.seed))
    bar = progress is True and sys.stdout.isatty()
    if bar:
        callbacks.append(_step_progress_bar()(leave=True))
    elif progress:
        callbacks.append(PlainProgress(t.log_every, t.max_steps))
    trainer = L.Trainer(
        max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=_strategy(t.strategy, cfg), precision=t.precision, gradient_clip_val=t.grad_clip,
        accumulate_grad_batches=t.grad_accum, val_check_interval=val_steps * t.grad_accum, check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches, num_sanity_val_steps=0, log_every_n_steps=t.log_every,
        logger=_loggers(recipe, run_dir, resume_step) or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        enable_progress_bar=bar, enable_model_summary=False, default_root_dir=str(run_dir),
        deterministic=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*is an IterableDataset.*")
        warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__`.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        # Lightning's own use of a deprecated torch pytree API: noise the user can do nothing about.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)`? is deprecated.*")
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
        except SIGTERMException:
            # SIGTERM before our handlers were in place (set-up, or under DDP): Lightning stops with a bare
            # SystemExit, which a scheduler would read as success.
            raise stop.error(str(run_dir / "recipe.yaml"), signal.SIGTERM) from None
        last = run_dir / "last.ckpt"
        finished = int(trainer.global_step) >= t.max_steps
        if stop.signum is not None and (stop.saved is not None or not finished):
            if stop.saved is None and int(trainer.global_step) > resume_step:  # stopped where no step ended
                _save_final(trainer, last)
                stop.saved = (last, int(trainer.global_step))
            stop.linger()
            raise stop.error(str(run_dir / "recipe.yaml"))
        _save_final(trainer, last)  # the final step, whatever every_steps was
    result.steps = int(trainer.global_step)
    result.train_loss = module.last_train_loss
    metrics = trainer.callback_metrics
    if "val/loss" in metrics:
        result.val_loss = float(metrics["val/loss"])
    if "val/acc" in metrics:
        result.val_acc = float(metrics["val/acc"])
    result.last_ckpt = last
    result.replicas = replicas.world_size
    result.global_rank = int(trainer.global_rank)
    result.replicas_identical = replicas.identical
    if trainer.is_global_zero and dm.tokenizer is not None and t.sample_tokens > 0:
        result.sample = sample_text(module.model, dm.tokenizer, t.sample_prompt, t.sample_tokens, recipe.seed)
    if trainer.is_global_zero:
        write_text_atomic(run_dir / "summary.json", json.dumps(result.to_dict(), indent=2))
    return result
