#!/usr/bin/env bash
# ModelOpt INT8 Q/DQ quantization of the yolov10m ONNX checkpoint (card step 3).
#
# Env vars (mapped 1:1 to flags of quantize_yolov10m_onnx.py, which validates them):
#   RUN_ROOT              required; writes $RUN_ROOT/onnx/yolov10m-int8-qdq.onnx (+ .manifest.json, .modelopt.log, .log)
#   CALIB_PATH            required; float32 [N,3,640,640] .npy from make_yolov10m_calib_npy.py
#   ONNX_PATH             default models/cv-models/yolov10m/checkpoints/yolov10m.onnx
#   CALIBRATION_METHOD    entropy (default) | max
#   CALIBRATION_EPS       space-separated ORT EPs for calibration, e.g. "cuda:0 cpu" (default "cpu")
#   USE_ZERO_POINT        boolean (default false); only affects int4 in ModelOpt 0.47, recorded either way
#   HIGH_PRECISION_DTYPE  auto (default: fp16 where onnxruntime rounds fp16 QuantizeLinear correctly, else fp32; see the card) | fp32 | fp16 | bf16
#   NODES_TO_EXCLUDE      space- or comma-separated exact ONNX node names to keep unquantized
#   EXCLUDE_JSON          a scheme JSON with 'nodes_to_exclude' (from make_yolov10m_candidate_schemes.py)
#   OP_TYPES_TO_QUANTIZE  space-separated ONNX op types to quantize (default: ModelOpt's choice)
#   OP_TYPES_TO_EXCLUDE   space-separated ONNX op types never to quantize
#   PASSES                ModelOpt passes (default concat_elimination); "none" disables them
#   QUANTIZE_MODE         int8 (default) | fp8; the output name follows it: yolov10m-<mode>-qdq.onnx
#   OUTPUT_NAME           override the output file name
#   OVERWRITE             boolean (default false): replace an existing output
# Booleans accept 1/true/yes and 0/false/no (any case); anything else is an error naming the variable.
# The workflow's lowbit.pipeline_steps.QuantizeSettings declares these flags in this order; tests/test_workflow.py checks
# that this wrapper run with its env() runs its argv().
set -euo pipefail

source "$(dirname "$0")/env_bool.sh"
use_zero_point="$(env_bool USE_ZERO_POINT)" || exit 2
overwrite="$(env_bool OVERWRITE)" || exit 2

: "${RUN_ROOT:?RUN_ROOT is required (e.g. tmp/yolov10m_lowbit/<run-id>)}"
: "${CALIB_PATH:?CALIB_PATH is required (the .npy from make_yolov10m_calib_npy.py)}"
ONNX_PATH="${ONNX_PATH:-models/cv-models/yolov10m/checkpoints/yolov10m.onnx}"
QUANTIZE_MODE="${QUANTIZE_MODE:-int8}"
OUTPUT_NAME="${OUTPUT_NAME:-yolov10m-${QUANTIZE_MODE}-qdq.onnx}"
PYTHON="${PYTHON:-python}"

args=(
  --onnx-path "$ONNX_PATH"
  --calib-path "$CALIB_PATH"
  --output-path "$RUN_ROOT/onnx/$OUTPUT_NAME"
  --quantize-mode "$QUANTIZE_MODE"
  --calibration-eps ${CALIBRATION_EPS:-cpu}
  --high-precision-dtype "${HIGH_PRECISION_DTYPE:-auto}"
)
[[ -n "${CALIBRATION_METHOD:-}" ]] && args+=(--calibration-method "$CALIBRATION_METHOD")
if [[ "$use_zero_point" == 1 ]]; then args+=(--use-zero-point); else args+=(--no-use-zero-point); fi
[[ -n "${NODES_TO_EXCLUDE:-}" ]] && args+=(--nodes-to-exclude ${NODES_TO_EXCLUDE//,/ })
[[ -n "${EXCLUDE_JSON:-}" ]] && args+=(--exclude-json "$EXCLUDE_JSON")
[[ -n "${OP_TYPES_TO_QUANTIZE:-}" ]] && args+=(--op-types-to-quantize ${OP_TYPES_TO_QUANTIZE//,/ })
[[ -n "${OP_TYPES_TO_EXCLUDE:-}" ]] && args+=(--op-types-to-exclude ${OP_TYPES_TO_EXCLUDE//,/ })
if [[ "${PASSES:-concat_elimination}" == "none" ]]; then args+=(--passes); else args+=(--passes ${PASSES:-concat_elimination}); fi
if [[ "$overwrite" == 1 ]]; then args+=(--overwrite); fi

echo "+ $PYTHON scripts/cv-models/quantize_yolov10m_onnx.py ${args[*]}" >&2
exec "$PYTHON" "$(dirname "$0")/quantize_yolov10m_onnx.py" "${args[@]}"
