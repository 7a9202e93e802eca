"""Helpers shared by the yolov10m low-bit quantization scripts (runs, pre/post-processing, eval, ORT)."""

__version__ = "0.1.0"
