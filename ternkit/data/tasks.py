"""What a run trains on, as task objects: text windows, parity or MQAR; each answers ``batch(step)`` and ``val_set()``."""

from __future__ import annotations

import os
from typing import Any, Protocol, TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ternkit.data.cache import TokenData, prepare_text_data
from ternkit.data.sampling import TokenDataset
from ternkit.data.sources import fingerprint, hash_int
from ternkit.tokenizer import Tok

if TYPE_CHECKING:  # annotations only: the recipe schema imports nothing from here
    from ternkit.recipe import MqarConfig, ParityConfig, Recipe

__all__ = ["IGNORE_INDEX", "PARITY_VOCAB", "MqarTask", "ParityTask", "Task", "TextTask", "make_task", "mask_targets",
           "mqar_examples", "parity_examples"]

IGNORE_INDEX = -100
# Parity task ids: bits are 0 and 1 (also the parity classes), BOS opens every string, padding fills short ones.
PARITY_ZERO, PARITY_ONE, PARITY_BOS, PARITY_PAD = 0, 1, 2, 3
PARITY_VOCAB = 4




def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def parity_examples(n: int, min_len: int, max_len: int, seed: int | torch.Generator, seq_len: int | None = None,
                    last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Running-parity examples: x, y (n, seq_len) int64 and loss_mask (n, seq_len) bool.

    Each row of x is BOS (id 2), then L random bits (ids 0/1, L uniform in [min_len, max_len]),
    then padding id 3 up to ``seq_len`` (default ``max_len + 1``). y[t] is the parity (id 0/1) of the
    bits in x[1..t], so y is 0 at BOS; the model must carry the parity along the whole string, as in
    :mod:`ternkit.parity`. The mask supervises BOS and every bit position and never the padding;
    with ``last_only`` it supervises only each row's last bit, whose target is the parity of the whole
    string (the length-generalisation score when used for validation).
    """
    g = _generator(seed)
    seq_len = max_len + 1 if seq_len is None else seq_len
    if seq_len < max_len + 1:
        raise ValueError(f"seq_len {seq_len} is too short for BOS plus {max_len} bits")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"parity lengths need 1 <= min_len <= max_len, got {min_len}..{max_len}")
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    bits = torch.randint(0, 2, (n, seq_len), generator=g)
    pos = torch.arange(seq_len)
    # Position t >= 1 holds bit t-1; a row of length L has its bits at positions 1..L.
    real = (pos[None, :] >= 1) & (pos[None, :] <= lengths[:, None])
    bits = torch.where(real, bits, torch.zeros_like(bits))
    x = torch.where(real, bits, torch.full_like(bits, PARITY_PAD))
    x[:, 0] = PARITY_BOS
    y = torch.cumsum(bits, dim=1) % 2
    if last_only:
        mask = pos[None, :] == lengths[:, None]
    else:
        mask = pos[None, :] <= lengths[:, None]
    y = torch.where(mask, y, torch.zeros_like(y))
    return x.contiguous(), y.contiguous(), mask


def mqar_examples(n: int, vocab_size: int, seq_len: int, num_kv_pairs: int, seed: int | torch.Generator,
                  num_queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-query associative recall (Zoology-style): x, y (n, seq_len) int64 and loss_mask (n, seq_len) bool.

    x starts with ``num_kv_pairs`` pairs ``k1 v1 k2 v2 ...`` (distinct keys from [1, V/2), values from
    [V/2, V)); the rest is filler id 0 except ``num_queries`` of the keys, asked again at uniformly
    drawn distinct positions. At a query position t, y[t] is that key's value and loss_mask[t] is
    True; elsewhere y is 0 and the mask False. (Zoology spaces queries by a power law; here uniform.)
    """
    g = _generator(seed)
    q = num_kv_pairs if num_queries is None else num_queries
    half = vocab_size // 2
    ctx = 2 * num_kv_pairs
    if num_kv_pairs > half - 1 or q > num_kv_pairs or ctx + q > seq_len:
        raise ValueError("mqar: not enough keys, or seq_len too short for the pairs and queries")
    keys = torch.rand(n, half - 1, generator=g).argsort(dim=1)[:, :num_kv_pairs] + 1
    if num_kv_pairs <= vocab_size - half:
        values = torch.rand(n, vocab_size - half, generator=g).argsort(dim=1)[:, :num_kv_pairs] + half
    else:
        values = torch.randint(half, vocab_size, (n, num_kv_pairs), generator=g)
    x = torch.zeros(n, seq_len, dtype=torch.long)
    x[:, 0:ctx:2] = keys
    x[:, 1:ctx:2] = values
    which = torch.rand(n, num_kv_pairs, generator=g).argsort(dim=1)[:, :q]
    slots = torch.rand(n, seq_len - ctx, generator=g).argsort(dim=1)[:, :q] + ctx
    rows = torch.arange(n)[:, None]
    x[rows, slots] = torch.gather(keys, 1, which)
    y = torch.zeros(n, seq_len, dtype=torch.long)
    y[rows, slots] = torch.gather(values, 1, which)
    mask = torch.zeros(n, seq_len, dtype=torch.bool)
    mask[rows, slots] = True
    return x, y, mask


def mask_targets(y: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``y`` with ``IGNORE_INDEX`` wherever ``loss_mask`` is False (same shape)."""
    return torch.where(loss_mask, y, torch.full_like(y, IGNORE_INDEX))


# ---------------------------------------------------------------------------------------- tasks


class Task(Protocol):
    """What a run trains on: batches by global micro-batch index, a fixed validation set, a vocabulary."""

    vocab_size: int
    fingerprint: str
    tokenizer: Tok | None

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) batch, each (batch_size, T) int64, of global micro-batch ``step`` for ``rank``."""
        ...

    def val_set(self) -> Dataset:
        """Fixed validation examples (the same every evaluation and every run)."""
        ...


class TextTask:
    """Next-token windows of ``context_length`` over a cached token file; validation is evenly spread fixed windows."""

    def __init__(self, data: TokenData, context_length: int, num_val: int) -> None:
        self.data = data
        self.tokenizer: Tok | None = data.tokenizer
        self.vocab_size = int(data.tokenizer.vocab_size)
        self.fingerprint = str(data.meta["fingerprint"])
        self.train = TokenDataset(data.train, context_length, "train")
        self._val = TokenDataset(data.val, context_length, "validation")
        self._num_val = num_val

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) windows of micro-batch ``step`` (see :func:`ternkit.data.sampling.batch_indices`)."""
        return self.train.batch(step, batch_size, seed, rank, world_size)

    def val_set(self) -> Dataset:
        """Evenly spread fixed windows of the validation split."""
        n = min(len(self._val), self._num_val)
        return Subset(self._val, np.linspace(0, len(self._val) - 1, n).round().astype(int).tolist())


class ParityTask:
    """Running parity of bit strings: train on lengths ``train_len_min..max``, score the last bit at ``eval_len``."""

    tokenizer: Tok | None = None
    vocab_size = PARITY_VOCAB

    def __init__(self, cfg: ParityConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.fingerprint = fingerprint({"source": "parity", "task": cfg.model_dump(mode="json")})

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh random strings for micro-batch ``step``: (x, y) (batch_size, train_len_max + 1)."""
        c = self.cfg
        x, y, m = parity_examples(batch_size, c.train_len_min, c.train_len_max, hash_int(seed, "parity", step, rank,
                                                                                          world_size))
        return x, mask_targets(y, m)

    def val_set(self) -> Dataset:
        """``num_val`` strings of ``eval_len`` bits; only the last position is scored (whole-string parity)."""
        c = self.cfg
        x, y, m = parity_examples(c.num_val, c.eval_len, c.eval_len, hash_int(self.seed, "val", "parity"), last_only=True)
        return TensorDataset(x, mask_targets(y, m))


class MqarTask:
    """Multi-query associative recall: key-value pairs, then some keys queried again; only answers are scored."""

    tokenizer: Tok | None = None

    def __init__(self, cfg: MqarConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.vocab_size = int(cfg.vocab_size)
        self.fingerprint = fingerprint({"source": "mqar", "task": cfg.model_dump(mode="json")})

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh examples for micro-batch ``step``: (x, y) (batch_size, seq_len)."""
        c = self.cfg
        x, y, m = mqar_examples(batch_size, c.vocab_size, c.seq_len, c.num_kv_pairs,
                                hash_int(seed, "mqar", step, rank, world_size), c.num_queries)
        return x, mask_targets(y, m)

    def val_set(self) -> Dataset:
        """``num_val`` fixed examples."""
        c = self.cfg
        x, y, m = mqar_examples(c.num_val, c.vocab_size, c.seq_len, c.num_kv_pairs, hash_int(self.seed, "val", "mqar"),
                                c.num_queries)
        return TensorDataset(x, mask_targets(y, m))


def make_task(recipe: Recipe, cache_dir: str | os.PathLike[str]) -> Task:
    """The task of a recipe's ``data`` section (text data is tokenized and cached under ``cache_dir`` first)."""
    cfg = recipe.data
    if cfg.source == "parity":
        return ParityTask(cfg.parity, recipe.seed)
    if cfg.source == "mqar":
        return MqarTask(cfg.mqar, recipe.seed)
    data = prepare_text_data(cfg, recipe.tokenizer, cache_dir)
    return TextTask(data, recipe.model.context_length, recipe.trainer.val_batches * recipe.trainer.batch_size)
