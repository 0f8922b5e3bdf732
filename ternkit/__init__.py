"""ternkit: train ternary ({-1, 0, +1}) language models and ship them small and fast."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
