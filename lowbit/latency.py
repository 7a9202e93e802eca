"""Latency statistics of timed ``session.run`` calls: the one summary every script reports.

Keys of the returned dict (milliseconds unless stated): ``n`` (samples kept), ``warmup_runs``
(untimed runs before the samples), ``skipped`` (first timed samples dropped), ``mean``, ``median``
(= ``p50``), ``p90``, ``p95``, ``p99``, ``min``, ``max``, ``std``; the statistics are None when
no sample is left. Percentiles are numpy's linear interpolation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["STAT_KEYS", "latency_stats"]

STAT_KEYS = ("mean", "median", "p50", "p90", "p95", "p99", "min", "max", "std")


def latency_stats(samples_s: Sequence[float], skip: int = 0, warmup_runs: int = 0) -> dict:
    """Summarise timed runs in milliseconds, after dropping the first ``skip`` samples.

    Args:
        samples_s: wall time of each timed run, seconds, in run order.
        skip: first samples to drop (caches still warming up); more than there are leaves none.
        warmup_runs: untimed runs made before the samples; recorded, not used.

    Returns:
        ``{"n", "warmup_runs", "skipped", "mean", "median", "p50", "p90", "p95", "p99", "min",
        "max", "std"}``, values rounded to 4 decimals (1e-4 ms).
    """
    skip = max(int(skip), 0)
    kept = np.asarray(list(samples_s)[skip:], dtype=np.float64) * 1000.0
    stats: dict = {"n": int(kept.size), "warmup_runs": int(warmup_runs), "skipped": min(skip, len(samples_s))}
    if kept.size == 0:
        return {**stats, **{key: None for key in STAT_KEYS}}
    p50, p90, p95, p99 = np.percentile(kept, [50, 90, 95, 99])
    values = {
        "mean": kept.mean(),
        "median": p50,
        "p50": p50,
        "p90": p90,
        "p95": p95,
        "p99": p99,
        "min": kept.min(),
        "max": kept.max(),
        "std": kept.std(),
    }
    return {**stats, **{key: round(float(value), 4) for key, value in values.items()}}
