"""The one user-facing error type: bad input named by its flag, env var or file."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback.

    Args:
        message: what is wrong and how to fix it.
        flag: the flag, env var or file the error is about (``"--max-images"``, ``"CALIB_PATH"``),
            so callers and tests can tell which input failed without parsing the wording.
    """

    def __init__(self, message: str, *, flag: str | None = None):
        super().__init__(message)
        self.flag = flag
