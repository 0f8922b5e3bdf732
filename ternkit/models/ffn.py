"""The one SwiGLU FFN: dense blocks, ternary blocks and MoE experts all use it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ternkit.modules.linear import make_linear
from ternkit.quant.spec import TernarySpec
from ternkit.quant.ternarize import act_quant_8bit

__all__ = ["SwiGLU", "small_init_", "wang_init_", "has_latent_weight"]


def small_init_(w: torch.Tensor, dim: int) -> None:
    """xLSTM's "small init" (Transformers without Tears): N(0, 2 / (5 dim)), in place."""
    nn.init.normal_(w, mean=0.0, std=math.sqrt(2.0 / (5.0 * dim)))


def wang_init_(w: torch.Tensor, dim: int, n_blocks: int) -> None:
    """Output projections shrink with depth (Wang init, as in xLSTM) so the residual stream stays O(1); in place."""
    nn.init.normal_(w, mean=0.0, std=2.0 / max(n_blocks, 1) / math.sqrt(dim))


def has_latent_weight(mod: nn.Module) -> bool:
    """True when ``mod`` has a float ``weight`` parameter to initialize (nn.Linear, latent-weight TernaryLinear)."""
    w = getattr(mod, "weight", None)
    return isinstance(w, nn.Parameter) and w.is_floating_point()


def _frozen_weight(layer: nn.Module) -> torch.Tensor | None:
    """The effective weight (out, in) of ``layer`` with no graph, or None if it has no such weight."""
    tw = getattr(layer, "ternary_weight", None)
    if callable(tw):
        return tw().detach().clone()
    if isinstance(layer, nn.Linear):
        return layer.weight.detach()
    return None


class SwiGLU(nn.Module):
    """SwiGLU FFN y (..., D) = W2 (SiLU(W1 x) * W3 x), W1, W3: D -> H, W2: H -> D; float (spec None) or ternary.

    ``fused=True`` keeps W1 and W3 as one projection ``w13`` (D -> 2H: one matmul, one ternary
    scale for both, the block FFN's layout); ``fused=False`` keeps ``w1`` and ``w3`` apart (a scale
    each, the MoE experts' layout). ``n_blocks`` given: xLSTM's init (small init in, Wang init out
    for a stack of that depth); None keeps the layers' own init. ``freeze()`` ternarizes the
    weights once and reuses them until ``train()`` or ``unfreeze()`` (inference fast path).
    """

    def __init__(self, d_model: int, hidden: int, spec: TernarySpec | None, n_blocks: int | None = None,
                 fused: bool = True) -> None:
        super().__init__()
        self.hidden = hidden
        self.fused = fused
        if fused:
            self.w13 = make_linear(d_model, 2 * hidden, spec)
        else:
            self.w1 = make_linear(d_model, hidden, spec)
            self.w3 = make_linear(d_model, hidden, spec)
        self.w2 = make_linear(hidden, d_model, spec)
        if n_blocks is not None:
            for layer in self._inputs():
                if has_latent_weight(layer):
                    small_init_(layer.weight, d_model)
            if has_latent_weight(self.w2):
                wang_init_(self.w2.weight, hidden, n_blocks)
        self._frozen: list[torch.Tensor | None] | None = None
        self._w13: torch.Tensor | None = None

    def _inputs(self) -> list[nn.Module]:
        return [self.w13] if self.fused else [self.w1, self.w3]

    def freeze(self) -> None:
        """Cache the effective (ternarized) weights for inference; call again after changing weights."""
        layers = self._inputs() + [self.w2]
        self._frozen = [_frozen_weight(m) for m in layers]
        ins = self._frozen[:-1]
        plain = all(getattr(m, "act_bits", None) is None and getattr(m, "bias", None) is None for m in self._inputs())
        self._w13 = (ins[0] if self.fused else torch.cat(ins, dim=0)) \
            if all(w is not None for w in ins) and plain else None  # type: ignore[arg-type]

    def unfreeze(self) -> None:
        """Drop the cached weights; forward ternarizes the latent weights again."""
        self._frozen = None
        self._w13 = None

    def train(self, mode: bool = True) -> SwiGLU:
        if mode:
            self._frozen, self._w13 = None, None  # cached weights would carry no gradient to the latent weights
        return super().train(mode)

    def _lin(self, i: int, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = None if self._frozen is None else self._frozen[i]
        if w is None:
            return layer(x)
        if getattr(layer, "act_bits", None) == 8:
            x = act_quant_8bit(x)
        b = getattr(layer, "bias", None)
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y (..., D) from x (..., D)."""
        last = len(self._inputs())
        if self._w13 is not None and not torch.is_grad_enabled():
            # Inference fast path: one (N, D) x (D, 2H) matmul for W1 and W3, in-place activation.
            a, b = F.linear(x, self._w13.to(x.dtype)).chunk(2, dim=-1)
            return self._lin(last, self.w2, F.silu(a, inplace=True).mul_(b))
        if self.fused:
            a, b = self._lin(0, self.w13, x).chunk(2, dim=-1)
        else:
            a, b = self._lin(0, self.w1, x), self._lin(1, self.w3, x)
        return self._lin(last, self.w2, F.silu(a) * b)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, fused={self.fused}"
