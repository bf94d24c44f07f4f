"""Runners: one interface (prefill, decode step, routes, ModelInfo) over the PyTorch reference, ONNX Runtime, TensorRT.

Backends are imported lazily: `open_runner(path)` picks one by the model file;
`open_runner(model, runtime="cpp")` runs an engine or a native artifact (OUT.native/) through the C++ runtime
(runtime/, C API; cpp_runtime.py).
"""
from __future__ import annotations

from pathlib import Path

from .base import Runner, StepResult

__all__ = ["Runner", "StepResult", "open_runner"]


def open_runner(model: Path | str, **options) -> Runner:
    model = Path(model)
    if options.pop("runtime", None) == "cpp":
        from .cpp_runtime import CppRuntimeRunner

        return CppRuntimeRunner(model, **options)
    if model.suffix == ".engine":
        from .tensorrt import TensorRTRunner

        return TensorRTRunner(model)
    from .onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(model, **options)
