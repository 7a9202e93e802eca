#!/usr/bin/env bash
# Materialize low-bit candidates K in KS from exclusion schemes (card step 4c).
#
# Env vars (mapped 1:1 to flags of materialize_yolov10m_lowbit_candidates.py):
#   RUN_ROOT      required; writes $RUN_ROOT/onnx/yolov10m-<mode>-k{K}.onnx (+ manifests) and $RUN_ROOT/candidates-<mode>/
#   CALIB_PATH    required; calibration .npy from make_yolov10m_calib_npy.py
#   SCHEMES_DIR   default $RUN_ROOT/schemes (from make_yolov10m_candidate_schemes.py)
#   ONNX_PATH     default models/cv-models/yolov10m/checkpoints/yolov10m.onnx
#   KS            default "0 5 10 20"
#   QUANT_MODE    fp8 (default) | int8 (int4 is refused: ModelOpt's int4 leaves Conv graphs unquantized)
#   HIGH_PRECISION_DTYPE  fp32 (default) | fp16 | bf16
#   INCLUDE_RANDOM=1      also build the scheme_k{K}_random*.json controls
#   EVAL=1        evaluate each candidate; then DATA_ROOT (default datasets/coco2017/source-data),
#                 MAX_IMAGES (100), PROVIDERS ("CPUExecutionProvider"), IMGSZ (640)
#   OVERWRITE=1   rebuild existing candidates
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
  --high-precision-dtype "${HIGH_PRECISION_DTYPE:-fp32}"
  --data-root "${DATA_ROOT:-datasets/coco2017/source-data}"
  --max-images "${MAX_IMAGES:-100}"
  --providers ${PROVIDERS:-CPUExecutionProvider}
  --imgsz "${IMGSZ:-640}"
)
[[ "${EVAL:-0}" == "1" ]] && args+=(--eval)
[[ "${INCLUDE_RANDOM:-0}" == "1" ]] && args+=(--include-random)
[[ "${OVERWRITE:-0}" == "1" ]] && args+=(--overwrite)

echo "+ $PYTHON scripts/cv-models/materialize_yolov10m_lowbit_candidates.py ${args[*]}" >&2
exec "$PYTHON" "$(dirname "$0")/materialize_yolov10m_lowbit_candidates.py" "${args[@]}"
