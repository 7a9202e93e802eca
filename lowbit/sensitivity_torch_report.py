"""Where the torch sweep's report goes and what it says: the report folder, the ranked rows, the method text.

Report (``layer-sensitivity-report.json`` + ``.csv`` + ``.md``)
--------------------------------------------------------------
The format shared with the ONNX-native sensitivity tool, written by ``lowbit.sensitivity_report``
(docs/records.md): ``schema_version``, ``kind`` ("sensitivity"), ``source`` ("torch"), ``model``,
``model_sha256``, ``precision``, ``quant_format``, ``method`` (``name``, ``description``, ``score``,
``higher_is_more_sensitive``), ``data`` (``images``, ``source``, ``imgsz``), ``device``, ``wall_s``,
``layers`` (``rank``, ``name``, ``op_type``, ``weight``, ``onnx_node``, ``score``; rank 1 = most sensitive).
Added here: ``reference`` with the drift when every layer is quantized (``all_layers_quantized``) and
when none is (``no_layer_quantized``, expected 0: it shows the quantized-but-disabled model reproduces
FP32). ``onnx_node`` is null: the exporter's node names depend on how containers are called
(``model.10.ffn.0`` becomes ``/model.10/ffn/ffn.0/conv/Conv``), so the weight name is the link to the graph.

The folder is ``<run>/outputs/<model>/<format>/per_layer/`` (:func:`report_dir`, the model card's layout).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lowbit import sensitivity_report
from lowbit.drift import METRICS
from lowbit.sensitivity_torch_inputs import QUANT_FORMATS, SweepInputs

if TYPE_CHECKING:
    from lowbit.sensitivity_torch import QuantLayer

__all__ = [
    "METHOD_NAME",
    "OUTPUT_MODEL_DIR",
    "format_report",
    "method_description",
    "output_model_dir",
    "report_dir",
    "report_layers",
]

# The card's layout: <run>/outputs/<model>/<format>/per_layer/, <model> being the weights' stem
# (output_model_dir); this is its value for the card's models/yolo10/yolov10m.pt.
OUTPUT_MODEL_DIR = "yolov10m"
METHOD_NAME = "one_layer_at_a_time"


def report_layers(layers: list[QuantLayer], per_layer: dict[str, dict[str, float]], score_name: str) -> list[dict]:
    """The report's ``layers``: sorted by score, highest first (ties keep module order); rank 1 = most sensitive."""
    return sensitivity_report.rank_layers(
        [
            {
                "name": layer.name,
                "op_type": layer.op_type,
                "weight": layer.weight,
                "onnx_node": None,
                "score": per_layer[layer.name][score_name],
            }
            for layer in layers
        ]
    )


def method_description(metric: str, quant_format: str) -> str:
    precision, config = QUANT_FORMATS[quant_format]
    what = {
        "det_kl": (
            "detection-aware drift of the raw one-to-one head output from FP32, in nats per image: "
            "Bernoulli KL of every class probability (sigmoid of the class logits) summed over anchors "
            "and classes, plus the KL of each box side's DFL bin distribution weighted by the anchor's "
            "FP32 confidence"
        ),
        "rel_mse": (
            "relative MSE of the raw one-to-one head output against FP32, "
            "sum ||q - fp||^2 / sum ||fp||^2 over all images and output elements"
        ),
    }[metric]
    return (
        f"ModelOpt torch {precision.upper()} simulation (mtq.{config}, max calibration on the same images) "
        "of the Conv+BN-fused model with the raw one-to-one head. All quantizers off, then each layer's own "
        f"weight and input quantizers on, one layer at a time; the score is the {what}. "
        "Higher means quantizing that layer alone hurts the output more."
    )


def output_model_dir(weights: Path) -> str:
    """The ``<model>`` folder of a sweep's outputs: the stem of ``weights`` as given (a symlink keeps its own name).

    ``models/yolo10/yolov10m.pt`` and ``yolov10m.yaml`` give ``yolov10m`` (:data:`OUTPUT_MODEL_DIR`, the card's
    layout); the demo detector gives ``yolov10n-demo-shapes``, so no run is filed under a model it did not analyse.
    """
    return Path(weights).stem


def report_dir(run_dir: Path, quant_format: str, weights: Path) -> Path:
    """``<run_dir>/outputs/<output_model_dir(weights)>/<quant_format>/per_layer`` (the model card's layout)."""
    return Path(run_dir) / "outputs" / output_model_dir(weights) / quant_format / "per_layer"


def format_report(inputs: SweepInputs, quant_format: str, num_images: int, rows: list[dict], swept: dict) -> dict:
    """The report of one format (``wall_s`` is left to the caller, which knows the shared setup time)."""
    score_name = METRICS[inputs.metric]
    return sensitivity_report.make_report(
        source="torch",
        model=inputs.weights,
        model_sha256=inputs.weights_sha256,
        precision=QUANT_FORMATS[quant_format][0],
        method={
            "name": METHOD_NAME,
            "description": method_description(inputs.metric, quant_format),
            "score": score_name,
            "higher_is_more_sensitive": True,
        },
        data={"images": num_images, "source": inputs.data_source, "imgsz": inputs.imgsz},
        device=inputs.device,
        wall_s=None,
        layers=rows,
        extra={
            "reference": {
                "all_layers_quantized": swept["all_layers_quantized"][score_name],
                "no_layer_quantized": swept["no_layer_quantized"][score_name],
            }
        },
    )
