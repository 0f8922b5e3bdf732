"""Build, cache and load ternkit's compiled (C++/CUDA) ops, and record which path each op takes.

Every compiled op ``NAME`` lives in ``ternkit/csrc/NAME.cpp`` (schema, CPU kernel and, under
``TERNKIT_WITH_CUDA``, the CUDA registration) plus, optionally, ``ternkit/csrc/cuda/NAME.cu``
(raw-pointer launchers that ``nvcc -c`` can check without torch). :func:`load_op` compiles them
on first use with ``torch.utils.cpp_extension`` (ninja) into one shared library per op, cached
under ``$TERNKIT_CACHE_DIR`` (default ``~/.cache/ternkit/ext``) in a folder named by a hash of
the sources, the torch version and the flags, so a second process (or a test run after the
first) loads it without compiling. ``TERNKIT_NO_EXT=1`` skips the build; a failed build falls
back with one warning that names the cause. Either way every op has a pure-torch twin in
``ternkit.ops``, and ``ternkit env`` prints the table of :func:`status`.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["CompiledOp", "OpStatus", "CSRC", "OP_NAMES", "cache_dir", "load_op", "register", "serves", "status",
           "warn_fallback_once"]

#: Folder of the C++/CUDA sources.
CSRC = Path(__file__).resolve().parent.parent / "csrc"
#: Ops with a compiled version (each NAME has csrc/NAME.cpp).
OP_NAMES = ("ternary_linear", "stc_write")

_CXX_FLAGS = ["-O3", "-std=c++17"]
_NVCC_FLAGS = ["-O3", "-std=c++17"]


@dataclass(frozen=True)
class OpStatus:
    """Outcome of loading one compiled op: ``built`` True, or the reason it fell back."""

    name: str
    built: bool
    detail: str


_REGISTRY: dict[str, OpStatus] = {}
_WARNED: set[str] = set()
_LOCK = threading.Lock()
_FAKES: set[str] = set()


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


def cache_dir() -> Path:
    """Root of the extension build cache: ``$TERNKIT_CACHE_DIR`` or ``~/.cache/ternkit/ext``."""
    env = os.environ.get("TERNKIT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "ternkit" / "ext"


def _with_cuda() -> bool:
    """True when this torch can build CUDA extensions (a CUDA build of torch and a CUDA toolkit)."""
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _sources(name: str, cuda: bool) -> list[Path]:
    srcs = [CSRC / f"{name}.cpp"]
    cu = CSRC / "cuda" / f"{name}.cu"
    if cuda and cu.exists():
        srcs.append(cu)
    return srcs


def _build_key(name: str, srcs: list[Path], cuda: bool) -> str:
    """Hash of the sources (and the headers beside them), torch version and flags: a new key means a rebuild."""
    import torch

    h = hashlib.sha256()
    headers = sorted(CSRC.rglob("*.h"))
    for p in [*srcs, *headers]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(f"{torch.__version__}|{cuda}|{_CXX_FLAGS}|{_NVCC_FLAGS}".encode())
    return h.hexdigest()[:16]


def _op_defined(name: str) -> bool:
    import torch

    return hasattr(torch.ops.ternkit, name)


def load_op(name: str) -> bool:
    """Compile (once, cached) and load the library of op ``name``; True when ``torch.ops.ternkit.<name>`` is usable.

    Returns False, with the reason in :func:`status` and one warning per process, when
    ``TERNKIT_NO_EXT=1`` is set, no compiler is found, or the build fails.
    """
    with _LOCK:
        st = _REGISTRY.get(name)
        if st is not None:
            return st.built
        if os.environ.get("TERNKIT_NO_EXT", "") not in ("", "0"):
            register(name, False, "TERNKIT_NO_EXT is set")
            return False
        cuda = _with_cuda()
        srcs = _sources(name, cuda)
        if not srcs[0].exists():
            register(name, False, f"source {srcs[0]} is missing")
            warn_fallback_once(name, f"source {srcs[0]} is missing")
            return False
        key = _build_key(name, srcs, cuda)
        build_dir = cache_dir() / f"{name}_{key}"
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            _build_and_load(name, key, srcs, build_dir, cuda)
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the twin, say why once
            reason = _first_line(exc)
            register(name, False, f"build failed: {reason}")
            warn_fallback_once(name, f"build failed: {reason}; see {build_dir}")
            return False
        if not _op_defined(name):
            register(name, False, "the library loaded but defines no op of that name")
            warn_fallback_once(name, "the library defines no op of that name")
            return False
        register(name, True, ("CPU + CUDA" if cuda else "CPU") + f", cached in {build_dir}")
        return True


def _build_and_load(name: str, key: str, srcs: list[Path], build_dir: Path, cuda: bool) -> None:
    import torch
    from torch.utils import cpp_extension

    ext_name = f"ternkit_{name}_{key}"
    so = build_dir / f"{ext_name}.so"
    if so.exists() and not (build_dir / "lock").exists():
        # Built by an earlier process and no build in progress (cpp_extension holds build_dir/lock
        # while compiling): skip ninja's up-to-date check and the compiler probe.
        try:
            torch.ops.load_library(str(so))
            return
        except (OSError, RuntimeError):
            so.unlink(missing_ok=True)  # a truncated library from an interrupted build: build it again
    cflags = list(_CXX_FLAGS) + (["-DTERNKIT_WITH_CUDA"] if cuda else [])
    cpp_extension.load(
        name=ext_name,
        sources=[str(s) for s in srcs],
        extra_cflags=cflags,
        extra_cuda_cflags=list(_NVCC_FLAGS),
        extra_include_paths=[str(CSRC)],
        build_directory=str(build_dir),
        is_python_module=False,
        with_cuda=cuda,
        verbose=False,
    )


def _first_line(exc: BaseException) -> str:
    """A one-line reason from a build exception (ninja's output is long; its first error line is what matters)."""
    text = str(exc)
    lines = text.splitlines()
    # A compiler's own "file:line: error: ..." beats cpp_extension's "Error building extension" header.
    for pick in (lambda ln: "error:" in ln, lambda ln: "error" in ln.lower()):
        for line in lines:
            if pick(line):
                return line.strip()[:300]
    return (lines or [type(exc).__name__])[0][:300]


def serves(name: str, device_type: str, fake: Callable[..., Any]) -> bool:
    """True when op ``name`` is built (compiled on first call) and has a kernel for ``device_type`` ("cpu" or "cuda").

    The first time the op loads, ``fake`` is registered as its meta kernel
    (``torch.library.register_fake``), so FakeTensor tracing, torch.compile and
    ``torch.library.opcheck`` can run it. Op modules cache the answer per device type: this is
    asked once, not per call.
    """
    import torch

    if not load_op(name):
        return False
    with _LOCK:
        if name not in _FAKES:
            torch.library.register_fake(f"ternkit::{name}")(fake)
            _FAKES.add(name)
    if device_type == "cpu":
        return True
    return device_type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key(f"ternkit::{name}", "CUDA")


class CompiledOp:
    """The one dispatch point of a compiled op: whether it serves a device (asked once per device type), and its callable.

    Each op module holds one (``_OP = CompiledOp("stc_write", _fake)``) and runs its pure-torch
    twin where :meth:`available` is False. ``available`` builds the library on its first call and
    caches the answer in :attr:`cache` (device type -> bool), so a hot path can read
    ``op.cache.get("cpu")`` without a function call; :attr:`fn` is the op's overload, unwrapped
    to the builtin ``_op`` where torch has it (resolving ``torch.ops.ternkit.NAME.default`` per
    call costs about as much as a decode-sized kernel).
    """

    def __init__(self, name: str, fake: Callable[..., Any]) -> None:
        self.name = name
        self.fake = fake
        self.cache: dict[str, bool] = {}
        self.fn: Callable[..., Any] | None = None

    def available(self, device: Any = "cpu") -> bool:
        """True when the op is built (compiled on first call) and has a kernel for ``device`` (a device or its type)."""
        import torch

        kind = device if isinstance(device, str) and device in ("cpu", "cuda") else torch.device(device).type
        ok = self.cache.get(kind)
        if ok is None:
            ok = self.cache[kind] = serves(self.name, kind, self.fake)
            if ok and self.fn is None:
                overload = getattr(torch.ops.ternkit, self.name).default
                self.fn = getattr(overload, "_op", overload)
        return ok
