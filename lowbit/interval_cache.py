"""Paired ΔAP intervals kept by the content they were computed from, so that the search and the report compute
each interval once.

The budget search computes the paired interval of every probe it judges (its standard error decides the
probe); the report shows the same intervals. Both look one up here first by :func:`interval_key`, the sha256
of everything the interval is a function of:

- the sha256 of both ``detections.json`` files, as the caller hashed them from the files;
- the mAP50-95 both ``metrics.json`` record (a hit means the detections gave it back when the entry was made);
- the evaluated image ids, in order, and the annotation file's sha256;
- the bootstrap's replicates, seed and confidence;
- :data:`ARITHMETIC`, the version of :mod:`lowbit.ap_bootstrap`'s arithmetic, and faster-coco-eval's version.

An entry is ``<run dir>/intervals/<key>.json``: the :class:`lowbit.ap_bootstrap.PairedDelta` and the parts of
its key. An entry that cannot be read, or whose parts are not the key's, is computed again and rewritten.
``tests/test_interval_cache.py`` checks that a hit equals the interval computed afresh, and that changing any
one input misses.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from lowbit.ap_bootstrap import PairedDelta
from lowbit.logs import get_logger
from lowbit.runs import atomic_write_json

__all__ = ["ARITHMETIC", "DIRNAME", "IntervalCache", "interval_key"]

log = get_logger("interval_cache")

ARITHMETIC = 1  # bump when lowbit.ap_bootstrap's matching or replicate arithmetic changes
DIRNAME = "intervals"  # the cache folder inside a run dir


def _library_version() -> str:
    from importlib.metadata import version

    return version("faster-coco-eval")


def interval_key(
    variant_detections_sha256: str,
    variant_map50_95: float,
    reference_detections_sha256: str,
    reference_map50_95: float,
    image_ids: list[int],
    ann_sha256: str,
    n_boot: int,
    seed: int,
    confidence: float,
) -> tuple[str, dict[str, Any]]:
    """``(key, parts)``: the sha256 naming one paired interval, and what it was taken over.

    The detections digests must be the callers' own hashes of the files they read (as
    :func:`lowbit.search_confirm.checked_detections` and the report's matcher check them), not a record's claim.
    """
    parts = {
        "variant_detections_sha256": variant_detections_sha256,
        "variant_map50_95": float(variant_map50_95),
        "reference_detections_sha256": reference_detections_sha256,
        "reference_map50_95": float(reference_map50_95),
        "image_ids_sha256": hashlib.sha256(json.dumps([int(i) for i in image_ids]).encode()).hexdigest(),
        "ann_sha256": ann_sha256,
        "n_boot": int(n_boot),
        "seed": int(seed),
        "confidence": float(confidence),
        "arithmetic": ARITHMETIC,
        "faster_coco_eval": _library_version(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


class IntervalCache:
    """The interval entries of one run dir (``root`` None: nothing is kept, every interval is computed)."""

    def __init__(self, root: Path | None):
        self.folder = None if root is None else Path(root) / DIRNAME
        self.hits = self.misses = 0

    def get(self, key: str, parts: dict[str, Any]) -> PairedDelta | None:
        """The entry of ``key`` when it was made from ``parts``; else None."""
        if self.folder is None:
            return None
        path = self.folder / f"{key}.json"
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if entry["parts"] != parts:
                raise ValueError("made from other inputs")
            value = PairedDelta(**{f.name: entry["interval"][f.name] for f in fields(PairedDelta)})
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("interval entry %s unusable (%s); computing it again", path, e)
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, parts: dict[str, Any], value: PairedDelta) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.folder / f"{key}.json", {"parts": parts, "interval": asdict(value)})
