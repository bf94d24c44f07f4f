"""Build libadafuse_kernels.so from a source checkout into a cache directory, with the project's CMake.

The same top-level CMakeLists.txt builds the wheel's libraries; this configures it with only the kernels
(plugins and runtime off) for the GPU at hand, so a checkout run without `pip install` (the GPU machine,
benchmarks) gets the flags, warnings-as-errors and export map the wheel has. The cache key hashes the
sources, the headers, the CMake files, the architectures, the flags and the nvcc version:
``$ADAFUSE_CACHE_DIR`` or ``~/.cache/adafuse_export/kernels/<hash>/libadafuse_kernels.so``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

LIB_NAME = "libadafuse_kernels.so"


class KernelBuildError(RuntimeError):
    """nvcc or cmake is missing or the kernel library failed to compile."""


def source_root() -> Path:
    """The project checkout holding the top-level CMakeLists.txt (override with ADAFUSE_SOURCE_DIR)."""
    env = os.environ.get("ADAFUSE_SOURCE_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2]


def kernel_root() -> Path:
    """plugins/kernels of the checkout."""
    return source_root() / "plugins" / "kernels"


def has_sources() -> bool:
    """True when this package runs from a checkout that holds the kernel sources (not from a wheel)."""
    return (source_root() / "CMakeLists.txt").is_file() and bool(list((kernel_root() / "src").glob("*.cu")))


def kernel_sources(root: Optional[Path] = None) -> List[Path]:
    root = root or kernel_root()
    srcs = sorted((root / "src").glob("*.cu"))
    if not srcs:
        raise KernelBuildError(f"no kernel sources under {root / 'src'}")
    return srcs


def find_nvcc() -> Optional[str]:
    """nvcc from $NVCC, $CUDACXX, $CUDA_HOME/bin, /usr/local/cuda/bin or PATH."""
    for var in ("NVCC", "CUDACXX"):
        v = os.environ.get(var)
        if v and Path(v).is_file():
            return v
    for var in ("CUDA_HOME", "CUDA_PATH"):
        v = os.environ.get(var)
        if v and (Path(v) / "bin" / "nvcc").is_file():
            return str(Path(v) / "bin" / "nvcc")
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc")


def default_archs() -> List[str]:
    """$ADAFUSE_CUDA_ARCHS ("80;90"), else the current GPU's arch via torch, else 80 and 90."""
    env = os.environ.get("ADAFUSE_CUDA_ARCHS")
    if env:
        return _norm_archs(env.replace(",", ";").split(";"))
    try:
        import torch  # lazy

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return [f"{major}{minor}"]
    except Exception:  # torch missing or no driver: fall through
        pass
    return ["80", "90"]


def _norm_archs(archs: Iterable[str]) -> List[str]:
    out = []
    for a in archs:
        a = str(a).strip().lower().replace("sm_", "").replace("compute_", "").replace(".", "")
        if not a:
            continue
        if not (a.rstrip("a").isdigit()):
            raise KernelBuildError(f"bad CUDA arch {a!r} (expected e.g. '80', '90', 'sm_90')")
        out.append(a)
    if not out:
        raise KernelBuildError("empty CUDA arch list")
    return sorted(set(out))


def _cmake_archs(archs: Sequence[str]) -> str:
    """Machine code for each, plus PTX of the newest so newer GPUs can JIT it."""
    return ";".join([f"{a}-real" for a in archs] + [f"{archs[-1]}-virtual"])


def _run(cmd: Sequence[str], what: str, verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd), flush=True)
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelBuildError(f"{what} failed (exit {proc.returncode}):\n{' '.join(cmd)}\n"
                               f"{proc.stdout[-4000:]}{proc.stderr[-8000:]}")


def _tool_version(tool: str) -> str:
    try:
        return subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise KernelBuildError(f"cannot run {tool} --version: {exc}") from exc


def cache_root() -> Path:
    env = os.environ.get("ADAFUSE_CACHE_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "adafuse_export"
    return base / "kernels"


def build_library(archs: Optional[Sequence[str]] = None, *, cache_dir: Optional[Path] = None,
                  nvcc: Optional[str] = None, force: bool = False, verbose: bool = False,
                  extra_flags: Sequence[str] = ()) -> Path:
    """Compile (or reuse from the cache) the kernel library of this checkout; return its path.
    extra_flags are added to nvcc's command line (CMAKE_CUDA_FLAGS), e.g. a benchmark's -D switch."""
    nvcc = nvcc or find_nvcc()
    if not nvcc:
        raise KernelBuildError(
            "nvcc not found: install the CUDA toolkit or set CUDA_HOME / NVCC")
    archs = _norm_archs(archs if archs is not None else default_archs())
    cmake = shutil.which("cmake")
    if cmake is None:
        raise KernelBuildError("cmake not found: the kernel library builds with the project's CMake (3.24 or newer)")
    root = source_root()
    srcs = kernel_sources()
    inputs = (srcs + sorted((kernel_root() / "include").glob("*.h")) + sorted((kernel_root() / "src").glob("*.cuh"))
              + [root / "CMakeLists.txt", kernel_root() / "CMakeLists.txt", *sorted((root / "cmake").glob("*.cmake"))])
    h = hashlib.sha256()
    for p in inputs:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    h.update(repr((archs, list(extra_flags))).encode())
    h.update(_tool_version(nvcc).encode())
    key = h.hexdigest()[:16]
    out_dir = Path(cache_dir) if cache_dir else cache_root() / key
    lib = out_dir / LIB_NAME
    if lib.is_file() and not force:
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        configure = [cmake, "-S", str(root), "-B", tmp, f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={_cmake_archs(archs)}", "-DCMAKE_BUILD_TYPE=Release",
                     "-DADAFUSE_BUILD_PLUGINS=OFF", "-DADAFUSE_BUILD_RUNTIME=OFF", "-DADAFUSE_REQUIRE_ALL=ON"]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        if extra_flags:
            configure.append(f"-DCMAKE_CUDA_FLAGS={' '.join(extra_flags)}")
        _run(configure, "configuring the kernel library", verbose)
        _run([cmake, "--build", tmp, "--target", "adafuse_kernels", "-j", str(os.cpu_count() or 2)],
             "building the kernel library", verbose)
        os.replace(Path(tmp) / "plugins" / "kernels" / LIB_NAME, lib)  # atomic within the directory
    return lib
