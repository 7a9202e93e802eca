"""Run directories, manifests and atomic writes.

Every script writes inside one run directory under ``tmp/``. The manifest is written
first (status ``running``) and completed last (``ok`` or ``failed``), so a directory
whose manifest does not say ``ok`` is never mistaken for a finished result.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from lowbit.errors import UserError

__all__ = [
    "CARD_ONNX_PATH",
    "REPO_ROOT",
    "TRACKED_PACKAGES",
    "Manifest",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_records",
    "atomic_write_text",
    "check_input_file",
    "check_output_path",
    "git_commit",
    "manifest_run",
    "new_run_dir",
    "package_versions",
    "peak_rss_mb",
    "refuse_overwrite",
    "resolve_repo_path",
    "sha256_file",
    "timestamp",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
# The model card's checkpoint: a symlink the user points at their yolov10m.onnx (never committed).
CARD_ONNX_PATH = Path("models/cv-models/yolov10m/checkpoints/yolov10m.onnx")

# Packages whose versions decide results; recorded in every manifest.
TRACKED_PACKAGES = (
    "numpy",
    "onnx",
    "onnxruntime-gpu",
    "onnxruntime",
    "nvidia-modelopt",
    "torch",
    "torchvision",
    "ultralytics",
    "opencv-python-headless",
    "opencv-python",
    "pycocotools",
    "faster-coco-eval",
    "tensorrt",
)


_UMASK = os.umask(0)
os.umask(_UMASK)


def timestamp() -> str:
    """Run-id style local timestamp, e.g. ``2026-11-27_10-31-05``."""
    return _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """HEAD commit, with ``+dirty`` when tracked files differ; None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same directory, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give results the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_write_records(path: str | os.PathLike, records: list[dict]) -> None:
    """A JSON array of plain records (str/int/float/list values), one record per line.

    Used for detections: ``indent=2`` makes ``json`` fall back to its pure-Python encoder, which
    took 1.3 s for 150k detections where one ``json.dumps`` per record takes 0.7 s.
    """
    atomic_write_text(path, "[\n" + ",\n".join(map(json.dumps, records)) + ("\n]\n" if records else "]\n"))


