"""The native parts shipped in the wheel (adafuse_export/_native/): where they are and what they hold.

The top-level CMakeLists.txt installs, under adafuse_export/_native/,
    lib/libadafuse_kernels.so      the fused kernels' C ABI (the kernel tests and benchmarks' binding)
    lib/libadafuse_trt_plugins.so  the TensorRT plugins (engines built with --backend tensorrt / tensorrt-rtx)
    lib/libadafuse_runtime.so      the C++ runtime's C API, with include/ and lib/cmake/ for C++ users
    bin/adafuse-serve, bin/adafuse-generate
    build_info.json                what was built, for which architectures, and what was left out and why.
An environment variable still overrides each library (ADAFUSE_KERNELS_LIB, ADAFUSE_PLUGIN_LIB). This module
imports nothing heavy: the `adafuse-serve` and `adafuse-generate` console scripts start through it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

KERNELS_LIB = "libadafuse_kernels.so"
PLUGIN_LIB = "libadafuse_trt_plugins.so"
RUNTIME_LIB = "libadafuse_runtime.so"
EXECUTABLES = ("adafuse-serve", "adafuse-generate")
NATIVE_DIR = "_native"


def native_roots() -> List[Path]:
    """The _native folders of this package: the installed one (a wheel, or the build output of an editable
    install, which Python finds beside the checkout's sources in the package's search path)."""
    from . import __path__ as package_path

    return [Path(p) / NATIVE_DIR for p in package_path if (Path(p) / NATIVE_DIR).is_dir()]


def shipped(relative: str) -> Optional[Path]:
    """A file under _native (e.g. "lib/libadafuse_trt_plugins.so"), or None when this installation lacks it."""
    for root in native_roots():
        if (root / relative).is_file():
            return root / relative
    return None


def build_info() -> Optional[Dict]:
    """build_info.json of the installation (None: installed without the native build, e.g. a checkout on PYTHONPATH)."""
    found = shipped("build_info.json")
    return json.loads(found.read_text()) if found else None


def plugin_library() -> Optional[Path]:
    """$ADAFUSE_PLUGIN_LIB, else the shipped plugin library, else None."""
    env = os.environ.get("ADAFUSE_PLUGIN_LIB")
    if env:
        return Path(env)
    return shipped(f"lib/{PLUGIN_LIB}")


def runtime_library() -> Optional[Path]:
    """The shipped C++ runtime (a wheel holds it as plain libadafuse_runtime.so: no soname symlinks)."""
    return shipped(f"lib/{RUNTIME_LIB}")


def _exec(name: str) -> int:
    binary = shipped(f"bin/{name}")
    if binary is None:
        info = build_info()
        reason = "; ".join(info["left_out"]) if info and info.get("left_out") else "this installation has no native build"
        print(f"error: {name} is not part of this installation ({reason}); `adafuse-export doctor` tells what is",
              file=sys.stderr)
        return 2
    env = dict(os.environ)
    plugins = plugin_library()
    if plugins is not None:  # engines with the adafuse plugins load it without the user naming it
        env.setdefault("ADAFUSE_PLUGIN_LIB", str(plugins))
    os.execve(str(binary), [name, *sys.argv[1:]], env)
    return 0  # not reached


def serve() -> int:
    """Console script `adafuse-serve`: the C++ HTTP service shipped in the package."""
    return _exec("adafuse-serve")


def generate() -> int:
    """Console script `adafuse-generate`: the C API's example client shipped in the package."""
    return _exec("adafuse-generate")


class Check:
    """One line of `adafuse-export doctor`: a part, whether it is usable, and what was found."""

    def __init__(self, part: str, state: str, detail: str):
        self.part, self.state, self.detail = part, state, detail  # state: ok | note | left out | FAILED

    def __repr__(self) -> str:
        return f"Check({self.part!r}, {self.state!r}, {self.detail!r})"


# What each shipped library must export: every function its shipped header declares (the C ABI and the C API
# are read from the header beside them, so the two cannot drift); TensorRT's plugin entry points.
HEADERS = {KERNELS_LIB: "include/adafuse_kernels.h", RUNTIME_LIB: "include/adafuse/runtime.h"}
PLUGIN_ENTRY_POINTS = ("getCreators", "setLoggerFinder")


