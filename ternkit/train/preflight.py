"""Checks a recipe must pass on this machine before a run starts: they read no data and write no file.

The recipe schema checks what is true anywhere (a strategy name, a finite learning rate); what
depends on the machine (is a GPU visible, does the model fit in memory, can the tokenizer file
be read) is checked here, so that a run that cannot start fails in one sentence before the
corpus is tokenized, the run folder is created or a tensor is allocated.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ternkit.errors import TernkitError
from ternkit.models.config import BYTES_FP32, TRAIN_BYTES, check_model_fits
from ternkit.recipe import Recipe, TrainerConfig

__all__ = ["check_accelerator", "check_before_training", "estimated_vocab_size"]

_GPU_NAMES = ("gpu", "cuda")


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def check_accelerator(trainer: TrainerConfig) -> None:
    """Refuse ``trainer.accelerator`` / ``trainer.devices`` that ask for a GPU this machine does not show torch."""
    acc = trainer.accelerator
    if acc in _GPU_NAMES:
        count = _cuda_count()
        if count == 0 and not (acc == "gpu" and _mps_available()):
            raise TernkitError(f"trainer.accelerator={acc} but no GPU is visible to torch (torch.cuda.is_available() is "
                               "False); use --set trainer.accelerator=cpu, or auto to take a GPU when there is one.")
        devices = trainer.devices
        wanted = max(devices) + 1 if isinstance(devices, list) and devices else devices
        if count and isinstance(wanted, int) and wanted > count:
            raise TernkitError(f"trainer.devices={devices} asks for {wanted} GPUs but {count} "
                               f"{'is' if count == 1 else 'are'} visible; set trainer.devices to at most {count} or "
                               "auto.")
    elif acc == "mps" and not _mps_available():
        raise TernkitError("trainer.accelerator=mps but Apple's MPS GPU is not available here; use --set "
                           "trainer.accelerator=cpu or auto.")


def _on_gpu(trainer: TrainerConfig) -> bool:
    """Whether the run's optimizer state will live on a GPU rather than in this machine's memory."""
    if trainer.accelerator in _GPU_NAMES + ("mps",):
        return True
    return trainer.accelerator == "auto" and (_cuda_count() > 0 or _mps_available())


def estimated_vocab_size(recipe: Recipe, tokenizer: Any = None) -> int:
    """The vocabulary the model will get, from the recipe alone (a loaded ``tokenizer.kind=file`` tokenizer if given)."""
    if recipe.model.vocab_size is not None:
        return recipe.model.vocab_size
    if recipe.data.source == "mqar":
        return recipe.data.mqar.vocab_size
    if recipe.data.synthetic:
        from ternkit.data.tasks import PARITY_VOCAB

        return PARITY_VOCAB
    if recipe.tokenizer.kind == "bpe":
        return recipe.tokenizer.vocab_size
    if tokenizer is not None:
        return int(tokenizer.vocab_size)
    return 256


def setting_notes(recipe: Recipe) -> list[str]:
    """Sentences about settings that are valid but almost certainly not what was meant (printed, not refused)."""
    notes = []
    warm, steps = recipe.schedule.warmup_steps, recipe.trainer.max_steps
    if warm > steps:
        notes.append(f"schedule.warmup_steps ({warm}) is more than trainer.max_steps ({steps}), so the LR never "
                     f"reaches optimizer.lr; lower schedule.warmup_steps (e.g. --set schedule.warmup_steps={max(steps // 10, 1)}).")
    return notes


def check_before_training(recipe: Recipe, dry_run: bool = False) -> int:
    """Refuse, in one sentence, a run this machine cannot start; returns the estimated parameter count.

    Checks that an ``init_from`` source exists, that a ``tokenizer.kind=file`` tokenizer loads, that a GPU accelerator is visible
    (not for ``dry_run``, which builds no Trainer), and that the model fits in memory: the fp32
    weights for a dry run or a GPU run (the model is built in this machine's memory first), and
    weights, gradients and optimizer state for a run on the CPU.
    """
    for line in setting_notes(recipe):
        sys.stderr.write(f"note: {line}\n")
    if recipe.init_from and not Path(recipe.init_from).expanduser().exists():
        raise TernkitError(f"init_from {recipe.init_from} does not exist; pass a ternkit checkpoint (.ckpt) or an export "
                           "folder to start from, or remove init_from.")
    tokenizer = None
    if recipe.tokenizer.kind == "file" and not recipe.data.synthetic:
        from ternkit.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(recipe.tokenizer.path or "")
    if not dry_run:
        check_accelerator(recipe.trainer)
    vocab = estimated_vocab_size(recipe, tokenizer)
    if dry_run or _on_gpu(recipe.trainer):
        return check_model_fits(recipe.model, vocab, BYTES_FP32)
    name = recipe.optimizer.name
    return check_model_fits(recipe.model, vocab, TRAIN_BYTES.get(name, TRAIN_BYTES["adamw"]), f"to train with {name}")
