"""The records that steps write and read, and the checks every reader runs before it trusts one.

A record is a JSON object that names its ``kind`` (a key of :data:`SCHEMA_VERSIONS`) and its
``schema_version``, and says what it was computed from by content (sha256 of the model, the
annotation file, the evaluated image ids, the calibration tensor, the settings), never by path alone.
A run manifest (:class:`lowbit.runs.Manifest`) names its ``kind`` too: the step that wrote it (a key of
:data:`MANIFEST_KINDS`). Readers tell files apart by that ``kind``, never by the script that wrote them;
a file without one was written before files named their kind and is foreign to every reader. The kinds,
their writers, readers and fields are documented in one place, ``docs/records.md``.

Writers start a record with :func:`header`. Every reader goes through :func:`read_record` (or
:func:`read_json` for files that are not records, :func:`manifest_for` for manifests), so a missing,
truncated, non-finite or foreign file ends in one :class:`~lowbit.errors.UserError` that names the file;
provenance mismatches end in one error from :func:`require_equal`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowbit.errors import UserError

__all__ = [
    "KINDS",
    "MANIFEST_KINDS",
    "SCHEMA_VERSIONS",
    "check_record",
    "dataset_provenance",
    "find_non_finite",
    "header",
    "image_ids_sha256",
    "manifest_for",
    "quantizer_manifest_for",
    "read_json",
    "read_record",
    "require_equal",
    "require_finite",
    "settings_sha256",
    "shape_checked",
]

# Record kind -> the schema version its writer writes and its readers accept.
SCHEMA_VERSIONS: dict[str, int] = {
    "metrics": 1,  # lowbit.evaluate: <eval dir>/metrics.json
    "sensitivity": 1,  # lowbit.sensitivity_report: layer-sensitivity-report.json
    "ranking-agreement": 1,  # lowbit.sensitivity_report.compare_reports: ranking-agreement.json
    "candidate": 2,  # lowbit.candidates: <candidate stem>.inputs.json beside a search candidate
    "scheme-candidate": 1,  # lowbit.candidates: <candidate stem>.inputs.json beside a fixed-K candidate
    "search": 1,  # lowbit.search_run: search-<mode>/search.json
    "report": 1,  # lowbit.report: report.json
    "step": 1,  # lowbit.steps: <run>/.steps/<step>.json, the workflow's record of a completed step
}

# Run manifest kind (lowbit.runs.Manifest's "kind": the step that wrote it) -> its writer. A step that also
# writes a record may share the record's kind word ("search", "report", "sensitivity"): a manifest has no
# schema_version, so no manifest passes for a record.
MANIFEST_KINDS: dict[str, str] = {
    "calib": "make_yolov10m_calib_npy.py: <calib stem>.manifest.json",
    "evaluate": "lowbit.evaluate: <eval dir>/manifest.json",
    "export": "export_yolov10_raw_onnx.py: <model stem>.manifest.json",
    "inspect": "inspect_qdq_model.py: <report stem>.inspect.manifest.json",
    "materialize": "lowbit.candidates_materialize.materialize_candidates: candidates-<mode>/manifest.json",
    "parity": "check_eval_parity.py: parity.manifest.json",
    "quantize": "lowbit.quantize: <model stem>.manifest.json",
    "report": "make_lowbit_report.py: report.manifest.json",
    "schemes": "lowbit.schemes: <schemes dir>/manifest.json",
    "search": "search_yolov10m_lowbit_budget.py: search-<mode>/manifest.json",
    "sensitivity": "onnx_layer_sensitivity.py, yolov10m_layer_sensitivity.py: <run dir>/manifest.json",
    "sensitivity-compare": "compare_sensitivity_reports.py: <agreement stem>.manifest.json",
    "smoke": "run_random_onnx_inference.py: <run dir>/manifest.json",
    "stats": "onnx_model_stats.py: <stats stem>.manifest.json",
    "train": "train_demo_detector.py: <run dir>/manifest.json",
}

# Every kind word, records' and manifests'.
KINDS: tuple[str, ...] = tuple(dict.fromkeys([*SCHEMA_VERSIONS, *MANIFEST_KINDS]))


def header(kind: str) -> dict[str, Any]:
    """The first keys of a record of ``kind``: ``{"schema_version": ..., "kind": kind}``.

    Raises:
        ValueError: ``kind`` is no key of :data:`SCHEMA_VERSIONS` (a writer's mistake, not the user's).
    """
    if kind not in SCHEMA_VERSIONS:
        raise ValueError(f"unknown record kind {kind!r}; known: {', '.join(SCHEMA_VERSIONS)}")
    return {"schema_version": SCHEMA_VERSIONS[kind], "kind": kind}


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-finite number {token}")


def read_json(path: str | Path, *, flag: str | None = None, allow_non_finite: bool = False) -> Any:
    """Parse a JSON file, or raise one UserError naming it (missing, unreadable, truncated, NaN/Infinity).

    Args:
        path: the file.
        flag: the flag or env var that named the file, used as the error's ``flag`` (default: the path).
        allow_non_finite: accept ``NaN``/``Infinity`` tokens (never for results a decision is made on).
    """
    path = Path(path)
    label = f"{flag}: {path}" if flag else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{label} does not exist", flag=flag or str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{label} cannot be read: {e}", flag=flag or str(path)) from e
    try:
        if allow_non_finite:
            return json.loads(text)
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise UserError(f"{label} is not valid JSON (truncated or corrupted?): {e}", flag=flag or str(path)) from e


def read_record(path: str | Path, kind: str, *, flag: str | None = None) -> dict[str, Any]:
    """A record of ``kind`` (a key of :data:`SCHEMA_VERSIONS`): a JSON object that names that kind and its
    schema version, every number finite (:func:`read_json`, :func:`check_record`)."""
    return check_record(read_json(path, flag=flag), path, kind, flag=flag)


def check_record(record: Any, path: str | Path, kind: str, *, flag: str | None = None) -> dict[str, Any]:
    """``record`` (parsed from ``path``) when it is a JSON object with ``kind`` and that kind's schema version.

    Raises:
        UserError: naming ``path`` (``flag`` when given): not an object, no ``kind`` key (written before records
            named their kind, or no record at all), another kind, another schema version.
        ValueError: ``kind`` is no key of :data:`SCHEMA_VERSIONS`.
    """
    if kind not in SCHEMA_VERSIONS:
        raise ValueError(f"unknown record kind {kind!r}; known: {', '.join(SCHEMA_VERSIONS)}")
    label = f"{flag}: {path}" if flag else str(path)
    if not isinstance(record, dict):
        raise UserError(f"{label} is not a {kind} record (a JSON object)", flag=flag or str(path))
    if "kind" not in record:
        raise UserError(
            f"{label} names no kind: it was written before records named their kind, or it is no {kind} record; "
            "run the step that writes it again",
            flag=flag or str(path),
        )
    if record["kind"] != kind:
        raise UserError(f"{label} is a {record['kind']!r} record, not a {kind!r} record", flag=flag or str(path))
    expected = SCHEMA_VERSIONS[kind]
    if record.get("schema_version") != expected:
        got = record.get("schema_version")
        raise UserError(f"{label} has schema_version {got!r}; expected a {kind} record of version {expected}",
                        flag=flag or str(path))
    return record


def find_non_finite(value: Any, where: str = "") -> str | None:
    """The JSON path of the first NaN/inf number inside ``value`` (dicts, lists, floats), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(value)"
    if isinstance(value, dict):
        items: Iterable = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = find_non_finite(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def require_finite(path: str | Path, field: str, value: Any, *, flag: str | None = None) -> float:
    """``value`` as a finite float, or one UserError naming the file and the field."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f"{path}: {field} is {value!r}, not a finite number", flag=flag or str(path))
    return number


def require_equal(path: str | Path, field: str, got: Any, expected: Any, source: str, *, flag: str | None = None) -> None:
    """One UserError naming ``path``, the ``field`` that differs, and where ``expected`` came from."""
    if got != expected:
        raise UserError(
            f"{path}: {field} is {_short(got)}, but {source} has {_short(expected)}: the files do not belong together",
            flag=flag or str(path),
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def image_ids_sha256(image_ids: Iterable[int]) -> str:
    """sha256 of the sorted image ids, comma-separated: the content key of an evaluated image set."""
    return hashlib.sha256(",".join(str(int(i)) for i in sorted(image_ids)).encode()).hexdigest()


def settings_sha256(settings: dict[str, Any]) -> str:
    """sha256 of settings as canonical JSON (sorted keys): the content key of a step's settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def dataset_provenance(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a metrics record was scored on, by content: ``ann_sha256``, ``image_ids_sha256``, ``num_images``."""
    dataset = metrics.get("dataset") or {}
    ids = dataset.get("image_ids") or []
    return {"ann_sha256": dataset.get("ann_sha256"), "image_ids_sha256": image_ids_sha256(ids), "num_images": len(ids)}


def manifest_for(
    model_path: str | Path, kind: str, sha_key: str, model_sha256: str
) -> tuple[dict | None, str | None]:
    """The run manifest of ``kind`` beside ``model_path``, when it describes this very file.

    Args:
        model_path: the model; its manifest is ``<stem>.manifest.json`` beside it.
        kind: the manifest's ``kind`` (a key of :data:`MANIFEST_KINDS`): the step that wrote the model.
        sha_key: the key of ``extra`` holding the sha256 of the file the run wrote.
        model_sha256: sha256 of ``model_path`` as it is now.

    Returns:
        ``(manifest, None)``, or ``(None, why not)`` when there is no such manifest, it names no kind or
        another one, the run did not finish (``status`` not ``ok``), or it wrote another file than this one.
    """
    if kind not in MANIFEST_KINDS:
        raise ValueError(f"unknown manifest kind {kind!r}; known: {', '.join(MANIFEST_KINDS)}")
    path = Path(model_path).with_suffix(".manifest.json")
    if not path.is_file():
        return None, f"no manifest {path}"
    try:
        manifest = read_json(path)
    except UserError as e:
        return None, str(e)
    if not isinstance(manifest, dict):
        return None, f"{path} is no run manifest (a JSON object)"
    if "kind" not in manifest:
        return None, f"{path} names no kind (written before manifests named their kind), so it is no {kind} manifest"
    if manifest["kind"] != kind:
        return None, f"{path} is a {manifest['kind']!r} manifest, not a {kind!r} manifest"
    if manifest.get("status") != "ok":
        return None, f"{path} has status {manifest.get('status')!r}"
    if (manifest.get("extra") or {}).get(sha_key) != model_sha256:
        return None, f"{path} describes another file than {model_path} (its {sha_key} differs)"
    return manifest, None


def quantizer_manifest_for(model_path: str | Path, model_sha256: str) -> tuple[dict | None, str | None]:
    """What :mod:`lowbit.quantize` recorded about the Q/DQ model ``model_path``, by content.

    Returns:
        ``({"path", "quantize_mode", "onnx_path", "onnx_sha256"}, None)`` where ``onnx_*`` name the FP32 model
        it was quantized from, or ``(None, why not)`` as :func:`manifest_for` says.
    """
    manifest, why = manifest_for(model_path, "quantize", "output_sha256", model_sha256)
    if manifest is None:
        return None, why
    onnx_path = (manifest.get("args") or {}).get("onnx_path")
    return {
        "path": str(Path(model_path).with_suffix(".manifest.json")),
        "quantize_mode": ((manifest.get("extra") or {}).get("settings") or {}).get("quantize_mode"),
        "onnx_path": onnx_path,
        "onnx_sha256": (manifest.get("inputs") or {}).get(str(onnx_path)) if onnx_path else None,
    }, None


@contextmanager
def shape_checked(path: str | Path, flag: str | None = None) -> Iterator[None]:
    """Inside the block, a record of the wrong shape (a list where an object belongs, text where a number
    belongs, a missing key) ends in one UserError naming the file, not a traceback."""
    try:
        yield
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        raise UserError(f"{flag + ': ' if flag else ''}{path} is malformed ({type(e).__name__}: {e})",
                        flag=flag or str(path)) from e