def declared_functions(header: Path) -> List[str]:
    """The adafuse_* functions a C header declares for a shipped build (a name followed by '(' at the start of
    a declaration, outside the benchmark-only ADAFUSE_DIAGNOSTICS block)."""
    import re

    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", header.read_text(), flags=re.S)
    # declarations only a benchmark build compiles (plugins/kernels: -DADAFUSE_DIAGNOSTICS) are not shipped
    text = re.sub(r"#ifdef ADAFUSE_DIAGNOSTICS.*?#endif", "", text, flags=re.S)
    return sorted(set(re.findall(r"^\s*(?:ADAFUSE_API\s+)?[A-Za-z_][\w\s\*]*?\b(adafuse_\w+)\s*\(", text, flags=re.M)))


# Which build_info "built" entry ships which file.
PARTS = {"kernels": [f"lib/{KERNELS_LIB}", "include/adafuse_kernels.h"],
         "plugins": [f"lib/{PLUGIN_LIB}"],
         "runtime": [f"lib/{RUNTIME_LIB}", "include/adafuse/runtime.h", "bin/adafuse-generate",
                     "lib/cmake/adafuse_runtime/adafuse_runtimeConfig.cmake"],
         "adafuse-serve": ["bin/adafuse-serve"]}


def _check_library(path: Path) -> str:
    """'' when the library loads and exports what its users call, else why not."""
    import ctypes

    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return f"cannot be loaded: {e}"
    if path.name in HEADERS:
        header = shipped(HEADERS[path.name])
        if header is None:
            return f"is shipped without its header {HEADERS[path.name]}"
        expected = declared_functions(header)
        if not expected:
            return f"{header} declares no adafuse_* function"
    else:
        expected = list(PLUGIN_ENTRY_POINTS)
    missing = [s for s in expected if not hasattr(lib, s)]
    if missing:
        return f"does not export {', '.join(missing)}"
    if path.name == KERNELS_LIB:
        from .kernels.binding import ABI_VERSION

        lib.adafuse_abi_version.restype = ctypes.c_int
        if lib.adafuse_abi_version() != ABI_VERSION:
            return f"has ABI version {lib.adafuse_abi_version()}, this Python package expects {ABI_VERSION}"
    return ""


def _check_executable(path: Path) -> str:
    import subprocess

    try:
        proc = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        return f"cannot be started: {e}"
    if proc.returncode != 0 or "usage:" not in proc.stdout:
        return f"--help exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[:200]}"
    return ""


def check_installation() -> List[Check]:
    """Every native part: shipped and working, left out (with the build's reason), or broken."""
    info = build_info()
    if info is None:
        return [Check("native build", "left out", "this installation has no adafuse_export/_native (a checkout on "
                                                  "PYTHONPATH, or a package built without CMake)")]
    checks = [Check("native build", "ok", f"version {info['version']}, CUDA {info['cuda_toolkit'] or '-'}, "
                                          f"architectures {' '.join(info['cuda_architectures']) or '-'}, "
                                          f"TensorRT headers {info['tensorrt_headers'] or '-'}")]
    for part, files in PARTS.items():
        if part not in info["built"]:
            # an entry names its parts before the colon: "runtime, adafuse-serve: nlohmann-json ... not found"
            reason = next((r for r in info["left_out"] if part in [p.strip() for p in r.split(":")[0].split(",")]),
                          "not built")
            checks.append(Check(part, "left out", reason))
            continue
        for relative in files:
            found = shipped(relative)
            if found is None:
                checks.append(Check(relative, "FAILED", f"built but missing from {', '.join(map(str, native_roots()))}"))
                continue
            if relative.startswith("lib/"):
                problem = _check_library(found) if found.suffix == ".so" else ""
            elif relative.startswith("bin/"):
                problem = _check_executable(found)
            else:
                problem = ""
            checks.append(Check(relative, "FAILED" if problem else "ok", f"{found}: {problem}" if problem else str(found)))
    kernels = shipped(f"lib/{KERNELS_LIB}")
    if kernels is not None and not any(c.state == "FAILED" and KERNELS_LIB in c.part for c in checks):
        checks.append(_driver_check(kernels))
    return checks


def _driver_check(kernels: Path) -> Check:
    """The kernels' own driver floor check: "ok", or "note" with its line (a build or CI machine without a GPU
    is no failure of the installation; the kernels refuse to load with the same line where they would run)."""
    from .kernels.binding import ADAFUSE_OK, Kernels

    status, line = Kernels(kernels, check_runtime=False).runtime_status()
    return Check("CUDA driver", "ok" if status == ADAFUSE_OK else "note", line)
