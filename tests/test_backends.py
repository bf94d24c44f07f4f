"""trt/backends.py: the one registry of TensorRT backends, checked against what each backend really is."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from adafuse_export.errors import AdafuseError
from adafuse_export.onnx.builder import FLAVOURS
from adafuse_export.trt import backends

ROOT = Path(__file__).resolve().parents[1]


def test_every_backend_builds_a_known_flavour_and_plugin_backends_name_the_library_cmake_builds():
    cmake = (ROOT / "plugins" / "CMakeLists.txt").read_text()
    library = "lib" + re.search(r"add_library\((\w+) SHARED", cmake).group(1) + ".so"
    for kind in backends.KINDS.values():
        assert kind.flavour in FLAVOURS
        assert kind.plugin_library == (library if kind.flavour == "plugin" else None)


def test_backend_choices_of_the_cli_are_the_registry():
    from adafuse_export.cli import cli

    backend = next(p for p in cli.commands["convert"].params if p.name == "backend")
    # native is not a TensorRT backend: convert writes the C++ runtime's artifact instead of an engine
    assert list(backend.type.choices) == ["auto", "tensorrt", "tensorrt-rtx", "native"] == ["auto", *backends.names(), "native"]


def test_rtx_is_loaded_lazily_from_its_module():
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is installed by .ci/run")
    chosen = backends.select_backend("tensorrt-rtx")
    assert chosen.trt is trt and chosen.version == trt.__version__ and chosen.flavour == "portable"


def test_unknown_and_missing_backends_are_one_line_errors(monkeypatch):
    with pytest.raises(AdafuseError, match=r"^--backend 'tensorrt-llm' is unknown \(expected auto, tensorrt, tensorrt-rtx\)$"):
        backends.select_backend("tensorrt-llm")
    monkeypatch.setattr(backends, "_try_import", lambda name: None)
    with pytest.raises(AdafuseError, match=r"no TensorRT found for --backend auto; install tensorrt: full TensorRT 10 .* "
                                           r"or tensorrt-rtx: pip install 'adafuse-export\[rtx\]'"):
        backends.select_backend("auto")


@pytest.mark.parametrize("cc, rtx", [((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), False), ((10, 0), False),
                                     ((12, 0), True), ((12, 1), True), ((7, 5), False)])
def test_where_engines_run(cc, rtx):
    # TensorRT-RTX 1.7 release notes: Ampere (8.0, 8.6), Ada (8.9) and Blackwell consumer (12.x) GPUs
    assert backends.KINDS["tensorrt-rtx"].runs_on_capability(*cc) == rtx
    assert backends.KINDS["tensorrt"].runs_on_capability(*cc)
    assert backends.builders_for(*cc) == (("tensorrt", "tensorrt-rtx") if rtx else ("tensorrt",))


def test_engine_runner_refuses_an_rtx_engine_on_a_gpu_it_cannot_run(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    from adafuse_export.runners.tensorrt import open_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    with pytest.raises(AdafuseError) as e:
        open_cuda(tmp_path / "m.engine", backends.KINDS["tensorrt-rtx"])
    assert str(e.value) == (f"{tmp_path / 'm.engine'}: TensorRT-RTX engines run on compute capability 8.0, 8.6, 8.9, 12.x; "
                            "this GPU is 9.0 (build with --backend tensorrt for it)")


class _FakeTensorRT:
    """Stands in for an imported `tensorrt` module: what select_backend reads (Builder, __version__)."""

    Builder = object

    def __init__(self, version: str):
        self.__version__ = version


def _installed(monkeypatch, version: str) -> None:
    monkeypatch.setattr(backends, "_try_import", lambda name: _FakeTensorRT(version) if name == "tensorrt" else None)


@pytest.mark.parametrize("requested", ["tensorrt", "auto"])
def test_a_tensorrt_of_another_major_than_the_runtime_is_refused_naming_both(monkeypatch, requested):
    """`pip install tensorrt` gives 11.x today; the runtime and plugins are built for 10 (the default headers)."""
    monkeypatch.setattr("adafuse_export.installation.build_info", lambda: None)
    _installed(monkeypatch, "11.4.0.8")
    with pytest.raises(backends.TensorRTVersionRefused) as e:
        backends.select_backend(requested)
    assert str(e.value) == (
        "TensorRT 11.4.0.8 is installed, but the adafuse runtime and plugin library are built for TensorRT 10.x: install "
        "'tensorrt-cu12==10.*' (or 'tensorrt-cu13==10.*'), or build the plugins and runtime against TensorRT 11 headers "
        "(TENSORRT_ROOT)" + ("; --backend tensorrt-rtx builds without it" if requested == "auto" else ""))
    _installed(monkeypatch, "10.14.1.48")
    assert backends.select_backend(requested).version == "10.14.1.48"


def test_the_runtime_major_is_the_one_of_the_headers_it_was_built_against(monkeypatch):
    monkeypatch.setattr("adafuse_export.installation.build_info", lambda: {"tensorrt_headers": "11.2.0"})
    assert backends.runtime_tensorrt_major() == 11
    _installed(monkeypatch, "11.4.0.8")
    assert backends.select_backend("tensorrt").version == "11.4.0.8"
    _installed(monkeypatch, "10.14.1.48")
    with pytest.raises(backends.TensorRTVersionRefused, match=r"^TensorRT 10\.14\.1\.48 is installed, but .* built for TensorRT 11\.x: "
                                                              r"install 'tensorrt-cu12==11\.\*'"):
        backends.select_backend("tensorrt")
    monkeypatch.setattr("adafuse_export.installation.build_info", lambda: {"tensorrt_headers": ""})  # built without headers
    assert backends.runtime_tensorrt_major() == backends.DEFAULT_TENSORRT_MAJOR == 10


def test_the_install_hint_names_a_tensorrt_the_runtime_accepts():
    hint = backends.KINDS["tensorrt"].install
    assert "'tensorrt-cu12==10.*'" in hint and "'tensorrt-cu13==10.*'" in hint
    assert f"=={backends.DEFAULT_TENSORRT_MAJOR}.*" in hint


def test_convert_refuses_a_tensorrt_11_builder_in_one_line(monkeypatch, cli, example_dirs, tmp_path):
    monkeypatch.setattr("adafuse_export.installation.build_info", lambda: None)
    _installed(monkeypatch, "11.4.0.8")
    out = tmp_path / "out.engine"
    r = cli("convert", example_dirs["pregate"], out)
    assert r.code != 0
    line = r.err.strip()
    assert "\n" not in line and "Traceback" not in r.err, r.err
    assert line.endswith("TensorRT 11.4.0.8 is installed, but the adafuse runtime and plugin library are built for TensorRT 10.x: "
                         "install 'tensorrt-cu12==10.*' (or 'tensorrt-cu13==10.*'), or build the plugins and runtime against "
                         "TensorRT 11 headers (TENSORRT_ROOT); --backend tensorrt-rtx builds without it"), r.err
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize("name, version, want", [
    ("tensorrt", "10.14.1.48", "copy"), ("tensorrt", "10.15.1.29", "in-place"), ("tensorrt", "10.16.1.11", "in-place"),
    ("tensorrt", "unknown", "copy"), ("tensorrt-rtx", "1.7.1.116", "copy"), ("tensorrt-rtx", "10.16.0.1", "copy")])
def test_the_kv_cache_is_updated_in_place_from_tensorrt_10_15(name, version, want):
    assert backends.Backend(name, None, version).kv_update == want


@pytest.mark.parametrize("version, choice, in_place", [("10.15.1.29", "auto", True), ("10.14.1.48", "auto", False),
                                                      ("10.15.1.29", "copy", False), ("10.16.1.11", "in-place", True)])
def test_convert_exports_the_kv_form_of_the_installed_tensorrt_and_records_it(monkeypatch, example_dirs, tmp_path,
                                                                             version, choice, in_place):
    """convert --backend tensorrt: the export (and its validation in ONNX Runtime) is the in-place form for a builder
    that updates the cache in place, and the manifest says so; the builder itself is a stand-in (no TensorRT here)
    that is handed the exported graph and describes its tensors as the real build does."""
    import json

    import onnx

    from adafuse_export.convert import convert
    from adafuse_export.onnx.graph import ELEM_NAMES
    from adafuse_export.trt import build

    monkeypatch.setattr("adafuse_export.installation.build_info", lambda: None)
    _installed(monkeypatch, version)
    built = []

    def stand_in_build(backend, onnx_path, **kw):
        model = onnx.load(str(onnx_path), load_external_data=False)
        built.append(model)

        def described(values):
            return [{"name": v.name, "dtype": ELEM_NAMES[v.type.tensor_type.elem_type],
                     "shape": [d.dim_value if d.dim_value else -1 for d in v.type.tensor_type.shape.dim]} for v in values]
        return b"stand-in engine", {"inputs": described(model.graph.input), "outputs": described(model.graph.output),
                                    "profiles": [{"index": 0, "name": "prefill", "shapes": {}},
                                                 {"index": 1, "name": "decode", "shapes": {}}]}
    monkeypatch.setattr(build, "build_engine", stand_in_build)
    plugin = tmp_path / "libadafuse_trt_plugins.so"
    plugin.write_bytes(b"stand-in")
    out = tmp_path / "out.engine"
    logs: list[str] = []
    manifest = convert(example_dirs["pregate"], out, backend="tensorrt", max_seq=24, plugin_library=plugin,
                       kv_update=choice, log=logs.append)
    assert manifest["engine"].get("kv_in_place", False) is in_place
    assert json.loads(out.with_suffix(".json").read_text())["engine"].get("kv_in_place", False) is in_place
    exported = json.loads((out.with_suffix(".onnx") / "manifest.json").read_text())
    assert exported["kv_update"] == ("in-place" if in_place else "copy")
    cache = next(v for v in built[0].graph.input if v.name == "past_key_values.0.key").type.tensor_type.shape.dim[2]
    assert (cache.dim_value, cache.dim_param) == ((24, "") if in_place else (0, "cache_len"))
    assert any(n.op_type == "TensorScatter" for n in built[0].graph.node) == in_place
    assert any(line.strip().startswith("PASSED") for line in logs), logs  # stage 3 validated the form exported
    assert any("updates the KV cache in place" in line for line in logs) == in_place


def test_kv_update_in_place_is_refused_where_the_backend_cannot(monkeypatch, cli, example_dirs, tmp_path):
    """--kv-update in-place with a TensorRT older than 10.15, or with --backend native: one line, nothing written."""
    monkeypatch.setattr("adafuse_export.installation.build_info", lambda: None)
    _installed(monkeypatch, "10.14.1.48")
    plugin = tmp_path / "libadafuse_trt_plugins.so"
    plugin.write_bytes(b"stand-in")
    for args, want in [
            (("out.engine", "--backend", "tensorrt", "--plugin-lib", str(plugin), "--kv-update", "in-place"),
             "--kv-update in-place: tensorrt 10.14.1.48 cannot update a cache in place (its parser must import "
             "TensorScatter as IKVCacheUpdateLayer: full TensorRT 10.15 or newer); use --kv-update copy or auto"),
            (("out.native", "--backend", "native", "--kv-update", "copy"),
             "--kv-update copy: not an option of --backend native (its runtime owns one cache per sequence slot and "
             "writes it in place)")]:
        out = tmp_path / args[0]
        r = cli("convert", example_dirs["pregate"], out, *args[1:])
        assert r.code != 0 and "Traceback" not in r.err, r.err
        assert r.err.strip().endswith(want), r.err
        assert not out.exists() and not out.with_suffix(".json").exists()
