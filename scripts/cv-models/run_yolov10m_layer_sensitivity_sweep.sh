#!/usr/bin/env bash
# Torch per-layer sensitivity sweep of a YOLOv10 (card step 4a). With no env vars it analyses the
# models/yolo10/yolov10m.pt when linked (else the shipped demo detector) in FP8 on 32 images of the calibration list.
#
# Env vars (mapped 1:1 to flags of yolov10m_layer_sensitivity.py, which validates them; unset = its default):
#   WEIGHTS      --weights      .pt checkpoint or .yaml architecture
#   IMAGES       --images       image list (default datasets/quantize-calib/demo_shapes_calib100.txt)
#   CALIB_NPY    --calib-npy    calibration tensor .npy instead of IMAGES
#   NUM_IMAGES   --num-images   (default 32)
#   IMGSZ        --imgsz        (default 640)
#   BATCH_SIZE   --batch-size   (default 8)
#   DEVICE       --device       auto | cpu | cuda | cuda:N (default auto)
#   FORMATS      --formats      space-separated: fp8-fp8 int8-int8 (default fp8-fp8)
#   METRIC       --metric       det_kl | rel_mse (default det_kl)
#   OUTPUT_ROOT  --output-root  (default tmp/yolov10m_layer_sensitivity)
#   RUN_ID       --run-id       (default: a timestamp)
#   OVERWRITE=1  --overwrite (1|true|yes on, 0|false|no off)
#   VERBOSE=1    --verbose (1|true|yes on, 0|false|no off)
#   PYTHON       interpreter (default python)
# Writes $OUTPUT_ROOT/<run-id>/outputs/<model>/<format>/per_layer/layer-sensitivity-report.json (+ .csv, .md),
# <model> being the weights' file stem (yolov10m for models/yolo10/yolov10m.pt).
# The workflow's lowbit.pipeline_steps.TorchSweepSettings declares these flags in this order; tests/test_workflow.py checks
# that this wrapper run with its env() runs its argv().
set -euo pipefail

PYTHON="${PYTHON:-python}"

args=()
[[ -n "${WEIGHTS:-}" ]] && args+=(--weights "$WEIGHTS")
[[ -n "${IMAGES:-}" ]] && args+=(--images "$IMAGES")
[[ -n "${CALIB_NPY:-}" ]] && args+=(--calib-npy "$CALIB_NPY")
[[ -n "${NUM_IMAGES:-}" ]] && args+=(--num-images "$NUM_IMAGES")
[[ -n "${IMGSZ:-}" ]] && args+=(--imgsz "$IMGSZ")
[[ -n "${BATCH_SIZE:-}" ]] && args+=(--batch-size "$BATCH_SIZE")
[[ -n "${DEVICE:-}" ]] && args+=(--device "$DEVICE")
[[ -n "${FORMATS:-}" ]] && args+=(--formats ${FORMATS//,/ })
[[ -n "${METRIC:-}" ]] && args+=(--metric "$METRIC")
[[ -n "${OUTPUT_ROOT:-}" ]] && args+=(--output-root "$OUTPUT_ROOT")
[[ -n "${RUN_ID:-}" ]] && args+=(--run-id "$RUN_ID")

source "$(dirname "$0")/env_bool.sh"
bool_flag OVERWRITE --overwrite
bool_flag VERBOSE --verbose

echo "+ $PYTHON scripts/cv-models/yolov10m_layer_sensitivity.py ${args[*]}" >&2
exec "$PYTHON" "$(dirname "$0")/yolov10m_layer_sensitivity.py" "${args[@]}"
