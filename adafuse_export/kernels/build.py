"""Compile libadafuse_kernels.so with nvcc directly into a cache directory.

The cache key hashes the sources, the header, the arch list, the flags and the
nvcc version, so a rebuild happens only when one of them changes:
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
EXPORT_PREFIX = "adafuse_"
_FLAGS = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC",
          "-lineinfo"]


class KernelBuildError(RuntimeError):
    """nvcc is missing or the kernel library failed to compile."""


def kernel_root() -> Path:
    """plugins/kernels of this checkout (override with ADAFUSE_KERNELS_SRC)."""
    env = os.environ.get("ADAFUSE_KERNELS_SRC")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "plugins" / "kernels"


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


def _gencode(archs: Sequence[str]) -> List[str]:
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    # PTX of the newest arch, so newer GPUs can JIT it
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def _nvcc_version(nvcc: str) -> str:
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise KernelBuildError(f"cannot run {nvcc} --version: {exc}") from exc


def cache_root() -> Path:
    env = os.environ.get("ADAFUSE_CACHE_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "adafuse_export"
    return base / "kernels"


def build_library(archs: Optional[Sequence[str]] = None, *, cache_dir: Optional[Path] = None,
                  nvcc: Optional[str] = None, force: bool = False, verbose: bool = False,
                  extra_flags: Sequence[str] = ()) -> Path:
    """Compile (or reuse from the cache) the kernel library; return its path."""
    nvcc = nvcc or find_nvcc()
    if not nvcc:
        raise KernelBuildError(
            "nvcc not found: install the CUDA toolkit or set CUDA_HOME / NVCC")
    archs = _norm_archs(archs if archs is not None else default_archs())
    root = kernel_root()
    srcs = kernel_sources(root)
    include = root / "include"
    headers = sorted(include.glob("*.h")) + sorted((root / "src").glob("*.cuh"))
    flags = list(_FLAGS) + _gencode(archs) + list(extra_flags)

    h = hashlib.sha256()
    for p in srcs + headers:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(repr(flags).encode())
    h.update(_nvcc_version(nvcc).encode())
    key = h.hexdigest()[:16]
    out_dir = Path(cache_dir) if cache_dir else cache_root() / key
    lib = out_dir / LIB_NAME
    if lib.is_file() and not force:
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        vscript = Path(tmp) / "exports.map"
        vscript.write_text("{ global: %s*; local: *; };\n" % EXPORT_PREFIX)
        tmp_lib = Path(tmp) / LIB_NAME
        cmd = [nvcc, *flags, "--threads", "0", "-shared", f"-I{include}",
               *[str(s) for s in srcs], "-o", str(tmp_lib),
               "-Xlinker", f"--version-script={vscript}",
               "-Xlinker", "--exclude-libs,ALL"]
        if verbose:
            print(" ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelBuildError(
                f"nvcc failed (exit {proc.returncode}):\n{' '.join(cmd)}\n"
                f"{proc.stdout[-4000:]}{proc.stderr[-8000:]}")
        os.replace(tmp_lib, lib)  # atomic within the directory
    return lib
