"""Running a pipeline's steps: what each reads and writes, by content, and commands that can be stopped.

A :class:`Step` declares its command, the files and folders it reads and writes, and (``cites``) JSON
records whose named models and metrics count as read or written too. :func:`dependencies` orders the
steps by what they read; :func:`run_steps` runs what is not complete, up to ``jobs`` at a time, each step
once every step writing what it reads has finished.

A step is complete when its record (``<run>/.steps/<step>.json``, written only after it succeeded) matches
the content of its inputs and outputs now: every check hashes them again, :func:`path_digest` keeping that
cheap by remembering each file's sha256 while its size, mtime and inode stay the same (one hash per file per
process). A folder is digested by its content: the sorted relative paths of its files and each file's
sha256. So a truncated or deleted output reruns its step, and the steps reading it once its content changed.

:class:`StepProcesses` runs each command from the repository root in a process group of its own, with
stdout in the step's log and stderr both on the console and in the log (so a failed step's log holds its
``error:`` line). SIGINT/SIGTERM during :func:`run_steps` end every running command's whole process group
(SIGTERM, then SIGKILL after a grace period), keep no record for them, and raise :class:`Stopped`: the
commands run in sessions of their own, so a terminal's Ctrl-C reaches only the scheduler, which forwards it.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lowbit import records
from lowbit.errors import UserError
from lowbit.runs import REPO_ROOT, atomic_write_json, sha256_file

__all__ = [
    "Step",
    "StepFailed",
    "StepProcesses",
    "Stopped",
    "cited_files",
    "dependencies",
    "end_groups",
    "folder_digest",
    "inside",
    "is_complete",
    "path_digest",
    "run_steps",
    "stop_signals",
]

STOP_GRACE_S = 10.0  # seconds a stopped command's process group gets to exit after SIGTERM, before SIGKILL
_READ_CHUNK = 1 << 16
CITING_KEYS = ("model_path", "metrics_path", "model", "metrics")  # search.json rows; candidates summary.json rows

# (path, size, mtime_ns, inode) -> sha256: a rewritten file (new size, mtime or inode) is hashed again.
_digests: dict[tuple[str, int, int, int], str] = {}


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _digests:
        _digests[key] = sha256_file(path)
    return _digests[key]


def folder_digest(folder: Path) -> str | None:
    """sha256 of a folder's content (its files' sorted relative paths and sha256s), or None when it holds no file."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{_file_digest(path)}\n".encode())
    return digest.hexdigest()


def path_digest(path: Path) -> str | None:
    """sha256 of a file, :func:`folder_digest` of a folder, None when it is missing or an empty folder."""
    path = Path(path)
    if path.is_file():
        return _file_digest(path)
    if path.is_dir():
        return folder_digest(path)
    return None


# ----------------------------------------------------------------------------------------------------------------------
# steps: what they read and write


@dataclass
class Step:
    """One command of a pipeline: what it runs, what it reads, what it must leave behind.

    ``cites`` names JSON files among its inputs or outputs (a ``search.json``, a candidates ``summary.json``)
    whose cited models and metrics files count as inputs or outputs too; they are known only once the
    file is written, so they are read each time the step is checked.
    """

    name: str
    argv: list[str]
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)
    family: str = ""  # a name shared by several steps (e.g. sensitivity-int8, sensitivity-fp8) for --force
    reuse_existing: bool = False  # complete whenever its outputs exist (generated data, not run results)
    cites: list[Path] = field(default_factory=list)
    # the typed settings the step was made from, when any (lowbit.pipeline_steps: argv, wrapper env, inputs, outputs)
    settings: object | None = field(default=None, compare=False, repr=False)

    def reads(self) -> list[Path]:
        """Every input: the declared files and folders, then the files its cited inputs name."""
        return list(dict.fromkeys([*self.inputs, *cited_files(p for p in self.cites if p in self.inputs)]))

    def writes(self) -> list[Path]:
        """Every output: the declared files and folders, then the files its cited outputs name."""
        return list(dict.fromkeys([*self.outputs, *cited_files(p for p in self.cites if p in self.outputs)]))

    def fingerprint(self) -> dict:
        return {"argv": self.argv, "inputs": {str(p): path_digest(p) for p in self.reads()}}


