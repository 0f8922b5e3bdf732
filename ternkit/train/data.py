"""The recipe's data as a LightningDataModule; sources, token cache, sampling and tasks live in :mod:`ternkit.data`.

Sampling is a pure function of ``(seed, step)``, so a run resumed at step N sees exactly what an
uninterrupted run would. Batches are ``(x, y)`` LongTensors of shape (B, T); positions that carry
no loss hold ``IGNORE_INDEX`` in ``y``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset

from ternkit.data import StepBatches, Task, make_task, prepare_text_data
from ternkit.errors import TernkitError
from ternkit.tokenizer import Tok

if TYPE_CHECKING:  # annotations only: the recipe schema imports nothing from here
    from ternkit.recipe import Recipe

__all__ = ["TernkitDataModule"]

try:  # lightning is a hard dependency; the guard only keeps the pure-data helpers importable without it
    import lightning as L

    _DMBase: type = L.LightningDataModule
except ImportError:  # pragma: no cover
    _DMBase = object


class TernkitDataModule(_DMBase):  # type: ignore[misc, valid-type]
    """The recipe's data as a LightningDataModule around its :class:`~ternkit.data.tasks.Task` (text, parity, MQAR).

    Train batches come from a ``StepBatches`` iterable that is a pure function of the global
    micro-batch index, so resuming is exact: ``train_dataloader()`` starts at ``start_step`` when
    set, otherwise at ``trainer.global_step * trainer.grad_accum`` of the attached trainer (which
    Lightning has restored from the checkpoint by then). The iterable never ends; stop training
    with ``max_steps`` (and validate with an integer ``val_check_interval``). Under DDP each rank
    reads its own disjoint slice of every global batch. Batches are ``(x, y)``, each (B, T) int64.
    """

    def __init__(self, recipe: Recipe, run_dir: str | os.PathLike[str], start_step: int | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.start_step = start_step
        self.task: Task | None = None
        self.tokenizer: Tok | None = None
        self.val_set: Dataset | None = None

    @property
    def cache_dir(self) -> Path:
        """Where token files are cached: ``data.cache_dir`` or ``<run dir>/data``."""
        d = self.recipe.data.cache_dir
        return Path(d).expanduser() if d else self.run_dir / "data"

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer or synthetic task (after ``setup``)."""
        if self.task is None:
            raise RuntimeError("call setup() before reading vocab_size")
        return int(self.task.vocab_size)

    @property
    def fingerprint(self) -> str:
        """Identity of the data the sampler walks over (token cache fingerprint or task parameters)."""
        if self.task is None:
            self.setup()
        assert self.task is not None
        return self.task.fingerprint

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def prepare_data(self) -> None:
        """Tokenize and cache the corpus once (Lightning calls this on one process only)."""
        if not self.recipe.data.synthetic:
            prepare_text_data(self.recipe.data, self.recipe.tokenizer, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Build the recipe's task: tokenizer and token files (building them if needed), or the synthetic task."""
        if self.task is not None:
            return
        r = self.recipe
        task = make_task(r, self.cache_dir)
        self.tokenizer = task.tokenizer
        if self.tokenizer is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # A run folder keeps the tokenizer it was trained with; the run decides whether a different one may replace it.
            if self._rank_world()[0] == 0 and not (self.run_dir / "tokenizer.json").exists():
                self.tokenizer.save(self.run_dir)
        if r.model.vocab_size is not None and r.model.vocab_size < task.vocab_size:
            raise TernkitError(
                f"model.vocab_size ({r.model.vocab_size}) is smaller than the data's vocabulary ({task.vocab_size}); "
                "remove model.vocab_size to take it from the tokenizer."
            )
        self.val_set = task.val_set()
        self.task = task

    def train_batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) batch, each (batch_size, T) int64, of global micro-batch ``step`` for ``rank``."""
        self.setup()
        assert self.task is not None
        return self.task.batch(step, self.recipe.trainer.batch_size, self.recipe.seed, rank, world_size)

    def resume_step(self) -> int:
        """The global micro-batch index training continues from (see the class docstring)."""
        if self.start_step is not None:
            return int(self.start_step)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_step) * int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        return 0

    def train_dataloader(self) -> DataLoader:
        """Endless, step-indexed train batches starting at ``resume_step()``."""
        self.setup()
        rank, world = self._rank_world()
        ds = StepBatches(lambda s: self.train_batch(s, rank, world), start_step=self.resume_step())
        nw = self.recipe.trainer.num_workers
        return DataLoader(ds, batch_size=None, num_workers=nw, persistent_workers=nw > 0)

    def val_dataloader(self) -> DataLoader:
        """Fixed validation batches (the same windows or examples every time)."""
        self.setup()
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.recipe.trainer.batch_size, shuffle=False,
                          num_workers=self.recipe.trainer.num_workers)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records about the data, to check on resume that it is unchanged."""
        return {"fingerprint": self.fingerprint, "seed": int(self.recipe.seed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when resuming onto different data or seed (the replayed batches would then differ)."""
        self.setup()
        if state_dict.get("fingerprint") != self.fingerprint or state_dict.get("seed") != int(self.recipe.seed):
            warnings.warn("resuming with different data or seed than the checkpoint: the batch order will not replay exactly",
                          stacklevel=2)
