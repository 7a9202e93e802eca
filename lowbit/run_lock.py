"""One writer per run folder: an exclusive ``filelock`` lock that names its holder.

The workflow, the budget search, the candidate materializer and the report each hold
``<run folder>/.lock`` while they write there. A second writer fails at once with one error naming
the holder (pid, host, command, start time, read from ``.lock.owner.json``). A step started by the
workflow inherits the workflow's hold through :data:`HELD_ENV` (the folder it holds), so the
workflow's own children do not wait on their parent.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from lowbit.errors import UserError

__all__ = ["HELD_ENV", "hold_run_folder"]

# Set by a holder for the processes it starts: the resolved folders it holds, os.pathsep-separated.
HELD_ENV = "LOWBIT_RUN_LOCK_HELD"


def _held_by_parent(folder: Path) -> bool:
    held = os.environ.get(HELD_ENV, "")
    return str(folder) in held.split(os.pathsep) if held else False


def _holder(owner_file: Path) -> str:
    try:
        owner = json.loads(owner_file.read_text())
        return f"pid {owner['pid']} on {owner['host']} since {owner['started_at']}: {' '.join(owner['argv'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its owner file is unreadable)"


@contextmanager
def hold_run_folder(folder: str | os.PathLike, flag: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the block, or raise UserError (about ``flag``) naming the holder.

    Creates ``folder`` if needed. The lock is released when the block ends or the process dies (an
    OS file lock), so a killed run never blocks the next one.
    """
    folder = Path(folder).resolve()
    if _held_by_parent(folder):
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / ".lock", timeout=0)
    owner_file = folder / ".lock.owner.json"
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"{flag}: {folder} is being written by {_holder(owner_file)}; wait for it to finish or stop it",
            flag=flag,
        ) from None
    previous = os.environ.get(HELD_ENV)
    try:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "argv": sys.argv,
            "started_at": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        owner_file.write_text(json.dumps(owner) + "\n")
        os.environ[HELD_ENV] = os.pathsep.join(filter(None, [previous, str(folder)]))
        yield
    finally:
        if previous is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = previous
        owner_file.unlink(missing_ok=True)
        lock.release()