def cited_files(records: Iterable[Path]) -> list[Path]:
    """The models and metrics files that ``search.json`` / ``summary.json`` records name (keys ``model_path``,
    ``metrics_path``, ``model``, ``metrics`` at any depth); relative paths are relative to the repository root,
    where the steps run. A missing or unreadable record names nothing (its own digest covers it)."""
    found: list[str] = []

    def walk(value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in CITING_KEYS and isinstance(item, str):
                    found.append(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for record in records:
        try:
            walk(json.loads(Path(record).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return list(dict.fromkeys(p if p.is_absolute() else REPO_ROOT / p for p in map(Path, found)))


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def inside(path: Path, outputs: list[Path]) -> bool:
    """``path`` is one of ``outputs`` or lies in a folder among them."""
    path = _absolute(path)
    return any(path == out or out in path.parents for out in map(_absolute, outputs))


# ----------------------------------------------------------------------------------------------------------------------
# commands in process groups


def _group_alive(pgid: int) -> bool:
    """Some process of the group is still running (zombies, which only wait for a reaper, do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal still exists
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses, so split after the last ')'
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process exited while we looked
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def end_groups(pgids: list[int], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every process group, wait up to ``grace_s`` for them to go, SIGKILL what is left."""
    for pgid in pgids:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(map(_group_alive, pgids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pgid in pgids:
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)


def _tee(source, log, console) -> None:
    """Copy ``source`` (a pipe, bytes) to ``log`` (bytes) and ``console`` (text) as it arrives, until EOF.

    Chunks rather than lines, so progress bars redrawn with ``\\r`` still show while they run."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while chunk := os.read(source.fileno(), _READ_CHUNK):
        log.write(chunk)
        log.flush()
        try:
            console.write(decoder.decode(chunk))
            console.flush()
        except (OSError, ValueError):  # a closed console must not stop the log
            pass


class StepProcesses:
    """The commands running now, each in its own process group, so that a stop ends all of them."""

    def __init__(self, grace_s: float = STOP_GRACE_S):
        self.grace_s = grace_s
        self.stopping = False
        self._lock = threading.Lock()
        self._running: dict[str, subprocess.Popen] = {}

    def run(self, name: str, argv: list[str], log_file: Path, cwd: Path, env: dict[str, str]) -> int | None:
        """Run ``argv`` to its end with stdout appended to ``log_file`` and stderr teed to the console and the log.

        Returns the exit status, or None when :meth:`stop` came first (before the start, or during the run).
        A process the command left behind in its group is ended once the command exits.
        """
        with open(log_file, "ab", buffering=0) as log:
            with self._lock:
                if self.stopping:
                    return None
                proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
                self._running[name] = proc
            reader = threading.Thread(target=_tee, args=(proc.stderr, log, sys.stderr), daemon=True)
            reader.start()
            try:
                code = proc.wait()
            finally:
                # a leftover child would hold the stderr pipe open (and outlive the step)
                if _group_alive(proc.pid):
                    end_groups([proc.pid], self.grace_s)
                reader.join()
                proc.stderr.close()
                with self._lock:
                    self._running.pop(name, None)
        return None if self.stopping else code

    def stop(self) -> list[str]:
        """Start no more commands; end the running ones' process groups. Returns their names."""
        with self._lock:
            self.stopping = True
            running = dict(self._running)
        end_groups([proc.pid for proc in running.values()], self.grace_s)
        return sorted(running)


# Signals that stop a run. SIGHUP too: a closed terminal must not leave steps running in their own sessions
# after the scheduler (and its run-folder lock) is gone.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


@contextmanager
def stop_signals() -> Iterator[dict[str, int]]:
    """While the block runs, the :data:`STOP_SIGNALS` set ``state["signal"]`` instead of ending the process.

    Outside the main thread (where handlers cannot be installed) the state is never set.
    """
    state: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, _frame):
        state.setdefault("signal", signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield state
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------------------------------
# the scheduler


def _record_path(run: Path, step: Step) -> Path:
    return run / ".steps" / f"{step.name}.json"


def _output_digests(step: Step) -> dict[str, str] | None:
    """sha256 of every output, a folder by the content of its files; None when one is missing (or an empty folder)."""
    digests = {}
    for out in step.writes():
        digest = path_digest(out)
        if digest is None:
            return None
        digests[str(out)] = digest
    return digests


def is_complete(run: Path, step: Step) -> bool:
    """Recorded with the same inputs, and every output still there with the content recorded."""
    if step.reuse_existing:
        return all(p.exists() for p in step.outputs)
    try:
        record = records.check_record(json.loads(_record_path(run, step).read_text()), _record_path(run, step), "step")
    except (OSError, ValueError, UserError):  # missing, unreadable or foreign: the step runs again
        return False
    if any(not p.exists() for p in step.reads()):
        return False
    return record.get("fingerprint") == step.fingerprint() and record.get("outputs") == _output_digests(step)


def run_step(run: Path, step: Step, log_dir: Path, processes: StepProcesses) -> float:
    """Run one step's command; its record is written only after it succeeded with all outputs.

    Raises:
        StepFailed: a non-zero exit or a missing output.
        StepStopped: the run was stopped before or while the step ran.
    """
    record = _record_path(run, step)
    record.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_file = log_dir / f"{step.name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(f"$ {' '.join(step.argv)}\n", encoding="utf-8")
    t0 = time.perf_counter()
    code = processes.run(step.name, step.argv, log_file, REPO_ROOT, env)
    elapsed = time.perf_counter() - t0
    if code is None:
        with open(log_file, "a", encoding="utf-8") as log:
            log.write("stopped: the workflow was interrupted\n")
        raise StepStopped(step.name)
    if code != 0:
        raise StepFailed(step.name, code, log_file)
    digests = _output_digests(step)
    if digests is None:
        raise StepFailed(step.name, 0, log_file, "finished without writing " + ", ".join(map(str, step.outputs)))
    fingerprint = step.fingerprint()
    atomic_write_json(
        record,
        {
            **records.header("step"),
            "step": step.name,
            "fingerprint": fingerprint,
            "outputs": digests,
            "wall_s": round(elapsed, 2),
            "log": str(log_file),
        },
    )
    return elapsed


class StepFailed(Exception):
    def __init__(self, name: str, code: int, log_file: Path, reason: str | None = None):
        super().__init__(f"step {name} failed ({reason or f'exit status {code}'}); its log: {log_file}")
        self.step = name
        self.code = code


class StepStopped(Exception):
    """The run was stopped: the step did not run, or its process group was ended."""


class Stopped(Exception):
    """SIGINT or SIGTERM ended the run; ``steps`` were running and have been ended."""

    def __init__(self, signum: int, steps: list[str]):
        name = signal.Signals(signum).name
        ended = f"ended {', '.join(steps)} (no record kept)" if steps else "no step was running"
        super().__init__(f"stopped by {name}: {ended}; rerun the same command to resume")
        self.signum = signum


def dependencies(steps: list[Step]) -> list[set[int]]:
    """For each step, the earlier steps it waits for: those whose outputs (a file, or a folder holding it) it reads."""
    return [
        {j for j in range(i) if any(inside(p, steps[j].outputs) for p in step.inputs)} for i, step in enumerate(steps)
    ]


def _skippable(run: Path, step: Step, forced: set[str]) -> bool:
    """Complete with unchanged inputs, and not named by ``--force`` (by its name or its family)."""
    return not (step.name in forced or step.family in forced) and is_complete(run, step)


def run_steps(run: Path, steps: list[Step], forced: set[str], dry_run: bool, logger, jobs: int = 1) -> int:
    """Run what is not complete (or forced), up to ``jobs`` steps at a time, each once every step it reads from has
    finished (with ``jobs=1``, in plan order); 1 after the first failed step (running steps are let finish), else 0.

    Raises:
        Stopped: SIGINT or SIGTERM arrived; the running steps' process groups were ended first.
    """
    tags = [f"[{i}/{len(steps)}] {step.name:<18}" for i, step in enumerate(steps, 1)]
    if dry_run:
        for step, tag in zip(steps, tags):
            if _skippable(run, step, forced):
                logger.info("%s skipped: complete, inputs unchanged", tag)
            else:
                logger.info("%s would run: %s", tag, " ".join(step.argv))
        return 0
    processes = StepProcesses()
    with stop_signals() as stop, ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            return _schedule(run, steps, forced, logger, jobs, tags, pool, processes, stop)
        except BaseException:
            processes.stop()  # never leave a step running behind the workflow
            raise


def _schedule(
    run: Path,
    steps: list[Step],
    forced: set[str],
    logger,
    jobs: int,
    tags: list[str],
    pool: ThreadPoolExecutor,
    processes: StepProcesses,
    stop: dict[str, int],
) -> int:
    """The scheduling loop of :func:`run_steps`; checks for a stop signal at least every 0.2 s."""
    deps, done, running, failed = dependencies(steps), set(), {}, False
    while True:
        for i, step in enumerate(steps):
            if failed or stop or len(running) >= jobs:
                break
            if i in done or i in running.values() or not deps[i] <= done:
                continue
            if _skippable(run, step, forced):
                logger.info("%s skipped: complete, inputs unchanged", tags[i])
                done.add(i)
            else:
                logger.info("%s running", tags[i])
                running[pool.submit(run_step, run, step, run / "logs", processes)] = i
        if stop:
            raise Stopped(stop["signal"], processes.stop())
        if not running:
            return 1 if failed else 0
        finished, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
        for future in finished:
            i = running.pop(future)
            try:
                logger.info("%s done in %.1f s", tags[i], future.result())
                done.add(i)
            except StepFailed as exc:
                logger.error("%s FAILED: %s", tags[i], exc)
                failed = True
            except StepStopped:
                pass
