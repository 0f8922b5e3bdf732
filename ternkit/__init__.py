"""ternkit: train ternary ({-1, 0, +1}) language models and ship them small and fast."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# OpenMP threads that spin while waiting for work make torch 5-10x slower whenever another
# process shares the cores (measured on a 2-core box: 0.33 s vs 4.6 s per training step).
# Passive waiting costs nothing measurable when the cores are free. It must be set before
# torch loads its OpenMP runtime; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if TYPE_CHECKING:
    import torch

__version__ = "0.1.0"

__all__ = ["__version__", "load_packed"]


def load_packed(path: str | os.PathLike[str]) -> torch.nn.Module:
    """Rebuild the model of a ``ternkit export --packed`` folder (eval mode); see :func:`ternkit.export.load_packed`.

    A thin wrapper so that ``import ternkit`` stays light: torch and the model code load on first call.
    """
    from ternkit.export import load_packed as _load_packed

    return _load_packed(path)
