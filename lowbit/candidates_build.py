"""Building one candidate model: a mode's Q/DQ model with some nodes left in float, written to one ONNX file.

Two ways, the ``build`` of a candidate (``lowbit.candidates`` and ``lowbit.candidates_materialize`` record which):

* ``full``: :func:`build_from_full_model` removes the Q/DQ pairs of the nodes from the calibrated full Q/DQ
  model (:func:`lowbit.qdq_edit.remove_qdq_for_nodes`). Nothing is recalibrated: the scales are those of the
  full model, which ModelOpt computed on the float model, so they are the scales a re-quantization would
  compute again. Seconds per candidate.
* ``requantize``: :func:`build_requantized` quantizes the FP32 model again with ModelOpt, the nodes in
  ``nodes_to_exclude`` (:func:`lowbit.quantize.quantize_onnx`); a full calibration per candidate. Where
  ModelOpt's placement rules move a Q/DQ pair because of an exclusion (e.g. in front of an Add whose
  consumers all became float), the two graphs differ; :func:`lowbit.candidates_compare.compare_builds`
  measures by how much.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BUILDS", "RequantizeConfig", "build_from_full_model", "build_requantized"]

BUILDS = ("full", "requantize")


@dataclass
class RequantizeConfig:
    """What ``requantize`` builds need: the FP32 model, calibration tensor and quantizer settings."""

    onnx_path: Path
    calib_path: Path
    calibration_method: str | None = None
    calibration_eps: list[str] = field(default_factory=lambda: ["cpu"])
    high_precision_dtype: str = "auto"

    def quantize_settings(self, mode: str, output_path: Path, **exclusions):
        """The :class:`lowbit.quantize.QuantizeSettings` of one candidate written to ``output_path``.

        Args:
            exclusions: ``nodes_to_exclude=[...]`` or ``exclude_json=<scheme file>``.
        """
        from lowbit.quantize import QuantizeSettings

        return QuantizeSettings(
            onnx_path=self.onnx_path,
            calib_path=self.calib_path,
            output_path=output_path,
            quantize_mode=mode,
            calibration_method=self.calibration_method,
            calibration_eps=list(self.calibration_eps),
            high_precision_dtype=self.high_precision_dtype,
            overwrite=True,
            **exclusions,
        )


def build_from_full_model(full_qdq, nodes: list[str], out_path: Path, flag: str = "--ranking") -> Path:
    """Write ``full_qdq`` (a loaded ``ModelProto``) with ``nodes`` in float to ``out_path`` (atomically).

    Raises:
        UserError(flag): a node that ``full_qdq`` does not quantize.
    """
    import onnx

    from lowbit.qdq_edit import remove_qdq_for_nodes

    edited = remove_qdq_for_nodes(full_qdq, nodes, flag=flag)
    tmp = out_path.with_name(out_path.name + ".tmp")
    onnx.save(edited, str(tmp))
    tmp.replace(out_path)
    return out_path


def build_requantized(cfg: RequantizeConfig, mode: str, nodes: list[str], out_path: Path) -> Path:
    """Quantize ``cfg.onnx_path`` again with ModelOpt, ``nodes`` in ``nodes_to_exclude``."""
    from lowbit.quantize import quantize_onnx

    return quantize_onnx(cfg.quantize_settings(mode, out_path, nodes_to_exclude=list(nodes))).output_path
