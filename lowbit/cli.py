"""Command-line plumbing shared by every script: the parser factory, argparse value types and the entry-point
decorator.

Argparse types
--------------
Pass these as ``type=`` to ``add_argument``. Each raises ``argparse.ArgumentTypeError``, so
argparse itself prints ``error: argument --flag: <reason>`` and exits with status 2 -- the flag is
always named, and no range check is needed after ``parse_args``:

==================  ==========================================================================
``positive_int``     an integer >= 1 (counts: ``--max-images``, ``--workers``, ``--runs``)
``non_negative_int`` an integer >= 0 (seeds, ``--warmup-runs``, ``--eval-max-images``)
``int_range(a, b)``  a factory: an integer in ``a..b`` inclusive (``int_range(1, 999_999)``)
``imgsz``            a positive multiple of 32, the YOLO stride (``--imgsz``)
``positive_float``   a finite float > 0 (``--budget-ap``)
``unit_interval``    a finite float in [0, 1] (IoU and confidence thresholds, fractions)
``existing_file``    a path to an existing file; a dangling symlink is named with its target
==================  ==========================================================================

For values that do not come through argparse (env vars, settings objects), ``check_imgsz`` raises
``UserError(flag=...)`` with the same rule as the ``imgsz`` type.
"""

from __future__ import annotations

import argparse
import errno
import functools
import math
import os
import sys
from pathlib import Path

from lowbit.errors import UserError

__all__ = [
    "IMGSZ_STRIDE",
    "add_coco_paths",
    "check_imgsz",
    "cli_entry",
    "existing_file",
    "imgsz",
    "imgsz_problem",
    "int_range",
    "make_parser",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "unit_interval",
]

# YOLO's largest stride: the letterboxed side must be a multiple of it.
IMGSZ_STRIDE = 32

# errnos that mean "this path given by the user cannot be used", not "the program is wrong".
_USER_PATH_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENOENT,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _parse_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _parse_int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def int_range(low: int, high: int):
    """Type factory: an integer in ``low..high`` inclusive."""

    def parse(text: str) -> int:
        value = _parse_int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value

    parse.__name__ = f"int in {low}..{high}"  # argparse shows the name in "invalid <name> value"
    return parse


def imgsz_problem(value: int) -> str | None:
    """Why ``value`` is no valid model input side, or None when it is one."""
    if value < IMGSZ_STRIDE or value % IMGSZ_STRIDE:
        return f"must be a positive multiple of {IMGSZ_STRIDE} (the model stride), got {value}"
    return None


def imgsz(text: str) -> int:
    """A square model input side: a positive multiple of 32."""
    value = _parse_int(text)
    problem = imgsz_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def check_imgsz(value: int, flag: str = "--imgsz") -> int:
    """``imgsz``'s rule for values that do not come through argparse; raises UserError(flag=flag)."""
    problem = imgsz_problem(int(value))
    if problem:
        raise UserError(f"{flag} {problem}", flag=flag)
    return int(value)


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = _parse_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def unit_interval(text: str) -> float:
    """A finite float in [0, 1]."""
    value = _parse_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def existing_file(text: str) -> Path:
    """A path to an existing file (a symlink must resolve)."""
    path = Path(text)
    if path.is_symlink() and not path.exists():
        raise argparse.ArgumentTypeError(f"{path} is a symlink to {os.readlink(path)}, which does not exist")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist")
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"{path} is a folder, not a file" if path.is_dir() else f"{path} is not a file"
        )
    return path


class _DefaultsAndRawDescription(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in ``--help`` and the description's own line breaks (examples stay readable)."""


def make_parser(doc: str | None, *, epilog: str | None = None, raw: bool = False) -> argparse.ArgumentParser:
    """The parser every script starts from: its description is the first paragraph of ``doc`` (the script's
    module docstring), no prefix abbreviation of flags, defaults shown in ``--help``.

    Args:
        doc: the script's ``__doc__``; its first paragraph becomes the description.
        epilog: text after the flags in ``--help``.
        raw: keep the description's line breaks (for multi-line descriptions with examples).
    """
    description = (doc or "").strip().split("\n\n")[0] if not raw else doc
    formatter = _DefaultsAndRawDescription if raw else argparse.ArgumentDefaultsHelpFormatter
    return argparse.ArgumentParser(
        description=description, epilog=epilog, allow_abbrev=False, formatter_class=formatter
    )


def add_coco_paths(parser: argparse.ArgumentParser) -> None:
    """``--data-root``, ``--images-dir`` and ``--ann-file``: a COCO-layout dataset, as every script reading one names it
    (``lowbit.evaluate.resolve_data_paths`` turns them into the image folder and the annotation file)."""
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path("datasets/coco2017/source-data"),
        help="COCO root holding val2017/ and annotations/instances_val2017.json",
    )
    parser.add_argument("--images-dir", type=Path, default=None, help="image folder; None means DATA_ROOT/val2017")
    parser.add_argument(
        "--ann-file",
        type=Path,
        default=None,
        help="instances json; None means DATA_ROOT/annotations/instances_val2017.json",
    )


def _user_path_error(exc: OSError) -> str | None:
    """One line for an OSError about a path, or None when it does not look like one."""
    if exc.filename is None or exc.errno not in _USER_PATH_ERRNOS:
        return None
    where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    return f"{where}: {exc.strerror or os.strerror(exc.errno)}"


def cli_entry(main_fn):
    """Decorate a script's ``main(argv=None) -> int``; errors about the user's input become one line.

    - ``UserError``: ``error: <message>`` on stderr, return 2.
    - ``OSError`` that names a file and has a path errno (permission denied, read-only file
      system, not a directory, is a directory, no space, ...): ``error: <file>: <reason>``,
      return 2. An OSError without a filename, or with another errno, is re-raised with its
      traceback, since it points at a bug rather than at a path the user gave.

    - ``SystemExit`` (argparse's usage errors, exit 2 after ``error: argument --flag: ...``; and
      ``--help``, exit 0): its code is returned, so ``main([...])`` never raises for bad flags.

    Tests call the decorated ``main([...])`` and read the return code, exactly as the shell does.
    """

    @functools.wraps(main_fn)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return int(main_fn(argv) or 0)
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                return exc.code or 0
            print(exc.code, file=sys.stderr)  # sys.exit("message") convention
            return 1
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            line = _user_path_error(exc)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            return 2

    return wrapper
