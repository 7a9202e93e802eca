"""Calibration inputs: the image-list file and the calibration tensor (``.npy``), read and checked once.

Every script that takes a calibration list or tensor goes through here, so a bad file gives the
same clear ``UserError(flag=...)`` wherever it is passed.

Image-list format: one image path per line, UTF-8 text. Blank lines are skipped. ``#`` starts a
comment when it begins the line (after optional whitespace) or follows whitespace, so
``img#3.jpg`` is a file name while ``a.jpg  # note`` is ``a.jpg``. ``~`` is expanded. A relative
entry resolves against the repository root first (lists are committed with repo-relative paths),
then against the list's own folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.errors import UserError
from lowbit.runs import REPO_ROOT, check_input_file

__all__ = ["ListEntry", "load_calib_tensor", "parse_image_list", "read_image_list"]

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
# A comment: '#' at the start of the line or after whitespace, up to the end of the line.
_COMMENT = re.compile(r"(^|\s)#.*$")
# Finite-value check in slices, so a large tensor never needs a full-size boolean copy.
_FINITE_CHUNK = 16


@dataclass(frozen=True)
class ListEntry:
    """One image of a list file.

    Attributes:
        line_no: 1-based line number in the list file.
        text: the entry as written (comment and surrounding whitespace removed).
        path: the resolved path (see the module docstring for the rule).
        candidates: every path the entry was looked for at, in order (one for absolute entries).
    """

    line_no: int
    text: str
    path: Path
    candidates: tuple[Path, ...]


def _resolve_entry(text: str, list_dir: Path) -> tuple[Path, tuple[Path, ...]]:
    path = Path(text).expanduser()
    if path.is_absolute():
        return path, (path,)
    candidates = (REPO_ROOT / path, list_dir / path)
    found = next((c for c in candidates if c.exists()), candidates[-1])
    return found, candidates


def _list_text(list_path: Path, flag: str) -> str:
    data = list_path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:  # NUL decodes as UTF-8 but never appears in a text list
        raise UserError(
            f"{flag}: {list_path} is not a text file (an image list has one image path per line)", flag=flag
        )
    return text


def parse_image_list(list_path: Path, flag: str = "--list") -> list[ListEntry]:
    """Entries of an image list, in file order; existence is checked by ``read_image_list``.

    Raises:
        UserError(flag): the list is missing, binary, or names one image on several lines.
    """
    check_input_file(list_path, flag)
    entries: list[ListEntry] = []
    for line_no, raw in enumerate(_list_text(list_path, flag).splitlines(), start=1):
        text = _COMMENT.sub("", raw).strip()
        if text:
            path, candidates = _resolve_entry(text, list_path.parent)
            entries.append(ListEntry(line_no, text, path, candidates))
    lines_of: dict[Path, list[int]] = {}
    for entry in entries:
        lines_of.setdefault(entry.path.resolve(), []).append(entry.line_no)
    repeated = [(path, lines) for path, lines in lines_of.items() if len(lines) > 1]
    if repeated:
        shown = "; ".join(f"{path} on lines {', '.join(map(str, lines))}" for path, lines in repeated[:5])
        more = f" (and {len(repeated) - 5} more)" if len(repeated) > 5 else ""
        raise UserError(f"{flag}: {list_path} lists the same image more than once: {shown}{more}", flag=flag)
    return entries


def _entry_problem(entry: ListEntry) -> str | None:
    if entry.path.is_dir():
        return f"line {entry.line_no}: {entry.text} is a folder ({entry.path})"
    if entry.path.is_file():
        return None
    where = " or ".join(str(c) for c in entry.candidates)
    return f"line {entry.line_no}: {entry.text} not found (looked for {where})"


def read_image_list(list_path: Path, flag: str = "--list", max_images: int | None = None) -> list[ListEntry]:
    """The first ``max_images`` (default all) entries of an image list, each an existing file.

    Raises:
        UserError(flag): missing or binary list, repeated entries, no entries, or entries that
            are folders or missing -- all bad entries named in one message, with where each was
            looked for.
    """
    entries = parse_image_list(list_path, flag)
    if not entries:
        raise UserError(f"{flag}: {list_path} lists no images", flag=flag)
    if max_images is not None:
        entries = entries[:max_images]
    problems = [p for p in map(_entry_problem, entries) if p]
    if problems:
        raise UserError(
            f"{flag}: {len(problems)} listed image(s) of {list_path} cannot be used: {'; '.join(problems)}", flag=flag
        )
    return entries


def _open_npy(path: Path, flag: str) -> np.ndarray:
    """Memory-map ``path``; any file that is not a plain, complete .npy array is a UserError."""
    check_input_file(path, flag)
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if not head:
        raise UserError(f"{flag}: {path} is empty (0 bytes)", flag=flag)
    if head.startswith(_ZIP_MAGIC):
        raise UserError(f"{flag}: {path} is an .npz archive; give the float32 [N,3,H,W] .npy array itself", flag=flag)
    if head != _NPY_MAGIC:
        raise UserError(f"{flag}: {path} is not a .npy file", flag=flag)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{flag}: {path} is a damaged or truncated .npy ({exc})", flag=flag) from exc


def _first_non_finite(data: np.ndarray) -> tuple[int, int] | None:
    """``(image index, count of non-finite values in that image)`` of the first bad image, or None."""
    for start in range(0, data.shape[0], _FINITE_CHUNK):
        bad = ~np.isfinite(data[start : start + _FINITE_CHUNK])
        if bad.any():
            per_image = bad.reshape(bad.shape[0], -1).sum(axis=1)
            first = int(np.flatnonzero(per_image)[0])
            return start + first, int(per_image[first])
    return None


def load_calib_tensor(path: Path, flag: str, imgsz: int | None = None, max_images: int | None = None) -> np.ndarray:
    """Load and check a calibration tensor (float32 ``[N, 3, H, W]`` RGB in [0, 1] from make_yolov10m_calib_npy.py).

    Args:
        path: the ``.npy`` file.
        flag: the flag or env var that named it, carried by every error.
        imgsz: when given, H and W must both equal it.
        max_images: keep only the first N images (N >= 1); fewer present is not an error.

    Returns:
        A C-contiguous float32 array ``[min(N, max_images), 3, H, W]`` in memory.

    Raises:
        UserError(flag): missing, empty, ``.npz``, corrupt or truncated file; another dtype, rank
            or channel count; H/W other than ``imgsz``; no images; NaN or Inf anywhere in the
            images used (ModelOpt would either publish a broken model or fail deep inside).
    """
    data = _open_npy(Path(path), flag)
    if data.dtype != np.float32 or data.ndim != 4 or data.shape[1] != 3:
        raise UserError(f"{flag}: {path} holds {data.dtype} {list(data.shape)}; expected float32 [N,3,H,W]", flag=flag)
    if imgsz is not None and data.shape[2:] != (imgsz, imgsz):
        raise UserError(
            f"{flag}: {path} holds {data.shape[2]}x{data.shape[3]} images; the model needs {imgsz}x{imgsz}",
            flag=flag,
        )
    if data.shape[0] < 1:
        raise UserError(f"{flag}: {path} holds no images (N = 0)", flag=flag)
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        data = data[:max_images]
    bad = _first_non_finite(data)
    if bad is not None:
        index, count = bad
        raise UserError(
            f"{flag}: {path} has non-finite values (NaN/Inf): image {index} has {count}; rebuild the tensor",
            flag=flag,
        )
    return np.ascontiguousarray(data)
