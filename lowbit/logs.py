"""One logging setup for every script: console (INFO) plus a log file inside the run dir (DEBUG), and
``log_to_file`` for a log file that only lasts while one stage runs (a quantization's or an evaluation's)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOGGER_NAME", "get_logger", "log_to_file", "setup_logging"]

LOGGER_NAME = "lowbit"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")


def setup_logging(log_file: Path | None = None, verbose: bool = False) -> logging.Logger:
    """Configure the package logger; call once per script run. Re-calling replaces the handlers."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(file_handler)
    logger.propagate = False
    return logger


@contextmanager
def log_to_file(log_file: Path, logger: logging.Logger | None = None, mode: str = "a") -> Iterator[None]:
    """Also write ``logger``'s records (default: this package's logger) at DEBUG and above to ``log_file``
    while the block runs. A named logger's level is lowered to DEBUG for the block and restored after; the root
    logger's is left alone (lowering it would turn on every library's debug records).

    Args:
        log_file: the file, created or appended to (``mode="w"`` starts it afresh).
        logger: e.g. ``logging.getLogger()`` to capture a library that replaces its own handlers but
            propagates to the root logger (ModelOpt does).
        mode: ``"a"`` or ``"w"``.
    """
    logger = logger if logger is not None else logging.getLogger(LOGGER_NAME)
    handler = logging.FileHandler(log_file, mode=mode, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT))
    level = logger.level
    if logger is not logging.getLogger() and (level == logging.NOTSET or level > logging.DEBUG):
        logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)
