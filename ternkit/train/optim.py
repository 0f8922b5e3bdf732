"""Optimizers and schedules: AdamW or Muon (+AdamW), warmup + cosine, BitNet's two-stage LR and weight decay."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["param_groups", "wants_ternary_group", "build_optimizer", "lr_factor", "weight_decay_factor",
           "MuonWithAdamW"]


def wants_ternary_group(ternary_lr_scale: float = 1.0, ternary_weight_decay: float | None = None,
                        ternary_lr_max: float | None = None) -> bool:
    """Whether these optimizer settings give the latent ternary weights an AdamW group of their own."""
    return ternary_lr_scale != 1.0 or ternary_weight_decay is not None or ternary_lr_max is not None


def param_groups(model: nn.Module, weight_decay: float, ternary_lr_scale: float = 1.0,
                 ternary_weight_decay: float | None = None, separate_ternary: bool = False) -> list[dict[str, Any]]:
    """AdamW groups: matrices (>= 2-D, not embeddings) decay; vectors, norms, gates' biases and embeddings don't.

    With ``ternary_lr_scale != 1``, a ``ternary_weight_decay`` or ``separate_ternary``, the latent
    weights of ternary layers get a group of their own (``lr_scale``: its LR is ``lr * ternary_lr_scale``).
    """
    from ternkit.modules.linear import latent_ternary_layers

    tern_ids: set[int] = set()
    if separate_ternary or wants_ternary_group(ternary_lr_scale, ternary_weight_decay):
        tern_ids = {id(m.weight) for m in latent_ternary_layers(model).values()}
    decay, no_decay, tern = [], [], []
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in tern_ids:
            tern.append(p)
        else:
            (decay if p.ndim >= 2 and id(p) not in emb_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "base_wd": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "base_wd": 0.0})
    if tern:
        twd = weight_decay if ternary_weight_decay is None else ternary_weight_decay
        groups.append({"params": tern, "weight_decay": twd, "base_wd": twd, "lr_scale": ternary_lr_scale})
    return groups


class MuonWithAdamW(torch.optim.Optimizer):
    """torch's Muon for the 2-D hidden matrices, AdamW for everything else, stepped together as one optimizer.

    Muon orthogonalizes matrix updates and is only defined for 2-D weights; embeddings, the LM
    head, norms and biases stay on AdamW, as in the Muon reference setup. ``param_groups`` is the
    concatenation of both inner optimizers' groups, so one LR scheduler drives both.
    """

    def __init__(self, muon_params: Iterable[torch.Tensor], adamw_groups: list[dict[str, Any]], lr: float,
                 weight_decay: float, betas: tuple[float, float], eps: float = 1e-8, momentum: float = 0.95) -> None:
        muon_params = list(muon_params)
        self.muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     adjust_lr_fn="match_rms_adamw")
        for g in self.muon.param_groups:
            g["base_wd"] = weight_decay
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps)
        # Optimizer's own bookkeeping (hooks, defaults) without registering params twice.
        super().__init__([{"params": [torch.zeros(1)]}], {"lr": lr})
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One step of both inner optimizers (the closure, if any, is evaluated once)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients of both inner optimizers."""
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Both inner optimizers' state dicts."""
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore both inner optimizers."""
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    momentum: float = 0.95, ternary_lr_scale: float = 1.0,
                    ternary_weight_decay: float | None = None,
                    ternary_lr_max: float | None = None) -> torch.optim.Optimizer:
    """AdamW (``name="adamw"``) or Muon for hidden matrices + AdamW for the rest (``name="muon"``).

    ``eps`` is AdamW's; ``momentum`` is Muon's; ``ternary_lr_scale`` / ``ternary_weight_decay`` /
    ``ternary_lr_max`` (a cap on ``lr * ternary_lr_scale``) give the latent ternary weights their
    own AdamW group (:func:`param_groups`; AdamW only).
    """
    if name == "adamw":
        if ternary_lr_max is not None:
            ternary_lr_scale = min(ternary_lr_scale, ternary_lr_max / lr)
        groups = param_groups(model, weight_decay, ternary_lr_scale, ternary_weight_decay,
                              separate_ternary=ternary_lr_max is not None)
        for g in groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if wants_ternary_group(ternary_lr_scale, ternary_weight_decay, ternary_lr_max):
        raise ValueError("optimizer.ternary_lr_scale, ternary_lr_max and ternary_weight_decay apply to adamw only")
    if name == "muon":
        emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        head = getattr(model, "head", None)
        head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        muon, rest_decay, rest = [], [], []
        for p in model.parameters():
            if not p.requires_grad:
                continue
            if p.ndim == 2 and id(p) not in emb_ids and id(p) not in head_ids:
                muon.append(p)
            elif p.ndim >= 2:
                rest_decay.append(p)
            else:
                rest.append(p)
        groups = [{"params": rest_decay, "weight_decay": weight_decay, "base_wd": weight_decay},
                  {"params": rest, "weight_decay": 0.0, "base_wd": 0.0}]
        return MuonWithAdamW(muon, [g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay, betas=betas,
                             eps=eps, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}")


def _stage_start(max_steps: int, two_stage_at: float) -> int:
    """The optimizer step where BitNet's second stage begins."""
    return min(max(int(round(max_steps * two_stage_at)), 1), max_steps)


def lr_factor(step: int, max_steps: int, warmup_steps: int, kind: str = "cosine", min_lr_ratio: float = 0.1,
              two_stage: bool = False, two_stage_at: float = 0.5) -> float:
    """Multiplier of the peak LR at optimizer step ``step``: linear warmup, then cosine, linear or constant decay.

    Decay runs from the peak to ``min_lr_ratio * peak`` at ``max_steps``. With ``two_stage`` (BitNet
    b1.58), stage one is the first part of a schedule that would end at ``2 * mid`` (it stays high),
    and at ``mid = two_stage_at * max_steps`` stage two restarts the decay from half the peak.
    """
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown schedule kind {kind!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    mid = _stage_start(max_steps, two_stage_at)
    if kind == "constant":
        return 0.5 if two_stage and step >= mid else 1.0

    def decay(s: int, start: int, end: int, peak: float) -> float:
        t = min(max((s - start) / max(end - start, 1), 0.0), 1.0)
        shape = 1.0 - t if kind == "linear" else 0.5 * (1 + math.cos(math.pi * t))
        return min_lr_ratio * peak + (1 - min_lr_ratio) * peak * shape

    if two_stage:
        if step < mid:
            return decay(step, warmup_steps, 2 * mid, 1.0)
        return decay(step, mid, max_steps, 0.5)
    return decay(step, warmup_steps, max_steps, 1.0)


def weight_decay_factor(step: int, max_steps: int, two_stage: bool, two_stage_at: float = 0.5) -> float:
    """Multiplier of the base weight decay: 1, or with ``two_stage`` 1 in stage one and 0 after (BitNet b1.58)."""
    if two_stage and step >= _stage_start(max_steps, two_stage_at):
        return 0.0
    return 1.0
