"""Version-compatible engines (`convert --version-compatible`) and TensorRT's lean runtime.

Everything around the engine runs here on the CPU: the CLI's refusals, the builder flags (set on the real
IBuilderConfig of TensorRT-RTX's bindings, which carry the same BuilderFlag members), the manifest field as Python
and the C++ runtime read it, and pip's lean runtime wheel (tensorrt-lean-cu13-libs, installed by the README's test
command) loaded through the C++ runtime's own search. What never runs here: building a version-compatible engine
(no full TensorRT builder on PyPI) and deserializing one (no GPU).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from adafuse_export.errors import AdafuseError
from adafuse_export.trt.backends import Backend, select_backend
from adafuse_export.trt.build import builder_config

from test_runtime import converted, monkeypatch_session, runtime_build, runtime_lib  # noqa: F401 (fixtures)


def _one_line(r) -> str:
    assert r.code != 0 and "Traceback" not in r.err, r.err
    line = r.err.strip()
    assert "\n" not in line, r.err
    return line


@pytest.mark.parametrize("backend, want", [
    ("tensorrt-rtx", "--version-compatible: TensorRT-RTX engines are not version compatible (only --backend tensorrt "
                     "builds engines for TensorRT's lean runtime)"),
    ("native", "--version-compatible: not an option of --backend native (it builds no TensorRT engine; only --backend "
               "tensorrt builds engines for TensorRT's lean runtime)"),
])
def test_convert_refuses_version_compatible_where_no_lean_engine_is_built(cli, example_dirs, tmp_path, backend, want):
    out = tmp_path / ("out.native" if backend == "native" else "out.engine")
    line = _one_line(cli("convert", example_dirs["pregate"], out, "--backend", backend, "--version-compatible"))
    assert line.endswith(want), line
    assert list(tmp_path.iterdir()) == []  # refused before anything is read or written


def test_convert_auto_refuses_version_compatible_when_only_rtx_is_installed(cli, example_dirs, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is installed by .ci/run")
    if select_backend("auto").name != "tensorrt-rtx":
        pytest.skip("full TensorRT is installed here: auto picks it")
    out = tmp_path / "out.engine"
    line = _one_line(cli("convert", example_dirs["pregate"], out, "--version-compatible"))
    assert line.endswith("--version-compatible: TensorRT-RTX engines are not version compatible (only --backend tensorrt "
                         "builds engines for TensorRT's lean runtime); install full TensorRT or drop --version-compatible"), line
    assert not out.exists() and not out.with_suffix(".json").exists() and not out.with_suffix(".onnx").exists()


def test_builder_sets_version_compatible_and_leaves_the_lean_runtime_out():
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is installed by .ci/run; its bindings run on the CPU")
    full = Backend("tensorrt", trt, "10.16.1")  # full TensorRT's flags, set on a real IBuilderConfig
    for version_compatible in (False, True):
        config = builder_config(full, trt.Builder(trt.Logger(trt.Logger.ERROR)), "float16", version_compatible)
        assert config.get_flag(trt.BuilderFlag.VERSION_COMPATIBLE) == version_compatible
        assert config.get_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME) == version_compatible
    with pytest.raises(AdafuseError, match="^--version-compatible: TensorRT-RTX engines are not version compatible"):
        builder_config(select_backend("tensorrt-rtx"), trt.Builder(trt.Logger(trt.Logger.ERROR)), "float16", True)


# ---- the manifest field and the C++ runtime ------------------------------------------------------------------
def _as_full_tensorrt(src_engine: Path, dst: Path, *, version: str, version_compatible: object = True,
                      engine_bytes: bytes | None = None) -> Path:
    """A copy of a converted engine folder described as a full-TensorRT engine of `version`; engine_bytes replaces the
    engine file (its SHA-256 recorded, so every check before TensorRT passes)."""
    shutil.copytree(src_engine.parent, dst)
    engine = dst / src_engine.name
    if engine_bytes is not None:
        engine.write_bytes(engine_bytes)
    manifest = json.loads(engine.with_suffix(".json").read_text())
    manifest["engine"].update(backend="tensorrt", backend_version=version, sha256=hashlib.sha256(engine.read_bytes()).hexdigest())
    manifest["engine"]["version_compatible"] = version_compatible
    engine.with_suffix(".json").write_text(json.dumps(manifest))
    return engine


def test_inspect_says_an_engine_runs_on_the_lean_runtime(cli, converted, tmp_path):
    engine = _as_full_tensorrt(converted[1], tmp_path / "e", version="10.16.1.11")
    r = cli("inspect", engine)
    assert r.code == 0, r.err
    assert "tensorrt 10.16.1.11, runs on " in r.out
    assert "; version-compatible: runs on TensorRT 10.16.1.11's lean runtime (libnvinfer_lean)" in r.out
    assert "lean runtime" not in cli("inspect", converted[1]).out


def test_manifest_type_refusal_matches_python_word_for_word(runtime_lib, converted, tmp_path):
    from adafuse_export.runners.cpp_runtime import verify_manifest
    from adafuse_export.trt.manifest import verify_engine

    good = _as_full_tensorrt(converted[1], tmp_path / "good", version="10.16.1.11")
    assert verify_engine(good)["engine"]["version_compatible"] is True
    assert verify_manifest(good) == verify_engine(good)
    bad = _as_full_tensorrt(converted[1], tmp_path / "bad", version="10.16.1.11", version_compatible="yes")
    with pytest.raises(AdafuseError) as python:
        verify_engine(bad)
    with pytest.raises(AdafuseError) as cpp:
        verify_manifest(bad)
    assert str(python.value) == str(cpp.value) == \
        f"{bad.with_suffix('.json')}: 'engine.version_compatible' must be bool, found str \"yes\""


@pytest.fixture
def pip_lean_runtime(monkeypatch) -> tuple[Path, str]:
    """(libnvinfer_lean.so.10 of pip's tensorrt-lean-cu13-libs, its version). Its site-packages is put on $PYTHONPATH,
    one of the places the runtime searches (a venv's, /usr/local's and the wheel-installed runtime's own site-packages
    are others; this interpreter's prefix may be none of them)."""
    from importlib import metadata, util

    # Found, not imported: the package's __init__ loads the library, which the runtime's dlopen of its soname would
    # then get from the process instead of finding it.
    spec = util.find_spec("tensorrt_lean_libs")
    if spec is None or spec.origin is None:
        pytest.skip("tensorrt-lean-cu13-libs is installed by the README's test command")
    folder = Path(spec.origin).parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder.parent), os.environ.get("PYTHONPATH")])))
    return folder / "libnvinfer_lean.so.10", metadata.version("tensorrt-lean-cu13-libs")


