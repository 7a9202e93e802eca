"""Random-input smoke test of an ONNX model: seeded feeds for every input and finite-value statistics per output.

What ``models/cv-models/helpers/run_random_onnx_inference.py`` feeds a session and records in ``smoke.json``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lowbit.errors import UserError

__all__ = ["non_finite_outputs", "output_stats", "random_inputs"]


def random_inputs(session, shapes: dict[str, list[int]], seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Seeded random feeds for every session input, and a description of each.

    Floats are uniform in [0, 1); integers uniform in [0, 10); bools fair coin flips.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    described = []
    for spec in session.get_inputs():
        shape = shapes[spec.name]
        ort_type = spec.type  # e.g. "tensor(float)"
        if ort_type in ("tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"):
            dtype = {"tensor(double)": np.float64, "tensor(float16)": np.float16}.get(ort_type, np.float32)
            value = rng.random(shape, dtype=np.float32).astype(dtype)
            distribution = "uniform[0,1)"
        elif ort_type == "tensor(bool)":
            value = rng.random(shape) < 0.5
            distribution = "bernoulli(0.5)"
        elif ort_type.startswith(("tensor(int", "tensor(uint")):
            dtype = np.dtype(ort_type[len("tensor(") : -1])
            value = rng.integers(0, 10, size=shape).astype(dtype)
            distribution = "integers[0,10)"
        else:
            raise UserError(
                f"--model: input {spec.name!r} has type {ort_type}, which this smoke test cannot fill", flag="--model"
            )
        feeds[spec.name] = value
        described.append({"name": spec.name, "type": ort_type, "shape": list(shape), "distribution": distribution})
    return feeds, described


def output_stats(name: str, value) -> dict[str, Any]:
    """Shape, dtype, NaN/Inf counts and min/max/mean/std over the finite elements of one output."""
    array = np.asarray(value)
    result: dict[str, Any] = {"name": name, "shape": list(array.shape), "dtype": str(array.dtype)}
    if array.dtype.kind in "fc":
        nan_count = int(np.isnan(array).sum())
        inf_count = int(np.isinf(array).sum())
        finite = array[np.isfinite(array)].astype(np.float64)
    elif array.dtype.kind in "iub":
        nan_count = inf_count = 0
        finite = array.astype(np.float64).ravel()
    else:  # strings/objects: nothing numeric to summarize
        return {**result, "min": None, "max": None, "mean": None, "std": None, "nan_count": 0, "inf_count": 0}
    empty = finite.size == 0
    result.update(
        {
            "min": None if empty else float(finite.min()),
            "max": None if empty else float(finite.max()),
            "mean": None if empty else float(finite.mean()),
            "std": None if empty else float(finite.std()),
            "nan_count": nan_count,
            "inf_count": inf_count,
        }
    )
    return result


def non_finite_outputs(stats: list[dict[str, Any]]) -> tuple[list[str], str]:
    """Names of the outputs (:func:`output_stats` dicts) that hold NaN or Inf, and one line counting them."""
    names = [s["name"] for s in stats if s["nan_count"] or s["inf_count"]]
    counts = ", ".join(f"{s['name']} ({s['nan_count']} NaN, {s['inf_count']} Inf)" for s in stats if s["name"] in names)
    return names, counts
