"""The parity experiment: parity of bit strings with a one-block xLSTM LM: the ternary forget gate (g = -1 negates the memory) vs the sigmoid gate.

Task: the input is BOS followed by L random bits; at every position t the model predicts the
parity of the bits seen so far (0 at BOS). Training uses L = ``train_len`` (16), so every prefix
length 1..16 is a training target; evaluation uses length ``eval_len`` (64) strings and scores the
parity of the whole string (last position) and of every prefix.

Why a ternary gate can solve it and a sigmoid gate cannot (Grazzi et al., negative eigenvalues):
with g = -1 on a 1-bit and +1 on a 0-bit, one write at BOS leaves C = (-1)^parity k v^T, so the
sign of h carries the parity at any length. A gate in (0, 1) can only shrink the memory, so one
layer with a 4-token causal conv sees the parity of at most a few recent bits.

What training needs (measured, see benchmarks/parity.py): the forget-gate bias must start near
the ternary threshold (here 0.5, tanh(0.5) = 0.46 < 0.5, so g starts at 0 but close to +1). With
xLSTM's linspace(3, 6) or even 1.0 the gate starts saturated at +1, its straight-through
gradient (1 - tanh^2) is tiny, and it never learns to flip (accuracy stays at chance). Even
from 0.5, some seeds (about 1 in 5) lock into the wrong polarity (g = -1 on 0-bits), where
tanh saturates and the gate can no longer move; those runs stay near chance.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from ternkit.data.tasks import PARITY_BOS, PARITY_VOCAB, parity_examples
from ternkit.models.config import ModelConfig
from ternkit.models.lm import XLSTMLM

__all__ = ["BOS", "parity_batch", "parity_model", "evaluate_parity", "run_parity"]

BOS = PARITY_BOS


def parity_batch(batch_size: int, length: int, generator: torch.Generator | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, L+1) long: BOS then L bits, targets (B, L+1) long: running parity, 0 at BOS).

    The task of ``data.source: parity`` (:func:`ternkit.data.tasks.parity_examples`) at one fixed length.
    """
    x, y, _ = parity_examples(batch_size, length, length, generator)
    return x, y


def parity_model(gate_mode: str, d_model: int = 32, n_heads: int = 2, forget_bias_init: tuple[float, float] = (0.5, 0.5),
                 ternary: tuple[str, ...] = ()) -> XLSTMLM:
    """A one-block, FFN-free xLSTM LM over the 3 tokens {0, 1, BOS}; the logits of tokens 0/1 are the parity classes."""
    cfg = ModelConfig(vocab_size=PARITY_VOCAB, d_model=d_model, n_blocks=1, n_heads=n_heads, context_length=128,
                      chunk_size=64, gate_mode=gate_mode, ffn="none", ternary_projections=list(ternary),
                      forget_bias_init=forget_bias_init, tie_embeddings=False)
    return XLSTMLM(cfg)


@torch.no_grad()
def evaluate_parity(model: XLSTMLM, length: int, n: int = 1000, seed: int = 1234) -> dict[str, float]:
    """Accuracy of ``model`` on ``n`` strings of ``length`` bits: of the full-string parity and over all prefixes."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    tokens, targets = parity_batch(n, length, gen)
    pred = model(tokens)[..., :2].argmax(-1)
    model.train(was_training)
    return {
        "final_acc": (pred[:, -1] == targets[:, -1]).float().mean().item(),
        "prefix_acc": (pred[:, 1:] == targets[:, 1:]).float().mean().item(),
    }


def run_parity(gate_mode: str, steps: int = 300, seed: int = 0, batch_size: int = 64, train_len: int = 16,
               eval_len: int = 64, lr: float = 3e-3, d_model: int = 32, n_heads: int = 2,
               forget_bias_init: tuple[float, float] = (0.5, 0.5), eval_n: int = 1000,
               log_every: int = 0, threads: int | None = 1) -> dict[str, Any]:
    """Train a one-block xLSTM LM on running parity (length ``train_len``) and score it at ``train_len`` and ``eval_len``.

    Plain AdamW loop with cosine decay on CPU; ``threads`` (default 1, fastest for this tiny model)
    sets torch's intra-op threads for the run and restores them after. Returns gate_mode, steps, seed, final training
    loss, the accuracies (``train_final_acc``/``train_prefix_acc`` at ``train_len``,
    ``final_acc``/``prefix_acc`` at ``eval_len``) and the wall time in seconds.
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_parity(gate_mode, steps, seed, batch_size, train_len, eval_len, lr, d_model, n_heads,
                           forget_bias_init, eval_n, log_every)
    finally:
        torch.set_num_threads(old_threads)


def _run_parity(gate_mode: str, steps: int, seed: int, batch_size: int, train_len: int, eval_len: int, lr: float,
                d_model: int, n_heads: int, forget_bias_init: tuple[float, float], eval_n: int,
                log_every: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = parity_model(gate_mode, d_model=d_model, n_heads=n_heads, forget_bias_init=forget_bias_init)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.perf_counter()
    loss_val = float("nan")
    model.train()
    for step in range(steps):
        tokens, targets = parity_batch(batch_size, train_len, gen)
        logits = model(tokens)[..., :2]
        loss = F.cross_entropy(logits.reshape(-1, 2), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_val = loss.item()
        if log_every and (step + 1) % log_every == 0:
            acc = evaluate_parity(model, eval_len, n=200)
            print(f"[{gate_mode}] step {step + 1}: loss {loss_val:.4f}, acc@{eval_len} {acc['final_acc']:.3f}")
    train_acc = evaluate_parity(model, train_len, n=eval_n)
    eval_acc = evaluate_parity(model, eval_len, n=eval_n)
    return {
        "gate_mode": gate_mode,
        "steps": steps,
        "seed": seed,
        "train_len": train_len,
        "eval_len": eval_len,
        "loss": loss_val,
        "train_final_acc": train_acc["final_acc"],
        "train_prefix_acc": train_acc["prefix_acc"],
        "final_acc": eval_acc["final_acc"],
        "prefix_acc": eval_acc["prefix_acc"],
        "seconds": time.perf_counter() - t0,
        "model": model,
    }
