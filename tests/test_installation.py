"""The native parts as an installation holds them (adafuse_export/installation.py, `adafuse-export doctor`): an
_native tree assembled from the project's real build (tests/native_build.py) the way the wheel lays it out,
then broken one part at a time. CI also builds the real wheel and runs `doctor --require-all` from a fresh venv
(.ci/run)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from adafuse_export import installation
from adafuse_export.cli import main

# The kernel C ABI as tests/test_kernels_build.py lists it by hand, and the C API's entry points counted in the
# header's ADAFUSE_API lines: the header reader must find exactly these.
from test_kernels_build import EXPECTED_SYMBOLS

REPO = Path(__file__).resolve().parents[1]


def test_declared_functions_reads_both_headers():
    assert set(installation.declared_functions(REPO / "plugins/kernels/include/adafuse_kernels.h")) == EXPECTED_SYMBOLS
    runtime_h = (REPO / "runtime/include/adafuse/runtime.h").read_text()
    api = installation.declared_functions(REPO / "runtime/include/adafuse/runtime.h")
    assert len(api) == runtime_h.count("\nADAFUSE_API ") and "adafuse_generate" in api and "adafuse_engine_open" in api


@pytest.fixture
def installed(native_build, tmp_path, monkeypatch) -> Path:
    """An _native folder laid out as the wheel's, from the real build."""
    root = tmp_path / "_native"
    files = {"lib/libadafuse_kernels.so": "plugins/kernels/libadafuse_kernels.so",
             "lib/libadafuse_trt_plugins.so": "plugins/libadafuse_trt_plugins.so",
             "lib/libadafuse_runtime.so": "runtime/libadafuse_runtime.so",
             "bin/adafuse-generate": "runtime/adafuse-generate",
             "bin/adafuse-serve": "runtime/adafuse-serve",
             "build_info.json": "build_info.json"}
    for dst, src in files.items():
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(native_build / src, root / dst)
    (root / "include/adafuse").mkdir(parents=True)
    shutil.copy2(REPO / "plugins/kernels/include/adafuse_kernels.h", root / "include")
    shutil.copy2(REPO / "runtime/include/adafuse/runtime.h", root / "include/adafuse")
    (root / "lib/cmake/adafuse_runtime").mkdir(parents=True)
    (root / "lib/cmake/adafuse_runtime/adafuse_runtimeConfig.cmake").write_text("# placeholder of the CMake package\n")
    monkeypatch.setattr(installation, "native_roots", lambda: [root])
    monkeypatch.delenv("ADAFUSE_PLUGIN_LIB", raising=False)
    return root


def test_a_complete_installation_passes(installed, capsys):
    checks = installation.check_installation()
    *parts, driver = checks
    assert [c.state for c in parts] == ["ok"] * len(parts), checks
    # the kernels' own driver check: a note on a machine without a GPU (CI), never a failure of the installation
    assert driver.part == "CUDA driver" and (driver.state == "ok" or (driver.state == "note" and driver.detail.startswith(
        "no CUDA driver found: the adafuse kernels (built with CUDA "))), driver
    assert {c.part for c in checks} >= {"lib/libadafuse_kernels.so", "lib/libadafuse_runtime.so", "bin/adafuse-serve"}
    assert main(["doctor", "--require-all"]) == 0
    assert installation.plugin_library() == installed / "lib/libadafuse_trt_plugins.so"


def test_a_library_without_its_entry_points_fails(installed, native_build, capsys):
    # the runtime's place taken by a library that is not the runtime
    shutil.copy2(native_build / "runtime/tests/libplugin_library_stub.so", installed / "lib/libadafuse_runtime.so")
    assert main(["doctor"]) == 2
    out, err = capsys.readouterr()
    assert "lib/libadafuse_runtime.so" in out and "does not export adafuse_" in out
    assert err.strip() == "error: 1 native part(s) do not work: lib/libadafuse_runtime.so"


def test_a_broken_executable_fails(installed, capsys):
    (installed / "bin/adafuse-serve").write_text("#!/bin/sh\nexit 3\n")
    assert main(["doctor"]) == 2
    assert "bin/adafuse-serve" in capsys.readouterr().out


def test_a_left_out_part_is_reported_with_the_build_reason(installed, capsys):
    info = json.loads((installed / "build_info.json").read_text())
    info["built"].remove("plugins")
    info["left_out"].append("plugins: no TensorRT headers (set TENSORRT_ROOT or ADAFUSE_TRT_HEADERS_DIR)")
    (installed / "build_info.json").write_text(json.dumps(info))
    (installed / "lib/libadafuse_trt_plugins.so").unlink()
    assert main(["doctor"]) == 0  # what was shipped works
    assert "left out  plugins: no TensorRT headers" in capsys.readouterr().out
    assert main(["doctor", "--require-all"]) == 2
    assert "left out of this installation: plugins" in capsys.readouterr().err
    assert installation.plugin_library() is None


def test_a_build_without_nvcc_leaves_the_native_parts_out_and_says_why(tmp_path):
    """The configure a `pip install` runs on a machine without CUDA: it succeeds (the pure-Python tool installs),
    builds nothing native, and build_info.json names what was left out and why, one entry per reason."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = "/usr/bin:/bin"  # no nvcc on it; the configure's /usr/local/cuda guess is off with an empty compiler
    proc = subprocess.run(["cmake", "-S", str(REPO), "-B", str(tmp_path / "b"), "-DCMAKE_CUDA_COMPILER="],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = " ".join(proc.stderr.split())  # CMake wraps its warnings
    assert "leaving out kernels, plugins, runtime, adafuse-serve: no CUDA compiler (nvcc) found" in said
    info = json.loads((tmp_path / "b" / "build_info.json").read_text())
    assert info["built"] == [] and info["cuda_architectures"] == []
    assert info["left_out"] == ["kernels, plugins, runtime, adafuse-serve: no CUDA compiler (nvcc) found: set CUDACXX "
                                "or put nvcc on PATH"]
    proc = subprocess.run(["cmake", "-S", str(REPO), "-B", str(tmp_path / "c"), "-DCMAKE_CUDA_COMPILER=",
                           "-DADAFUSE_REQUIRE_ALL=ON"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "cannot be built: no CUDA compiler (nvcc) found" in " ".join(proc.stderr.split())


def test_no_native_build_at_all(monkeypatch, capsys):
    monkeypatch.setattr(installation, "native_roots", lambda: [])
    assert main(["doctor"]) == 0
    assert "has no adafuse_export/_native" in capsys.readouterr().out
    assert main(["doctor", "--require-all"]) == 2
    monkeypatch.setattr("sys.argv", ["adafuse-serve", "--help"])
    assert installation.serve() == 2
    assert "adafuse-serve is not part of this installation" in capsys.readouterr().err
