"""nn modules built on the ops: ternary linear layers (latent-weight and integer-state), packed layers, the STC quantizer."""

from __future__ import annotations

from ternkit.modules.linear import TernaryLinear, latent_ternary_layers, make_linear, swap_linear, ternary_modules

__all__ = ["TernaryLinear", "latent_ternary_layers", "make_linear", "swap_linear", "ternary_modules"]
