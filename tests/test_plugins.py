"""TensorRT plugin library (plugins/): build, exports, contract harness, TensorRT-RTX registry.

Uses the project's native build (tests/native_build.py). Nothing here needs a GPU: the harness runs its CPU-only contract
checks, and the TensorRT-RTX checks stop at the plugin registry (load_library,
get_creator, create_plugin), which works on a machine without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from native_build import nvcc as find_nvcc

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "plugins"
LIB_NAME = "libadafuse_trt_plugins.so"
HARNESS = "adafuse_plugin_harness"


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


@pytest.fixture(scope="session")
def plugin_build(native_build) -> Path:
    """plugins/' part of the project's native build (tests/native_build.py)."""
    build_dir = native_build / "plugins"
    assert (build_dir / LIB_NAME).is_file() and (build_dir / HARNESS).is_file()
    return build_dir


WARNING_SOURCES = {
    # one deliberate warning per kind of code the project compiles
    "host.cpp": "int f(int a) { int unused = a; return a; }\n",
    "cuda_host.cu": "int g(int a) { int unused = a; return a; }\n",
    "cuda_device.cu": "__global__ void k(int* p) { int unused = 3; p[0] = 1; }\n",
}


def _warnings_project(tmp_path: Path) -> Path:
    src = tmp_path / "warn_src"
    src.mkdir()
    lines = ["cmake_minimum_required(VERSION 3.24)", "project(warn LANGUAGES CXX CUDA)",
             f'include("{REPO / "cmake" / "AdafuseWarnings.cmake"}")']
    for name, text in WARNING_SOURCES.items():
        (src / name).write_text(text)
        target = name.replace(".", "_")
        lines += [f"add_library({target} OBJECT {name})",
                  f"target_compile_options({target} PRIVATE ${{ADAFUSE_WARNINGS}})"]
    (src / "CMakeLists.txt").write_text("\n".join(lines) + "\n")
    return src


def test_warning_flags_turn_every_kind_of_warning_into_an_error(tmp_path):
    """cmake/AdafuseWarnings.cmake (used by every native target) fails the build on a
    warning in C++, in CUDA host code and in CUDA device code; ADAFUSE_WERROR=OFF relaxes it."""
    nvcc, cmake = find_nvcc(), shutil.which("cmake")
    if nvcc is None or cmake is None:
        pytest.skip(f"needs nvcc and cmake (nvcc={nvcc}, cmake={cmake})")
    src = _warnings_project(tmp_path)
    for werror, build in (("ON", tmp_path / "b_on"), ("OFF", tmp_path / "b_off")):
        subprocess.run([cmake, "-S", str(src), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={nvcc}",
                        "-DCMAKE_CUDA_ARCHITECTURES=90", f"-DADAFUSE_WERROR={werror}"],
                       check=True, capture_output=True, text=True, timeout=300)
        for name in WARNING_SOURCES:
            proc = subprocess.run([cmake, "--build", str(build), "--target", name.replace(".", "_")],
                                  capture_output=True, text=True, timeout=300)
            output = proc.stdout + proc.stderr
            assert "unused" in output, f"{name}: no warning reported\n{_tail(output)}"
            if werror == "ON":
                assert proc.returncode != 0, f"{name}: the warning did not fail the build\n{_tail(output)}"
            else:
                assert proc.returncode == 0, f"{name}: failed with ADAFUSE_WERROR=OFF\n{_tail(output)}"


def test_plugin_build_uses_warnings_as_errors(native_build, plugin_build):
    cache = (native_build / "CMakeCache.txt").read_text()
    assert "ADAFUSE_WERROR:BOOL=ON" in cache
    flags = (native_build / "build.ninja").read_text() if (native_build / "build.ninja").exists() else ""
    if not flags:  # Makefile generator: the per-target flags.make files
        flags = "".join(p.read_text() for p in plugin_build.rglob("flags.make"))
    assert "-Wall -Wextra -Werror" in flags
    assert "-Xcompiler=-Werror" in flags and "-Werror all-warnings" in flags


def test_library_exports_only_the_tensorrt_entry_points(plugin_build):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    out = subprocess.run([nm, "-D", "--defined-only", str(plugin_build / LIB_NAME)],
                         capture_output=True, text=True, check=True).stdout
    functions = {line.split()[-1] for line in out.splitlines()
                 if len(line.split()) == 3 and line.split()[1] == "T"}
    # IPluginRegistry::loadLibrary needs the first two; the runtime reads the TensorRT major the library was built
    # against (refusing one built for another); nothing else (kernels, helpers) leaks out.
    assert functions == {"getCreators", "setLoggerFinder", "adafuse_plugin_tensorrt_major"}, out


def test_library_has_no_libcudart_dependency(plugin_build):
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd not found")
    out = subprocess.run([ldd, str(plugin_build / LIB_NAME)], capture_output=True, text=True).stdout
    assert "libcudart" not in out, out
    assert "not found" not in out, out


def test_harness_cpu_contract(plugin_build):
    proc = subprocess.run([str(plugin_build / HARNESS), "--lib", str(plugin_build / LIB_NAME)],
                          capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, _tail(output)
    assert "harness summary:" in output and " 0 failed" in output, _tail(output)
    assert "[AdafuseLoraLinear: bad fields]" in output
    assert "[AdafuseSwitchLinear: bad fields]" in output


def test_harness_rejects_unknown_arguments(plugin_build):
    proc = subprocess.run([str(plugin_build / HARNESS), "--bogus"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


# ---- TensorRT-RTX plugin registry (CPU) ------------------------------------
# Runs in a subprocess: the plugin library logs through the logger finder that
# the registry hands to setLoggerFinder; with no builder/runtime logger attached
# (as here) it falls back to stderr, which the subprocess lets us read.
RTX_SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    import numpy as np
    import tensorrt_rtx as trt

    lib = sys.argv[1]
    reg = trt.get_plugin_registry()
    out = {"handle": reg.load_library(lib) is not None, "plugins": {}}
    GOOD = dict(in_features=64, out_features=48, num_experts=4, rank=8, top_k=2, scale=2.0, has_bias=1)

    keep_alive = []  # PluginField does not own its numpy buffer

    def field(name, value, kind):
        dtype, ftype = {"i32": (np.int32, trt.PluginFieldType.INT32),
                        "i64": (np.int64, trt.PluginFieldType.INT64),
                        "f32": (np.float32, trt.PluginFieldType.FLOAT32),
                        "f64": (np.float64, trt.PluginFieldType.FLOAT64)}[kind]
        data = np.array([value], dtype=dtype)
        keep_alive.append(data)
        return trt.PluginField(name, data, ftype)

    def collection(kinds=None, drop=(), **override):
        values = dict(GOOD, **override)
        kinds = kinds or {}
        fields = [field(k, v, kinds.get(k, "f32" if k == "scale" else "i32"))
                  for k, v in values.items() if k not in drop]
        return trt.PluginFieldCollection(fields)

    for name in ("AdafuseLoraLinear", "AdafuseSwitchLinear"):
        res = out["plugins"][name] = {}
        creator = reg.get_creator(name, "1", "")
        res["creator"] = creator is not None
        if creator is None:
            continue
        res["creator_kind"] = creator.interface_info.kind
        res["field_names"] = [[f.name, str(f.type).split(".")[-1]] for f in creator.field_names]
        plugin = creator.create_plugin(name, collection(), trt.TensorRTPhase.BUILD)
        res["created"] = plugin is not None
        if plugin is not None:
            core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
            res["core"] = [core.plugin_name, core.plugin_version, core.plugin_namespace]
            res["capabilities"] = all(
                plugin.get_capability_interface(t) is not None
                for t in (trt.PluginCapabilityType.BUILD, trt.PluginCapabilityType.RUNTIME))
        plugin = creator.create_plugin(name, collection(has_bias=0), trt.TensorRTPhase.RUNTIME)
        res["created_runtime_no_bias"] = plugin is not None
        plugin = creator.create_plugin(name, collection(kinds={"in_features": "i64", "scale": "f64"}),
                                       trt.TensorRTPhase.BUILD)
        res["created_int64_float64"] = plugin is not None
        bad = {
            "top_k=9": collection(top_k=9),
            "top_k=0": collection(top_k=0),
            "rank=0": collection(rank=0),
            "has_bias=2": collection(has_bias=2),
            "in_features=-1": collection(in_features=-1),
            "scale=nan": collection(scale=float("nan")),
            "rank missing": collection(drop=("rank",)),
            "in_features float": collection(kinds={"in_features": "f32"}),
            # the kernel limits of plugins/kernels/include/adafuse_kernels.h
            "top_k=9 of 16": collection(num_experts=16, top_k=9),
            "num_experts=257": collection(num_experts=257),
            "rank=4097": collection(rank=4097),
            "weight_dtype=2": collection(weight_dtype=2),
            "weight_dtype=1, in_features=40": collection(weight_dtype=1, in_features=40),
        }
        res["bad"] = {}
        for what, fc in bad.items():
            try:
                res["bad"][what] = creator.create_plugin(name, fc, trt.TensorRTPhase.BUILD) is None
            except Exception as exc:  # a binding that raises instead of returning None also rejects
                res["bad"][what] = f"raised {type(exc).__name__}"
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def rtx_result(plugin_build):
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt_rtx not installed (pip install tensorrt-rtx==1.7.1.116)")
    proc = subprocess.run([sys.executable, "-c", RTX_SCRIPT, str(plugin_build / LIB_NAME)],
                          capture_output=True, text=True, timeout=180)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}"
    return json.loads(lines[-1][len("RESULT "):]), proc.stderr


@pytest.mark.parametrize("name", ["AdafuseLoraLinear", "AdafuseSwitchLinear"])
def test_rtx_registry_loads_and_creates(rtx_result, name):
    result, _ = rtx_result
    assert result["handle"]
    res = result["plugins"][name]
    assert res["creator"], f"get_creator({name!r}, '1', '') returned None"
    assert res["creator_kind"] == "PLUGIN CREATOR_V3ONE"
    assert res["field_names"] == [
        ["in_features", "INT32"], ["out_features", "INT32"], ["num_experts", "INT32"], ["rank", "INT32"],
        ["top_k", "INT32"], ["scale", "FLOAT32"], ["has_bias", "INT32"], ["weight_dtype", "INT32"],
    ]
    assert res["created"]
    assert res["core"] == [name, "1", ""]
    assert res["capabilities"]
    assert res["created_runtime_no_bias"]
    assert res["created_int64_float64"]


@pytest.mark.parametrize("name", ["AdafuseLoraLinear", "AdafuseSwitchLinear"])
def test_rtx_registry_rejects_bad_fields(rtx_result, name):
    result, stderr = rtx_result
    bad = result["plugins"][name]["bad"]
    assert bad and all(v is True or str(v).startswith("raised") for v in bad.values()), bad
    # The messages name the plugin, the field, what was expected and what was found.
    for expected in (
        f"{name}: field 'top_k' expected in [1, num_experts=4], found 9",
        f"{name}: field 'top_k' expected in [1, num_experts=4], found 0",
        f"{name}: field 'rank' expected > 0, found 0",
        f"{name}: field 'has_bias' expected 0 or 1, found 2",
        f"{name}: field 'in_features' expected > 0, found -1",
        f"{name}: field 'scale' expected a finite float, found nan",
        f"{name}: required field 'rank' is missing",
        f"{name}: field 'in_features' must be an integer (kINT32), found type kFLOAT32",
        f"{name}: field 'top_k' = 9 exceeds the kernel limit 8 (ADAFUSE_MAX_TOP_K in adafuse_kernels.h)",
        f"{name}: field 'num_experts' = 257 exceeds the kernel limit 256 (ADAFUSE_LORA_MAX_EXPERTS in adafuse_kernels.h)",
        f"{name}: field 'rank' = 4097 exceeds the kernel limit 4096 (ADAFUSE_LORA_MAX_RANK in adafuse_kernels.h)",
        f"{name}: field 'weight_dtype' expected 0 (the dtype of x) or 1 (fp8 e4m3), found 2",
        f"{name}: field 'in_features' = 40 must be a multiple of 16 with weight_dtype 1",
    ):
        assert expected in stderr, f"missing log line: {expected}\n{_tail(stderr)}"
