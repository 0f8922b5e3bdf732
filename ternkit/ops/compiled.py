"""Registry of compiled (C++/CUDA) ops and whether each was built or fell back to pure torch.

Every compiled op has a pure-torch twin in ``ternkit.ops``; an op module calls :func:`register`
once with the outcome of trying to load its extension, and ``ternkit env`` prints the table.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

__all__ = ["OpStatus", "register", "status", "warn_fallback_once"]


@dataclass(frozen=True)
class OpStatus:
    """Outcome of loading one compiled op: ``built`` True, or the reason it fell back."""

    name: str
    built: bool
    detail: str


_REGISTRY: dict[str, OpStatus] = {}
_WARNED: set[str] = set()


def register(name: str, built: bool, detail: str = "") -> OpStatus:
    """Record whether compiled op ``name`` is built; returns the stored status."""
    st = OpStatus(name, built, detail)
    _REGISTRY[name] = st
    return st


def status() -> list[OpStatus]:
    """All registered compiled ops, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def warn_fallback_once(name: str, reason: str) -> None:
    """Say once per process that ``name`` runs on its pure-torch twin, and why."""
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"ternkit: compiled op {name!r} unavailable ({reason}); using the pure-torch version.", stacklevel=3)