def test_pip_lean_runtime_is_found_loaded_and_version_checked(runtime_lib, converted, pip_lean_runtime, tmp_path):
    from adafuse_export.runners import open_runner

    library, version = pip_lean_runtime
    major_minor_patch = ".".join(version.split(".")[:3])
    engine = _as_full_tensorrt(converted[1], tmp_path / "e", version="10.15.1.29")
    with pytest.raises(AdafuseError) as err:
        open_runner(engine, runtime="cpp")
    # The runtime found the wheel's library by itself, loaded it and read its version from getInferLibVersion.
    assert str(err.value) == (f"{engine}: version-compatible engine built with TensorRT 10.15.1.29, but {library} is the lean "
                              f"runtime of TensorRT {major_minor_patch}; its plan leaves the lean runtime out, so it runs on "
                              "the lean runtime of the TensorRT that built it (load TensorRT 10.15.1's libnvinfer_lean, or "
                              "convert it again with this one)")


def test_a_file_that_is_no_engine_is_refused_in_one_line_by_the_lean_runtime(runtime_lib, converted, pip_lean_runtime, tmp_path):
    """Past every check this machine can make. Without a GPU, CUDA refuses before TensorRT is asked for a runtime (the
    lean runtime's createInferRuntime fails CUDA's initialisation here, error 35, and must not be reached); with one,
    the lean runtime refuses to deserialize these bytes."""
    from adafuse_export.runners import open_runner

    _, version = pip_lean_runtime
    engine = _as_full_tensorrt(converted[1], tmp_path / "e", version=version, engine_bytes=b"not a TensorRT plan\n" * 64)
    with pytest.raises(AdafuseError) as err:
        open_runner(engine, runtime="cpp")
    message = str(err.value)
    assert "\n" not in message, message
    gpu = f"{engine}: TensorRT {'.'.join(version.split('.')[:3])}'s lean runtime could not deserialize the engine (built with "
    assert message.startswith(f"CUDA device 0 (running {engine} needs an NVIDIA GPU): ") or message.startswith(gpu), message
