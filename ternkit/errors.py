"""User-facing errors: one plain sentence that names the problem and the fix, exit code 2."""

from __future__ import annotations


class TernkitError(Exception):
    """An error the user can cause and fix (bad recipe, missing file, wrong checkpoint).

    The CLI prints ``str(err)`` as one sentence and exits with code 2, without a traceback.
    """

    exit_code = 2


class RunAborted(BaseException):
    """A second Ctrl-C while a run saves its interrupt checkpoint: leave at once (a BaseException: nothing swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"aborted by signal {signum}")
        self.signum = signum
