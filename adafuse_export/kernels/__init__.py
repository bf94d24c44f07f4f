"""AdaFuse fused adapter CUDA kernels: build helper and ctypes binding.

The C ABI lives in ``plugins/kernels/include/adafuse_kernels.h``. This package
compiles it with ``nvcc`` into a per-user cache (no CMake needed) and binds it
with :mod:`ctypes`; torch is imported only when tensors are passed.

    from adafuse_export.kernels import load_kernels
    k = load_kernels()            # builds for the current GPU (or ADAFUSE_CUDA_ARCHS)
    y = k.lora_linear(x, W, A, B, expert_ids, gates, scale)
"""
from .build import (
    KernelBuildError,
    build_library,
    default_archs,
    find_nvcc,
    kernel_sources,
)
from .binding import (
    AdafuseKernelError,
    Kernels,
    load_kernels,
    SWITCH_SITE_DTYPE_SIZE,
)

__all__ = [
    "AdafuseKernelError",
    "KernelBuildError",
    "Kernels",
    "SWITCH_SITE_DTYPE_SIZE",
    "build_library",
    "default_archs",
    "find_nvcc",
    "kernel_sources",
    "load_kernels",
]
