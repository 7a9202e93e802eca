"""GPU path: ORT's CUDA EP on the demo detector (run with ``pytest -m gpu`` on a machine with an NVIDIA GPU).

Every test here is skipped, with the reason, where ONNX Runtime's CUDA EP cannot run: no NVIDIA
driver, or an onnxruntime whose CUDA libraries do not load (the pinned onnxruntime-gpu 1.24 is a
CUDA 12 build; a CUDA 13 machine needs ``make env CUDA=13``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lowbit import ort_providers, ort_session
from lowbit.errors import UserError

REPO = Path(__file__).resolve().parent.parent
ONNX = REPO / "models/cv-models/yolov10n-demo-shapes/yolov10n-demo-shapes.onnx"
CUDA, CPU, TRT = ort_providers.CUDA, ort_providers.CPU, ort_providers.TRT
SLICE = 100  # demo val images per evaluation: enough for a stable mAP, seconds on a GPU


def _cuda_skip_reason() -> str | None:
    if not Path("/dev/nvidiactl").exists():
        return "no NVIDIA GPU on this machine (/dev/nvidiactl missing)"
    if CUDA not in ort_providers.available_providers():
        return "the installed onnxruntime has no CUDAExecutionProvider"
    probe = ort_providers.probe_provider_library(CUDA)
    if not probe.ok:
        return f"ORT's CUDA EP cannot load here (missing {', '.join(probe.missing)}); on CUDA 13 use make env CUDA=13"
    return None


_REASON = _cuda_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=f"GPU test skipped: {_REASON}")]


@pytest.fixture(scope="module")
def demo_val(tmp_path_factory, load_script) -> Path:
    root = tmp_path_factory.mktemp("gpu") / "demo-shapes"
    rc = load_script("scripts/cv-models/make_demo_dataset.py").main(
        ["--out-root", str(root), "--splits", "val", "--num-val", str(SLICE)]
    )
    assert rc == 0
    return root


@pytest.fixture(scope="module")
def calib_npy(demo_val, tmp_path_factory) -> Path:
    """32 letterboxed demo images as the calibration tensor (the same preprocessing as the evaluator)."""
    from lowbit.preprocess import preprocess

    images = sorted((demo_val / "val2017").glob("*.jpg"))[:32]
    tensor = np.stack([preprocess(path, 640)[0] for path in images]).astype(np.float32)
    path = tmp_path_factory.mktemp("calib") / "calib.npy"
    np.save(path, tensor)
    return path


def _evaluate(model: Path, data_root: Path, providers: list[str], out: Path, disable_cpu_fallback: bool = False):
    from lowbit.evaluate import EvalSettings, evaluate

    settings = EvalSettings(
        onnx_path=model, data_root=data_root, max_images=SLICE, providers=providers,
        disable_cpu_fallback=disable_cpu_fallback, warmup_runs=3, skip_latency=3, out=out,
    )
    return evaluate(settings).record


def test_cuda_session_runs_every_node_on_the_gpu():
    session, info = ort_session.build_session(ONNX, [CUDA], disable_cpu_fallback=True)
    assert info["cpu_nodes"] == [] and set(info["node_placement"]) == {CUDA}
    cpu_session, _ = ort_session.build_session(ONNX, [CPU])
    image = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    name = session.get_inputs()[0].name
    gpu_out = session.run(None, {name: image})[0]
    cpu_out = cpu_session.run(None, {name: image})[0]
    assert np.isfinite(gpu_out).all()
    # TF32/cuDNN kernels differ from the CPU's in the last bits; the raw head's logits stay within 1e-2.
    np.testing.assert_allclose(gpu_out, cpu_out, rtol=1e-2, atol=1e-2)


def test_cpu_and_cuda_evaluations_agree(demo_val, tmp_path):
    cpu = _evaluate(ONNX, demo_val, [CPU], tmp_path / "cpu" / "metrics.json")
    cuda = _evaluate(ONNX, demo_val, [CUDA], tmp_path / "cuda" / "metrics.json", disable_cpu_fallback=True)
    assert cuda["latency_ms"]["provider"] == CUDA and cpu["latency_ms"]["provider"] == CPU
    assert cuda["providers"]["cpu_nodes"] == []
    assert abs(cuda["metrics"]["map50_95"] - cpu["metrics"]["map50_95"]) <= 0.001  # 0.1 AP
    assert abs(cuda["metrics"]["map50"] - cpu["metrics"]["map50"]) <= 0.001


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_qdq_models_run_on_the_cuda_ep_alone(mode, demo_val, calib_npy, tmp_path):
    """ModelOpt calibrates on the CUDA EP; the Q/DQ model then runs with no node on the CPU, as accurate as on CPU."""
    from lowbit.quantize import QuantizeSettings, quantize_onnx

    out = tmp_path / f"demo-{mode}.onnx"
    result = quantize_onnx(
        QuantizeSettings(
            onnx_path=ONNX, calib_path=calib_npy, output_path=out, quantize_mode=mode,
            calibration_eps=["cuda:0", "cpu"],
        )
    )
    assert result.calibration_eps_used[0] == CUDA
    assert result.qdq_pairs > 50
    cuda = _evaluate(out, demo_val, [CUDA], tmp_path / "cuda" / "metrics.json", disable_cpu_fallback=True)
    cpu = _evaluate(out, demo_val, [CPU], tmp_path / "cpu" / "metrics.json")
    assert cuda["providers"]["cpu_nodes"] == [] and set(cuda["providers"]["node_placement"]) == {CUDA}
    assert cuda["metrics"]["map50_95"] > 0.4  # quantized, not collapsed (FP32 is about 0.54 on this slice)
    assert abs(cuda["metrics"]["map50_95"] - cpu["metrics"]["map50_95"]) <= 0.005  # 0.5 AP
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["status"] == "ok"


def test_missing_tensorrt_is_named_and_leaves_no_metrics(demo_val, tmp_path, load_script):
    """The card's step-1 command on a GPU machine without TensorRT: one error naming TensorRT and its library."""
    probe = ort_providers.probe_provider_library(TRT)
    if probe.ok:
        pytest.skip("TensorRT's libraries load on this machine")
    with pytest.raises(UserError) as exc:
        ort_session.build_session(ONNX, [TRT, CUDA], disable_cpu_fallback=True)
    assert exc.value.flag == "--providers"
    assert TRT in str(exc.value) and probe.missing[0] in str(exc.value)
    out = tmp_path / "baseline-coco" / "metrics.json"
    rc = load_script("scripts/cv-models/eval_yolov10m_onnx_coco.py").main(
        ["--onnx-path", str(ONNX), "--data-root", str(demo_val), "--max-images", "10",
         "--providers", TRT, CUDA, "--disable-cpu-fallback", "--out", str(out)]
    )
    assert rc == 2 and not out.exists()
