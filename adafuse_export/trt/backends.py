"""Which TensorRT is installed, imported lazily.

  tensorrt       full TensorRT (data-centre GPUs): builds the `plugin` ONNX flavour with the
                 adafuse plugin library (fused adapter kernels inside the engine)
  tensorrt-rtx   TensorRT for RTX: builds plugin-free `portable` graphs, on the CPU too; its
                 engines run on compute capability 8.0, 8.6, 8.9 and 12.x
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..errors import AdafuseError

BACKENDS = ("tensorrt", "tensorrt-rtx")
MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
FLAVOURS = {"tensorrt": "plugin", "tensorrt-rtx": "portable"}
INSTALL = {
    "tensorrt": "full TensorRT 10 (pip install tensorrt, from NVIDIA's package index) plus the adafuse plugin "
                "library (cmake -S plugins -B build/plugins && cmake --build build/plugins)",
    "tensorrt-rtx": "pip install 'adafuse-export[rtx]' (tensorrt-rtx)",
}


@dataclass
class Backend:
    name: str
    trt: Any  # the imported module (no type stubs)
    version: str

    @property
    def flavour(self) -> str:
        return FLAVOURS[self.name]


def _try_import(name: str):
    try:
        mod = importlib.import_module(MODULES[name])
    except ImportError:
        return None
    # PyPI's `tensorrt` without the vendor libraries imports but has no Builder.
    return mod if hasattr(mod, "Builder") else None


def select_backend(requested: str = "auto") -> Backend:
    if requested not in ("auto",) + BACKENDS:
        raise AdafuseError(f"--backend '{requested}' is unknown (expected auto, {', '.join(BACKENDS)})")
    names = BACKENDS if requested == "auto" else (requested,)
    for name in names:
        mod = _try_import(name)
        if mod is not None:
            return Backend(name, mod, getattr(mod, "__version__", "unknown"))
    wanted = " or ".join(f"{n}: {INSTALL[n]}" for n in names)
    raise AdafuseError(f"no TensorRT found for --backend {requested}; install {wanted}")
