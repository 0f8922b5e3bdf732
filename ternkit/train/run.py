"""One training run from a recipe: run folder, data, model, Lightning Trainer, resume, sample, summary."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ternkit.errors import TernkitError
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


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: None, ``auto`` (run_dir/last.ckpt if present) or a path that must exist."""
    if resume is None:
        return None
    if resume == "auto":
        last = run_dir / "last.ckpt"
        return last if last.exists() else None
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable summary."""
        return {"run_dir": str(self.run_dir), "steps": self.steps, "train_loss": self.train_loss,
                "val_loss": self.val_loss, "val_acc": self.val_acc, "sample": self.sample, "counts": self.counts,
                "resumed_from": self.resumed_from, "last_ckpt": str(self.last_ckpt) if self.last_ckpt else None,
                "replicas": self.replicas, "replicas_identical": self.replicas_identical}


def _loggers(recipe: Recipe, run_dir: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger

    out: list[Any] = []
    if recipe.logging.csv:
        out.append(CSVLogger(save_dir=str(run_dir), name="logs", version=""))
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


def _read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts (empty when the file is absent)."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@contextlib.contextmanager
def _merged_metrics(path: Path, old_rows: list[dict[str, str]], resume_step: int) -> Iterator[None]:
    """On exit (also after an error), write ``old_rows`` logged before ``resume_step`` ahead of the new rows in ``path``."""
    try:
        yield
    finally:
        if old_rows and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 and int(os.environ.get("NODE_RANK", "0") or 0) == 0:
            keep = [r for r in old_rows if r.get("step") and int(float(r["step"])) < resume_step]
            rows = keep + _read_csv(path)
            keys = list(dict.fromkeys(k for r in rows for k in r))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.merge.tmp")
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, path)


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


def train(recipe: Recipe, resume: str | None = None, dry_run: bool = False, progress: bool = True,
          console: Any = None) -> TrainResult:
    """Train the model a recipe describes, writing ``runs/<name>/`` (recipe, tokenizer, checkpoints, logs, summary).

    ``resume``: None (a run folder holding a checkpoint is then refused), ``"auto"`` or a checkpoint
    path. ``dry_run`` builds data and model, counts parameters by kind and stops.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ternkit.checkpoint import load_checkpoint
    from ternkit.train.callbacks import (AtomicCheckpointIO, IntegerStateCallback, ReplicaCheckCallback,
                                        SampleCallback, TelemetryCallback, sample_text)
    from ternkit.train.data import TernkitDataModule
    from ternkit.train.module import TernkitLM
    from ternkit.tokenizer import write_text_atomic

    _quiet_lightning()
    run_dir = recipe.run_dir
    ckpt_path = resolve_resume(resume, run_dir)
    if resume is None and not dry_run and (run_dir / "last.ckpt").exists():
        raise TernkitError(f"{run_dir} already holds a run (last.ckpt); pass --resume auto to continue it, or "
                           "--set name=<new name> to start another.")
    ckpt_cfg = None
    ckpt_meta: dict[str, Any] = {}
    if ckpt_path is not None:
        ckpt_meta = load_checkpoint(ckpt_path)
        ckpt_cfg = ckpt_meta["ternkit"]["model_config"]
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
    counts = parameter_counts(module.model)
    if recipe.trainer.compile and not dry_run:
        module.model.compile()  # in place: the state dict, checkpoints and exports keep their keys
    result = TrainResult(run_dir=run_dir, counts=counts, resumed_from=str(ckpt_path) if ckpt_path else None)
    if dry_run:
        return result

    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
    t = recipe.trainer
    every = recipe.checkpoint.every_steps or None
    replicas = ReplicaCheckCallback()
    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=str(run_dir), filename="step{step:07d}", save_last=True, save_top_k=0,
                        every_n_train_steps=every, auto_insert_metric_name=False),
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
    if progress:
        callbacks.append(_step_progress_bar()(leave=True))
    val_every = min(t.val_every, t.max_steps) * t.grad_accum
    trainer = L.Trainer(
        max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=_strategy(t.strategy, cfg), precision=t.precision, gradient_clip_val=t.grad_clip,
        accumulate_grad_batches=t.grad_accum, val_check_interval=val_every, check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches, num_sanity_val_steps=0, log_every_n_steps=t.log_every,
        logger=_loggers(recipe, run_dir) or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress, enable_model_summary=False, default_root_dir=str(run_dir),
        deterministic=False,
    )
    # Lightning's CSV logger deletes metrics.csv when it opens an existing log folder; a resumed run
    # keeps the history before its resume point and appends the replayed steps after it.
    metrics_csv = run_dir / "logs" / "metrics.csv"
    old_metrics = _read_csv(metrics_csv) if ckpt_path is not None else []
    resume_step = int(ckpt_meta.get("global_step", 0))
    with warnings.catch_warnings(), _merged_metrics(metrics_csv, old_metrics, resume_step):
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*is an IterableDataset.*")
        warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__`.*")
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        # Lightning's own use of a deprecated torch pytree API: noise the user can do nothing about.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)`? is deprecated.*")
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
        last = run_dir / "last.ckpt"
        trainer.save_checkpoint(str(last), weights_only=False)  # the final step, whatever every_steps was
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