def refuse_overwrite(path: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """Raise UserError (about ``flag``) when ``path`` exists and the user did not ask to overwrite it."""
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass {flag} to replace it", flag=flag)


def check_output_path(
    path: Path, flag: str, overwrite: bool = False, overwrite_flag: str = "--overwrite", suffix: str | None = None
) -> Path:
    """Check, before any heavy work, that a result file can be written at ``path``.

    Rejects, with a UserError about ``flag``: a name not ending in ``suffix`` (when given), a path
    that is a folder, a folder component that is a file, a nearest existing parent folder this
    process may not write to, and (about ``overwrite_flag``) an existing file without ``overwrite``.
    Nothing is created: writers make the missing folders when they write.

    Returns:
        ``path`` unchanged.
    """
    path = Path(path)
    if suffix is not None and path.suffix != suffix:
        raise UserError(f"{flag}: {path} must end in {suffix}", flag=flag)
    if path.is_dir():
        raise UserError(f"{flag}: {path} is a folder; give a file name inside it", flag=flag)
    parent = path.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{flag}: {parent} is a file, so {path} cannot be created below it", flag=flag)
    if parent.is_symlink() and not parent.exists():
        raise UserError(f"{flag}: {parent} is a symlink to {os.readlink(parent)}, which does not exist", flag=flag)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: cannot write to the folder {parent} (permission denied)", flag=flag)
    refuse_overwrite(path, overwrite, overwrite_flag)
    return path


def peak_rss_mb() -> float:
    """Peak resident set size of this process and its waited-for children, in MiB (Linux)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0


class Manifest:
    """``manifest.json`` of one run: written at start, updated with results, completed at the end.

    Keys: ``kind`` (the step that wrote it, a key of :data:`lowbit.records.MANIFEST_KINDS`: what readers
    match on), ``script`` (informational), ``argv``, ``args``, ``git_commit``, ``versions``, ``host``,
    ``inputs`` (path -> sha256), ``outputs``, ``started_at``, ``finished_at``, ``wall_s``, ``peak_rss_mb``,
    ``status`` (``running`` | ``ok`` | ``failed``), ``error``, plus free-form ``extra``. See docs/records.md.

    Raises:
        ValueError: ``kind`` is no known manifest kind (a writer's mistake, not the user's).
    """

    def __init__(self, path: Path, script: str, args: dict[str, Any], argv: list[str] | None = None, *, kind: str):
        from lowbit.records import MANIFEST_KINDS  # lowbit.records imports this module

        if kind not in MANIFEST_KINDS:
            raise ValueError(f"unknown manifest kind {kind!r}; known: {', '.join(MANIFEST_KINDS)}")
        self.path = Path(path)
        self._t0 = time.perf_counter()
        self.data: dict[str, Any] = {
            "kind": kind,
            "script": script,
            "argv": list(sys.argv if argv is None else argv),
            "args": _jsonable(args),
            "git_commit": git_commit(),
            "versions": package_versions(),
            "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "inputs": {},
            "outputs": {},
            "started_at": _dt.datetime.now().isoformat(timespec="seconds"),
            "finished_at": None,
            "wall_s": None,
            "status": "running",
            "error": None,
            "extra": {},
        }
        self.write()

    def add_input(self, path: str | os.PathLike, digest: str | None = None) -> str:
        path = Path(path)
        digest = digest or sha256_file(path)
        self.data["inputs"][str(path)] = digest
        return digest

    def add_output(self, name: str, path: str | os.PathLike) -> None:
        self.data["outputs"][name] = str(path)

    def update(self, **extra: Any) -> None:
        self.data["extra"].update(_jsonable(extra))
        self.write()

    def finish(self, status: str, error: str | None = None) -> None:
        self.data["status"] = status
        self.data["error"] = error
        self.data["finished_at"] = _dt.datetime.now().isoformat(timespec="seconds")
        self.data["wall_s"] = round(time.perf_counter() - self._t0, 3)
        self.data["peak_rss_mb"] = round(peak_rss_mb(), 1)
        self.write()

    def write(self) -> None:
        atomic_write_json(self.path, self.data)


@contextmanager
def manifest_run(
    path: Path, script: str, args: dict[str, Any], argv: list[str] | None = None, *, kind: str
) -> Iterator[Manifest]:
    """Context manager that marks the manifest (of ``kind``, see :class:`Manifest`) ``ok`` on success and
    ``failed`` on any exception."""
    manifest = Manifest(path, script, args, argv, kind=kind)
    try:
        yield manifest
    except BaseException as exc:  # also KeyboardInterrupt: an interrupted run must not look complete
        manifest.finish("failed", f"{type(exc).__name__}: {exc}")
        raise
    manifest.finish("ok")


def new_run_dir(output_root: Path, name: str | None = None, flag: str = "--output-root") -> Path:
    """Create a fresh, uniquely named run directory under ``output_root`` (the folder ``flag`` names)."""
    output_root = Path(output_root)
    base = name or timestamp()
    for i in range(1000):
        candidate = output_root / (base if i == 0 else f"{base}_{i}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"{flag}: could not create a new run directory under {output_root}", flag=flag)


def resolve_repo_path(path: str | os.PathLike) -> Path:
    """Relative paths are taken against the current directory, then the repository root."""
    path = Path(path)
    if path.is_absolute() or path.exists() or path.is_symlink():
        return path
    candidate = REPO_ROOT / path
    return candidate if (candidate.exists() or candidate.is_symlink()) else path


def check_input_file(path: Path, flag: str) -> Path:
    """Return ``path`` if it is a readable file; raise UserError naming ``flag`` otherwise.

    A dangling symlink is reported with its target, since the card's checkpoints are symlinks
    the user points at their own files.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UserError(f"{flag}: {path} is a symlink to {os.readlink(path)}, which does not exist", flag=flag)
    if not path.exists():
        raise UserError(f"{flag}: {path} does not exist", flag=flag)
    if path.is_dir():
        raise UserError(f"{flag}: {path} is a folder, not a file", flag=flag)
    if not path.is_file():
        raise UserError(f"{flag}: {path} is not a file", flag=flag)
    return path
