"""User-facing errors: one plain sentence that names the problem and the fix, exit code 2."""

from __future__ import annotations

import errno
from pathlib import Path


class TernkitError(Exception):
    """An error the user can cause and fix (bad recipe, missing file, wrong checkpoint).

    The CLI prints ``str(err)`` as one sentence and exits with code 2, without a traceback.
    """

    exit_code = 2


#: errno values that mean the disk (or the user's quota) is full; EDQUOT is missing on some platforms.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)})


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is an ``OSError`` saying the disk or quota is full (ENOSPC, EDQUOT, EFBIG)."""
    return isinstance(err, OSError) and err.errno in _DISK_FULL


class RunAborted(BaseException):
    """A second Ctrl-C while a run saves its interrupt checkpoint: leave at once (a BaseException: nothing swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"aborted by signal {signum}")
        self.signum = signum


def read_utf8(path: Path, name: str, unreadable_fix: str, not_utf8_fix: str) -> str:
    """The UTF-8 text of ``path``; a :class:`TernkitError` naming it as ``name`` when it cannot be read or is not UTF-8.

    The sentence gives the OS reason, or the first bad byte (offset, value, line), then the fix.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TernkitError(f"cannot read {name} ({exc.strerror or type(exc).__name__}); {unreadable_fix}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TernkitError(f"{name} is not UTF-8 text (byte {exc.start}, 0x{data[exc.start]:02x}, on line {line}); "
                           f"{not_utf8_fix}") from None
