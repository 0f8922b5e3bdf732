"""Step-indexed sampling: the batch of global micro-batch ``step`` is a pure function of ``(seed, step)``."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ternkit.errors import TernkitError

from ternkit.data.sources import hash_int

__all__ = ["StepBatches", "TokenDataset", "batch_indices"]

@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash_int("epoch", seed, epoch))
    return torch.randperm(n, generator=g)


def batch_indices(step: int, batch_size: int, seed: int, n_windows: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Window indices (batch_size,) that ``rank`` reads at global micro-batch ``step``.

    Global sample positions ``step*B*W + rank*B + [0, B)`` walk through one seeded random
    permutation of all windows per epoch (epoch = position // n_windows), so the result depends
    only on its arguments: resuming at step k replays exactly the k-th batch of a fresh run, and
    the W ranks of a step read disjoint windows.
    """
    if n_windows <= 0:
        raise ValueError("n_windows must be positive")
    start = (step * world_size + rank) * batch_size
    pos = torch.arange(start, start + batch_size, dtype=torch.long)
    epochs = pos // n_windows
    out = torch.empty(batch_size, dtype=torch.long)
    for e in torch.unique(epochs).tolist():
        sel = epochs == e
        out[sel] = _epoch_permutation(n_windows, seed, int(e))[pos[sel] % n_windows]
    return out


class TokenDataset(Dataset):
    """Non-overlapping windows of a flat token array: item i is (x, y), each (context_length,), y = x shifted by one."""

    def __init__(self, tokens: np.ndarray, context_length: int, split: str = "train") -> None:
        self.tokens = tokens
        self.context_length = int(context_length)
        self.n_windows = (len(tokens) - 1) // self.context_length
        if self.n_windows <= 0:
            raise TernkitError(
                f"the {split} split has only {len(tokens)} tokens, fewer than model.context_length+1 ({self.context_length + 1}); "
                "add data, lower model.context_length or change data.val_fraction."
            )

    def __len__(self) -> int:
        return self.n_windows

    def window(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack the windows at window indices ``starts`` (B,) into (x, y), each (B, T) int64."""
        t = self.context_length
        rows = np.stack([np.asarray(self.tokens[s * t : s * t + t + 1]) for s in starts.tolist()]).astype(np.int64)
        block = torch.from_numpy(rows)
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.window(torch.tensor([int(i)]))
        return x[0], y[0]

    def batch_indices(self, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Window indices (batch_size,) of global micro-batch ``step`` for ``rank`` (see module ``batch_indices``)."""
        return batch_indices(step, batch_size, seed, self.n_windows, rank, world_size)

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) batch, each (batch_size, T), of global micro-batch ``step`` for ``rank``."""
        return self.window(self.batch_indices(step, batch_size, seed, rank, world_size))


class StepBatches(IterableDataset):
    """Yields ``batch_fn(step)`` for steps ``start_step, start_step+1, ...`` (forever when ``num_steps`` is None).

    Use with ``DataLoader(ds, batch_size=None)``: batches are already formed. With several loader
    workers, worker w takes steps start+w, start+w+W, ...; the loader's round-robin keeps the order.
    """

    def __init__(self, batch_fn: Callable[[int], Any], start_step: int = 0, num_steps: int | None = None) -> None:
        super().__init__()
        self.batch_fn = batch_fn
        self.start_step = int(start_step)
        self.num_steps = num_steps

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + wid
        end = None if self.num_steps is None else self.start_step + self.num_steps
        while end is None or step < end:
            yield self.batch_fn(step)
            step += nw
