"""Run ModelOpt's ONNX quantizer on a private work copy of the model: the copy, the calibration EPs ModelOpt
really gets, its full log captured, and its histogram calibration spread over threads.

:func:`run_modelopt` is the one place ``modelopt.onnx.quantization.quantize`` is called;
:func:`lowbit.quantize.quantize_onnx` validates the inputs before it and checks the result after it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lowbit.logs import log_to_file

if TYPE_CHECKING:  # annotations only: lowbit.quantize imports this module
    from lowbit.quantize import QuantizeSettings

__all__ = [
    "HISTOGRAM_THREADS",
    "calibration_eps_used",
    "make_work_copy",
    "run_modelopt",
    "tensor_parallel_histograms",
]

# Threads that build the entropy/percentile calibration histograms, each over a share of the tensors.
HISTOGRAM_THREADS = min(8, os.cpu_count() or 1)


def calibration_eps_used(onnx_path: Path, eps: list[str]) -> list[str]:
    """The ORT providers a ModelOpt calibration session really gets for ``eps``.

    ModelOpt drops EPs whose libraries are missing, and ORT itself silently drops a CUDA EP that
    fails to initialise (no GPU); both happen inside ``quantize``. Building a session with
    ModelOpt's own factory and reading ``get_providers()`` reports what calibration ran on.
    """
    from modelopt.onnx.quantization.ort_utils import create_inference_session

    return list(create_inference_session(str(onnx_path), list(eps)).get_providers())


def make_work_copy(onnx_path: Path, model, work_dir: Path) -> Path:
    """Copy the model (and its external data) into ``work_dir``, a fresh folder.

    ModelOpt writes intermediate files next to its input model, and measured with 0.47 it also
    rewrites the input file itself (through a symlink too): it only ever sees this private copy.
    """
    from lowbit.onnx_stats import external_data_files

    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    work_input = work_dir / onnx_path.name
    shutil.copyfile(onnx_path, work_input)
    for location in external_data_files(model):
        shutil.copyfile(onnx_path.parent / location, work_dir / location)
    return work_input


@contextmanager
def tensor_parallel_histograms(threads: int) -> Iterator[None]:
    """Let ONNX Runtime's ``HistogramCollector.collect`` work on disjoint shares of the tensors in threads.

    ModelOpt's histogram calibration (entropy, percentile) calls ``collect({tensor: outputs})`` once
    per calibration batch, and the collector builds each tensor's histogram with one serial
    ``np.histogram`` after another: on the demo detector that is 187 tensors x 100 images, most of
    an INT8 quantization's time once inference runs on a GPU. Each tensor's histogram depends
    only on its own data and state (``histogram_dict[tensor]``), and NumPy releases the GIL inside
    its array loops, so shares of the tensors run in threads and the histograms (hence the scales)
    are the ones the serial loop makes. ModelOpt's own ``collect`` (per-node calibration replaces
    it) is left alone, and the original method is restored on exit.
    """
    from concurrent.futures import ThreadPoolExecutor

    from onnxruntime.quantization.calibrate import HistogramCollector

    serial = HistogramCollector.collect
    if threads <= 1:
        yield
        return

    def collect(self, name_to_arr):
        # what the serial collect dispatches to; it also prints one line per batch, which is dropped
        if self.method not in ("entropy", "distribution", "percentile"):
            return serial(self, name_to_arr)  # its own error for an unknown method
        build = self.collect_absolute_value if self.method == "percentile" and self.symmetric else self.collect_value
        names = list(name_to_arr)
        shares = [names[i::threads] for i in range(threads)]
        jobs = [pool.submit(build, {n: name_to_arr[n] for n in share}) for share in shares if share]
        for job in jobs:
            job.result()  # re-raises a collector error here
        return None

    with ThreadPoolExecutor(threads, thread_name_prefix="histogram") as pool:
        HistogramCollector.collect = collect
        try:
            yield
        finally:
            if HistogramCollector.collect is collect:
                HistogramCollector.collect = serial


def run_modelopt(
    settings: QuantizeSettings,
    calib: np.ndarray,
    calibration_method: str,
    nodes_to_exclude: list[str],
    work_input: Path,
    work_output: Path,
    log_file: Path,
) -> float:
    """Run ModelOpt's ``quantize`` on the work copy; returns its wall time in seconds.

    Args:
        settings: the run's settings (mode, EPs, high precision dtype, passes, op types ...).
        calib: the calibration tensor, float32 ``[N, 3, H, W]``.
        calibration_method: ``entropy`` | ``max`` (the default resolved).
        nodes_to_exclude: ModelOpt's patterns (``lowbit.quantize.exact_patterns``).
        work_input: the private copy (:func:`make_work_copy`).
        work_output: where ModelOpt writes the Q/DQ model.
        log_file: ModelOpt's full log, written afresh.

    Raises:
        RuntimeError: ModelOpt finished without writing ``work_output``.
    """
    from modelopt.onnx.quantization import quantize  # heavy: imported only when quantizing

    # ModelOpt re-configures its logger (dropping a log_file handler) part-way through, but its records always
    # propagate to the root logger: capture the full log there
    with log_to_file(log_file, logging.getLogger(), mode="w"), tensor_parallel_histograms(HISTOGRAM_THREADS):
        t0 = time.perf_counter()
        quantize(
            onnx_path=str(work_input),
            quantize_mode=settings.quantize_mode,
            calibration_data=calib,
            calibration_method=calibration_method,
            calibration_eps=list(settings.calibration_eps),
            nodes_to_exclude=nodes_to_exclude,
            high_precision_dtype=settings.high_precision_dtype,
            use_zero_point=settings.use_zero_point,
            passes=list(settings.passes),
            op_types_to_quantize=settings.op_types_to_quantize,
            op_types_to_exclude=settings.op_types_to_exclude,
            calibrate_per_node=settings.calibrate_per_node,
            output_path=str(work_output),
            log_level="INFO",
        )
        seconds = time.perf_counter() - t0
    if not work_output.exists():
        raise RuntimeError(f"ModelOpt finished without writing {work_output}; see {log_file}")
    return seconds
