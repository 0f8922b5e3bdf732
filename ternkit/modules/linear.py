"""Ternary linear layers (latent float weight, ternarized in forward) and the nn.Linear swap helper."""

from __future__ import annotations

import fnmatch
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ternkit.errors import TernkitError
from ternkit.quant.spec import SCALES, Scale, TernarySpec
from ternkit.quant.ternarize import (
    absmean_alpha,
    act_quant_8bit,
    lsq_ternarize,
    per_row_alpha,
    ternarize_with,
    trits_of,
)

__all__ = ["SCALES", "TernaryLinear", "make_linear", "swap_linear", "ternary_modules"]



class TernaryLinear(nn.Module):
    """Linear layer whose forward uses a ternarized weight: y (..., out) = x (..., in) @ (alpha * T)^T + b.

    ``scale`` picks the ternarizer: ``"absmean"`` (per-tensor, BitNet b1.58), ``"per_row"``,
    ``"lsq"`` (learnable alpha, init 2 * mean|W|); each keeps a latent float ``weight`` (out, in)
    trained with a straight-through estimator. The integer-state ``"group"`` scale is
    :class:`ternkit.modules.group.GroupTernaryLinear`; :func:`make_linear` builds either from a
    :class:`~ternkit.quant.spec.TernarySpec`. ``act_bits=8`` adds per-token absmax int8 activation quantization (STE).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, scale: Scale = "absmean",
                 act_bits: int | None = None) -> None:
        super().__init__()
        if scale == "group":
            raise TernkitError("scale='group' is the integer-state GroupTernaryLinear; build it with "
                               "make_linear(d_in, d_out, TernarySpec(scale='group')).")
        if scale not in SCALES:
            raise TernkitError(f"unknown ternary scale {scale!r}; use one of {', '.join(SCALES)}.")
        if act_bits not in (None, 8):
            raise TernkitError(f"act_bits must be None or 8, got {act_bits!r}.")
        self.in_features = in_features
        self.out_features = out_features
        self.scale = scale
        self.act_bits = act_bits
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if scale == "lsq":
            self.alpha = nn.Parameter(2.0 * self.weight.detach().abs().mean().reshape(()))
        else:
            self.register_parameter("alpha", None)

    def scale_of(self) -> torch.Tensor:
        """The scale alpha, broadcastable to ``weight``: scalar () or per-row (out, 1)."""
        if self.scale == "lsq":
            assert self.alpha is not None
            return self.alpha
        if self.scale == "per_row":
            return per_row_alpha(self.weight.detach())
        return absmean_alpha(self.weight.detach())

    def ternary_weight(self) -> torch.Tensor:
        """The ternarized weight alpha * T (out, in), differentiable (STE) w.r.t. ``weight`` (and alpha for LSQ)."""
        if self.scale == "lsq":
            assert self.alpha is not None
            return lsq_ternarize(self.weight, self.alpha)
        return ternarize_with(self.weight, self.scale_of())

    def trits(self) -> torch.Tensor:
        """The trits T in {-1, 0, +1} as int8 (out, in)."""
        return trits_of(self.weight, self.scale_of())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y (..., out) from x (..., in) through the ternarized weight."""
        if self.act_bits == 8:
            x = act_quant_8bit(x)
        return F.linear(x, self.ternary_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scale={self.scale}, act_bits={self.act_bits}")


def make_linear(in_features: int, out_features: int, spec: TernarySpec | None, bias: bool = False) -> nn.Module:
    """The one way to build a projection x (..., in) -> (..., out): ``nn.Linear`` when ``spec`` is None, else ternary.

    ``spec.scale`` "absmean", "per_row" or "lsq" gives a latent-weight :class:`TernaryLinear`;
    "group" the integer-state :class:`ternkit.modules.group.GroupTernaryLinear` with
    ``spec.group_size`` columns per scale. ``spec.act_bits=8`` quantizes inputs per token.
    """
    if spec is None:
        return nn.Linear(in_features, out_features, bias=bias)
    if spec.scale == "group":
        from ternkit.modules.group import GroupTernaryLinear

        return GroupTernaryLinear(in_features, out_features, bias=bias, group_size=spec.group_size,
                                  act_bits=spec.act_bits)
    return TernaryLinear(in_features, out_features, bias=bias, scale=spec.scale, act_bits=spec.act_bits)


def ternary_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(name, module) of every ternary layer in ``model``: anything with ``trits()`` (latent or integer-state)."""
    for name, mod in model.named_modules():
        if callable(getattr(mod, "trits", None)):
            yield name, mod


def latent_ternary_layers(model: nn.Module) -> dict[str, TernaryLinear]:
    """{qualified name: layer} of every latent-weight :class:`TernaryLinear` in ``model`` (integer-state layers excluded)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TernaryLinear)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model``'s submodule ``name`` (dotted, as in ``named_modules``) was."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def swap_linear(model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = (),
                filter_fn: Callable[[nn.Module, str], bool] | None = None, spec: TernarySpec | None = None,
                **kwargs: object) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` whose qualified names match ``include`` (fnmatch) and
    not ``exclude`` by ternary layers of ``spec`` (or ``TernarySpec(**kwargs)``: ``scale``, ``act_bits``,
    ``group_size``) built by :func:`make_linear`, in place; returns ``model``.

    Latent-weight scales copy the float weight and bias, so a pretrained model starts from its own
    weights (torchao's ``quantize_`` style); ``filter_fn(module, name)`` can veto a swap.
    """
    inc, exc = tuple(include), tuple(exclude)
    spec = spec if spec is not None else TernarySpec(**kwargs)  # type: ignore[arg-type]
    targets = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in inc) or any(fnmatch.fnmatchcase(name, p) for p in exc):
            continue
        if filter_fn is not None and not filter_fn(mod, name):
            continue
        targets.append((name, mod))
    for name, lin in targets:
        new = make_linear(lin.in_features, lin.out_features, spec, bias=lin.bias is not None)
        new = new.to(device=lin.weight.device)
        if isinstance(new, TernaryLinear):
            with torch.no_grad():
                new.weight.copy_(lin.weight)
                if lin.bias is not None and new.bias is not None:
                    new.bias.copy_(lin.bias)
                if new.alpha is not None:
                    new.alpha.copy_(2.0 * lin.weight.abs().mean())
        replace_module(model, name, new)
    return model
