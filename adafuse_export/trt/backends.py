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
    version_compatible: bool  # whether it builds version-compatible engines for TensorRT's lean runtime (--version-compatible)
    capabilities: tuple[str, ...] | None  # compute capabilities its engines run on ("12.x": any minor); None: the GPU built on
    install: str
    # the version from which its ONNX parser imports TensorScatter as IKVCacheUpdateLayer (the cache updated in place,
    # onnx.builder KV_UPDATES); None: never (TensorRT-RTX: no NVIDIA documentation says its parser does)
    kv_in_place_since: tuple[int, int] | None = None

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
                timing_cache=True, version_compatible=True, capabilities=None,
                install="full TensorRT 10 (pip install 'tensorrt-cu12==10.*' or 'tensorrt-cu13==10.*': the major the adafuse "
                        "runtime and plugin library are built for; a plain `pip install tensorrt` may give a newer one) plus the "
                        "adafuse plugin library (installed with this tool; from a checkout: cmake --preset release && cmake "
                        "--build --preset release)",
                # onnx-tensorrt PR #1048 (TensorRT 10.15): "Added support for RotaryEmbedding, RMSNormalization and
                # TensorScatter"; NvInfer.h 10.15 IKVCacheUpdateLayer (runtime/README.md, "The KV cache")
                kv_in_place_since=(10, 15)),
    BackendKind("tensorrt-rtx", "TensorRT-RTX", "tensorrt_rtx", "portable", None, strongly_typed=False,
                timing_cache=False, version_compatible=False, capabilities=("8.0", "8.6", "8.9", "12.x"),
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

    @property
    def kv_update(self) -> str:
        """How its engines' decoder graphs write the KV cache (onnx.builder.KV_UPDATES): in place where its parser
        maps TensorScatter onto IKVCacheUpdateLayer, else a copy."""
        return kv_update_for(self.kind, self.version)


def kv_update_for(kind: BackendKind, version: str) -> str:
    """'in-place' for a backend kind whose version `version` ("10.15.1.29") imports TensorScatter in place, else 'copy'."""
    parts = version.split(".")[:2]
    if kind.kv_in_place_since is None or len(parts) < 2 or not all(p.isdigit() for p in parts):
        return "copy"
    return "in-place" if (int(parts[0]), int(parts[1])) >= kind.kv_in_place_since else "copy"


class TensorRTVersionRefused(AdafuseError):
    """The installed TensorRT is of another major than the runtime and plugin library are built for."""


# The TensorRT major of the headers the native build downloads when none are given (kernel-lens 10.14.1).
DEFAULT_TENSORRT_MAJOR = 10


def runtime_tensorrt_major() -> int:
    """The TensorRT major the installed runtime and plugin library were built against (build_info.json's
    tensorrt_headers), else the default build's."""
    from ..installation import build_info

    headers = (build_info() or {}).get("tensorrt_headers") or ""
    major = headers.split(".")[0]
    return int(major) if major.isdigit() else DEFAULT_TENSORRT_MAJOR


def _version_refusal(name: str, version: str, requested: str) -> str | None:
    """Why full TensorRT `version` cannot build engines for this installation (None: it can)."""
    if name != "tensorrt":
        return None
    want = runtime_tensorrt_major()
    major = version.split(".")[0]
    if major.isdigit() and int(major) == want:
        return None
    other = "; --backend tensorrt-rtx builds without it" if requested == "auto" else ""
    return (f"TensorRT {version} is installed, but the adafuse runtime and plugin library are built for TensorRT {want}.x: "
            f"install 'tensorrt-cu12=={want}.*' (or 'tensorrt-cu13=={want}.*'), or build the plugins and runtime against "
            f"TensorRT {major} headers (TENSORRT_ROOT){other}")


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
            version = getattr(mod, "__version__", "unknown")
            refused = _version_refusal(name, version, requested)
            if refused:  # an engine it builds would not load in the runtime: refused, never skipped silently
                raise TensorRTVersionRefused(refused)
            return Backend(name, mod, version)
    hints = " or ".join(f"{n}: {KINDS[n].install}" for n in wanted)
    raise AdafuseError(f"no TensorRT found for --backend {requested}; install {hints}")


def builders_for(major: int, minor: int) -> tuple[str, ...]:
    """The backends whose engines run on a GPU of this compute capability."""
    return tuple(k.name for k in KINDS.values() if k.runs_on_capability(major, minor))


def install_hint() -> str:
    """How to install any backend, for a message."""
    return " or ".join(k.install for k in KINDS.values())
