"""The TensorRT backends: one description each, in one registry; the module is imported lazily.

  tensorrt       full TensorRT (data-centre GPUs): builds the `plugin` ONNX flavour with the
                 adafuse plugin library (fused adapter kernels inside the engine)
  tensorrt-rtx   TensorRT for RTX: builds plugin-free `portable` graphs, on the CPU too; its
                 engines run on compute capability 8.0, 8.6, 8.9 and 12.x

Like Polygraphy's backends, nothing is imported until a backend is used: the registry itself
(names, flavours, install hints) is plain data, so `--help` and the manifest reader need no
TensorRT. The build (trt/build.py), the manifest (trt/manifest.py), `convert` and the engine
runner (runners/tensorrt.py) ask the backend's description instead of comparing names.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..errors import AdafuseError


@dataclass(frozen=True)
class BackendKind:
    """What one backend is, builds and runs on."""

    name: str  # --backend value and the engine manifest's engine.backend
    title: str  # in messages
    module: str  # the Python module imported (lazily) to use it
    flavour: str  # the ONNX flavour it builds (onnx.builder.FLAVOURS)
    plugin_library: str | None  # the plugin library its engines load (manifest plugin.library); None: plugin-free
    strongly_typed: bool  # networks keep the ONNX graph's dtypes (weights exported in fp16/bf16) instead of its choice
    timing_cache: bool  # whether its builder has a timing cache (--timing-cache)
    capabilities: tuple[str, ...] | None  # compute capabilities its engines run on ("12.x": any minor); None: the GPU built on
    install: str

    @property
    def gpus(self) -> str:
        """The GPUs its engines run on, in words."""
        if self.capabilities is None:
            return "the GPU architecture it was built on"
        return f"compute capability {', '.join(self.capabilities)}"

    @property
    def runs_on(self) -> str:
        """The engine manifest's engine.runs_on."""
        return f"{self.gpus} ({self.title})"

    def runs_on_capability(self, major: int, minor: int) -> bool:
        return self.capabilities is None or f"{major}.{minor}" in self.capabilities or f"{major}.x" in self.capabilities


# In `--backend auto` preference order: full TensorRT (fused kernels in the engine) first.
KINDS: dict[str, BackendKind] = {k.name: k for k in (
    BackendKind("tensorrt", "TensorRT", "tensorrt", "plugin", "libadafuse_trt_plugins.so", strongly_typed=True,
                timing_cache=True, capabilities=None,
                install="full TensorRT 10 (pip install tensorrt, from NVIDIA's package index) plus the adafuse plugin "
                        "library (installed with this tool; from a checkout: cmake --preset release && cmake --build --preset release)"),
    BackendKind("tensorrt-rtx", "TensorRT-RTX", "tensorrt_rtx", "portable", None, strongly_typed=False,
                timing_cache=False, capabilities=("8.0", "8.6", "8.9", "12.x"),
                install="pip install 'adafuse-export[rtx]' (tensorrt-rtx)"),
)}


def names() -> tuple[str, ...]:
    return tuple(KINDS)


def kind(name: str) -> BackendKind:
    if name not in KINDS:
        raise AdafuseError(f"--backend '{name}' is unknown (expected auto, {', '.join(KINDS)})")
    return KINDS[name]


@dataclass
class Backend:
    """An imported backend."""

    name: str
    trt: Any  # the imported module (no type stubs)
    version: str

    @property
    def kind(self) -> BackendKind:
        return KINDS[self.name]

    @property
    def flavour(self) -> str:
        return self.kind.flavour


def _try_import(name: str):
    try:
        mod = importlib.import_module(KINDS[name].module)
    except ImportError:
        return None
    # PyPI's `tensorrt` without the vendor libraries imports but has no Builder.
    return mod if hasattr(mod, "Builder") else None


def select_backend(requested: str = "auto") -> Backend:
    """The requested backend, imported; auto: the first installed, in KINDS order."""
    wanted = names() if requested == "auto" else (kind(requested).name,)
    for name in wanted:
        mod = _try_import(name)
        if mod is not None:
            return Backend(name, mod, getattr(mod, "__version__", "unknown"))
    hints = " or ".join(f"{n}: {KINDS[n].install}" for n in wanted)
    raise AdafuseError(f"no TensorRT found for --backend {requested}; install {hints}")


def builders_for(major: int, minor: int) -> tuple[str, ...]:
    """The backends whose engines run on a GPU of this compute capability."""
    return tuple(k.name for k in KINDS.values() if k.runs_on_capability(major, minor))


def install_hint() -> str:
    """How to install any backend, for a message."""
    return " or ".join(k.install for k in KINDS.values())
