"""Command-line plumbing shared by every script: the entry-point decorator."""

from __future__ import annotations

import functools
import sys

from lowbit.runs import UserError


def cli_entry(main_fn):
    """Decorate a script's ``main(argv=None) -> int``: a UserError becomes one line on stderr, exit 2.

    Tests call the decorated ``main([...])`` and read the return code, exactly as the shell does.
    """

    @functools.wraps(main_fn)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return int(main_fn(argv) or 0)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper
