"""The project's native build for the tests: the top-level CMakeLists.txt with the `dev` preset (sm_90, the
plugin harness and the runtime's ctest suite on, every part required, warnings as errors), configured and built
once per test session. ADAFUSE_NATIVE_BUILD_DIR names a folder to reuse across sessions (CI runs ctest there
afterwards); else a temporary one. TensorRT headers: TENSORRT_ROOT / ADAFUSE_TRT_HEADERS_DIR, or the kernel-lens
wheel cmake/FindTensorRT.cmake downloads. Nothing built here needs a GPU or TensorRT to be tested on the CPU."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _run(cmd: list, limit: int) -> None:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=limit)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")


def build_native(tmp_path_factory) -> Path:
    cmake, compiler = shutil.which("cmake"), nvcc()
    if cmake is None or compiler is None:
        pytest.fail(f"the native build needs cmake and nvcc (cmake={cmake}, nvcc={compiler})")
    build = Path(os.environ.get("ADAFUSE_NATIVE_BUILD_DIR") or tmp_path_factory.mktemp("native_build"))
    # ADAFUSE_WERROR=ON stated so that a reused folder cannot relax it: any compiler warning fails the build.
    configure = [cmake, "--preset", "dev", "-S", REPO, "-B", build, "-DADAFUSE_WERROR=ON"]
    if not (build / "CMakeCache.txt").exists():
        configure.append(f"-DCMAKE_CUDA_COMPILER={compiler}")  # only on a fresh folder: it would wipe the cache
    if os.environ.get("ADAFUSE_TRT_HEADERS_DIR"):
        configure.append(f"-DADAFUSE_TRT_HEADERS_DIR={os.environ['ADAFUSE_TRT_HEADERS_DIR']}")
    _run(configure, 300)
    _run([cmake, "--build", build, "-j", str(os.cpu_count() or 2)], 1800)
    return build
