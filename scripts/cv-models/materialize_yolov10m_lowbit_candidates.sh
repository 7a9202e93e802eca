#!/usr/bin/env bash
# Materialize low-bit candidates K in KS from exclusion schemes (card step 4c).
#
# Env vars (mapped 1:1 to flags of materialize_yolov10m_lowbit_candidates.py, which validates them):
#   RUN_ROOT      required; writes $RUN_ROOT/onnx/<model>-<mode>-k{K}.onnx (+ manifests) and $RUN_ROOT/candidates-<mode>/
#                 (<model>: the file stem of ONNX_PATH, yolov10m for the card's checkpoint)
#   CALIB_PATH    required; calibration .npy from make_yolov10m_calib_npy.py
#   SCHEMES_DIR   default $RUN_ROOT/schemes (from make_yolov10m_candidate_schemes.py)
#   ONNX_PATH     default models/cv-models/yolov10m/checkpoints/yolov10m.onnx
#   KS            default "0 5 10 20"
#   QUANT_MODE    fp8 (default) | int8 (int4 is refused: ModelOpt's int4 leaves Conv graphs unquantized)
#   HIGH_PRECISION_DTYPE  auto (default: fp16 where onnxruntime rounds fp16 QuantizeLinear correctly, else fp32) | fp32 | fp16 | bf16
#   CALIBRATION_EPS       space-separated ORT EPs for calibration, e.g. "cuda:0 cpu" (default "cpu")
#   CALIBRATION_METHOD    entropy | max (default: max for fp8, entropy for int8)
#   INCLUDE_RANDOM=1      also build the scheme_k{K}_random*.json controls
#   FROM_FULL_MODEL       calibrated full Q/DQ model: candidates remove Q/DQ pairs from it instead of re-quantizing
#   EVAL=1        evaluate each candidate; then DATA_ROOT (default datasets/coco2017/source-data),
#                 MAX_IMAGES (100), PROVIDERS ("CPUExecutionProvider"), IMGSZ (640)
#   OVERWRITE=1   rebuild existing candidates (also needed when ONNX_PATH or CALIB_PATH changed)
#   EVAL, INCLUDE_RANDOM, OVERWRITE take 1|true|yes (on) or 0|false|no (off, the default).
#   PYTHON        interpreter (default python)
# The workflow's lowbit.pipeline_steps.MaterializeSettings declares these flags in this order; tests/test_workflow.py checks
# that this wrapper run with its env() runs its argv().
set -euo pipefail

: "${RUN_ROOT:?RUN_ROOT is required (e.g. tmp/yolov10m_lowbit/<run-id>)}"
: "${CALIB_PATH:?CALIB_PATH is required (the .npy from make_yolov10m_calib_npy.py)}"
PYTHON="${PYTHON:-python}"

args=(
  --run-root "$RUN_ROOT"
  --calib-path "$CALIB_PATH"
  --schemes-dir "${SCHEMES_DIR:-$RUN_ROOT/schemes}"
  --onnx-path "${ONNX_PATH:-models/cv-models/yolov10m/checkpoints/yolov10m.onnx}"
  --ks ${KS:-0 5 10 20}
  --quant-mode "${QUANT_MODE:-fp8}"
  --high-precision-dtype "${HIGH_PRECISION_DTYPE:-auto}"
  --data-root "${DATA_ROOT:-datasets/coco2017/source-data}"
  --max-images "${MAX_IMAGES:-100}"
  --providers ${PROVIDERS:-CPUExecutionProvider}
  --imgsz "${IMGSZ:-640}"
  --calibration-eps ${CALIBRATION_EPS:-cpu}
)
[[ -n "${CALIBRATION_METHOD:-}" ]] && args+=(--calibration-method "$CALIBRATION_METHOD")
[[ -n "${FROM_FULL_MODEL:-}" ]] && args+=(--from-full-model "$FROM_FULL_MODEL")

source "$(dirname "$0")/env_bool.sh"
bool_flag EVAL --eval
bool_flag INCLUDE_RANDOM --include-random
bool_flag OVERWRITE --overwrite

echo "+ $PYTHON scripts/cv-models/materialize_yolov10m_lowbit_candidates.py ${args[*]}" >&2
exec "$PYTHON" "$(dirname "$0")/materialize_yolov10m_lowbit_candidates.py" "${args[@]}"
