"""Runners: one interface (prefill, decode step, routes) over the PyTorch reference, ONNX Runtime, later TensorRT.

Backends are imported lazily: `open_runner(path)` picks one by the model file.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import AdafuseError
from .base import Runner, StepResult

__all__ = ["Runner", "StepResult", "open_runner"]


def open_runner(model: Path | str, **options) -> Runner:
    model = Path(model)
    if model.suffix == ".engine":
        raise AdafuseError(f"{model}: TensorRT runner not available yet (it needs the 'tensorrt' Python package and the "
                           f"adafuse plugin library); validate the ONNX export instead")
    from .onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(model, **options)
