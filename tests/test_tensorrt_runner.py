"""The TensorRT runner around what cannot run here (an engine needs a GPU it was built for).

Engines are real TensorRT-RTX builds of the example checkpoints (`convert`, on the CPU); the
runtime objects are the doubles of tests/trt_doubles.py, whose API is checked against the real
tensorrt_rtx classes below and whose context executes the engine's own ONNX graph. `validate`
then compares the runner with the PyTorch reference exactly as it would on a GPU.
"""
from __future__ import annotations

import inspect
import json
import re

import numpy as np
import pytest
import torch

from adafuse_export import installation
from adafuse_export.convert import convert
from adafuse_export.converters import load_checkpoint
from adafuse_export.errors import AdafuseError
from adafuse_export.runners import tensorrt as trt_runner
from adafuse_export.runners.base import ModelInfo, Runner
from adafuse_export.trt.manifest import sha256_file, verify_engine
from adafuse_export.validate import validate
from trt_doubles import (DOUBLES, RecordingPluginRegistry, RecordingStream, RecordingTrtEngine,
                         RecordingTrtRuntime)

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is installed by .ci/run; its builder runs on the CPU")
RUNNER_STREAM, TORCH_STREAM = 7, 0


def _overloads(method, name: str) -> list[list[str]]:
    """Parameter names (without self) of every overload in a pybind11 docstring."""
    out = []
    for params in re.findall(rf"^\s*(?:\d+\. )?{name}\((.*)\) ->", method.__doc__ or "", re.M):
        names = [p.split(":")[0].strip() for p in params.split(", ") if p.strip()]
        out.append([n for n in names if n not in ("self", "*args", "**kwargs")])
    return [o for o in out if o]


@pytest.mark.parametrize("double", list(DOUBLES), ids=lambda d: d.__name__)
def test_doubles_have_the_real_tensorrt_api(double):
    real = getattr(trt, DOUBLES[double])
    methods = [n for n, v in vars(double).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))]
    assert methods
    for name in methods:
        assert hasattr(real, name), f"{real.__name__} has no {name}"
        if isinstance(vars(double)[name], property):
            assert isinstance(getattr(real, name), property), f"{real.__name__}.{name} is not a property"
            continue
        mine = [p for p in inspect.signature(getattr(double, name)).parameters if p != "self"]
        assert mine in _overloads(getattr(real, name), name), f"{double.__name__}.{name}{mine} vs {real.__name__}"


def test_recording_stream_has_the_torch_stream_api():
    for name in ("wait_stream", "synchronize"):
        mine = list(inspect.signature(getattr(RecordingStream, name)).parameters)
        assert mine == list(inspect.signature(getattr(torch.cuda.Stream, name)).parameters)


@pytest.fixture(scope="module")
def engines(example_dirs, tmp_path_factory):
    """Real TensorRT-RTX engines (float32): pre-gate with a routing table, pre-gate inside the decoder
    (int32 expert_ids and float32 gates outputs), layer-routed."""
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for kind in ("pregate", "pregate-ffn", "mola"):
        out[kind] = root / f"{kind}.engine"
        convert(example_dirs[kind], out[kind], backend="tensorrt-rtx", dtype="float32", max_batch=2, max_seq=64,
                log=lambda s: None)
    return out


def open_runner(monkeypatch, engine, calls, fail=None):
    """TensorRTRunner(engine) with the doubles in place of the GPU and the TensorRT runtime."""
    double = RecordingTrtEngine(trt, engine.with_suffix(".onnx") / "decoder.onnx", verify_engine(engine), calls, fail)
    monkeypatch.setattr(trt, "Runtime", lambda logger: RecordingTrtRuntime(logger, double))
    placement = trt_runner.Placement(torch.device("cpu"), RecordingStream(calls, RUNNER_STREAM),
                                     lambda: RecordingStream(calls, TORCH_STREAM))
    monkeypatch.setattr(trt_runner, "open_cuda", lambda engine, backend: placement)
    return trt_runner.TensorRTRunner(engine)


def test_a_version_compatible_engine_is_deserialized_by_the_lean_runtime(engines, monkeypatch, tmp_path):
    """The plan leaves the lean runtime out: the runner loads TensorRT's lean runtime of the engine's version
    (pip's tensorrt_lean_libs) through Runtime.load_runtime and deserializes with it."""
    import shutil

    src = engines["pregate"]
    shutil.copytree(src.parent, tmp_path / "e")
    engine = tmp_path / "e" / src.name
    for other in (tmp_path / "e").glob("*.engine"):
        if other != engine:
            other.unlink()
    manifest = json.loads(engine.with_suffix(".json").read_text())
    manifest["engine"]["version_compatible"] = True
    engine.with_suffix(".json").write_text(json.dumps(manifest))
    version = manifest["engine"]["backend_version"]
    lean = tmp_path / "site" / "tensorrt_lean_libs"
    lean.mkdir(parents=True)
    (lean / "__init__.py").write_text("")
    (lean / f"libnvinfer_lean.so.{version.split('.')[0]}").write_bytes(b"stand-in")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    calls: list = []
    double = RecordingTrtEngine(trt, engine.with_suffix(".onnx") / "decoder.onnx", verify_engine(engine), [])
    parent = RecordingTrtRuntime(None, double, calls)
    monkeypatch.setattr(trt, "Runtime", lambda logger: parent)
    placement = trt_runner.Placement(torch.device("cpu"), RecordingStream([], RUNNER_STREAM),
                                     lambda: RecordingStream([], TORCH_STREAM))
    monkeypatch.setattr(trt_runner, "open_cuda", lambda engine, backend: placement)
    runner = trt_runner.TensorRTRunner(engine)
    assert calls[0] == ("load_runtime", str(lean / f"libnvinfer_lean.so.{version.split('.')[0]}"))
    assert calls[1][0] == "deserialize_cuda_engine" and calls[1][1] is runner.runtimes[-1] is not parent
    assert runner.runtimes[0] is parent  # kept: the lean runtime is the parent's
    assert runner.prefill(np.array([[1, 2, 3]])).logits.shape[:2] == (1, 3)
    # Refused in one line when TensorRT does not load it, or when there is none.
    monkeypatch.setattr(trt, "Runtime", lambda logger: RecordingTrtRuntime(None, double, [], loads=False))
    with pytest.raises(AdafuseError, match=f"^{engine}: TensorRT could not load its lean runtime {lean}/libnvinfer_lean"):
        trt_runner.TensorRTRunner(engine)
    (lean / f"libnvinfer_lean.so.{version.split('.')[0]}").unlink()
    monkeypatch.setattr(trt_runner, "LEAN_FOLDERS", ("tensorrt_lean_libs",))
    with pytest.raises(AdafuseError, match=f"^{engine}: a version-compatible engine runs on TensorRT's lean runtime "
                                           r"\(libnvinfer_lean\.so\.\d+\), found in none of this Python's tensorrt_lean_libs"):
        trt_runner.TensorRTRunner(engine)


@pytest.mark.parametrize("kind", ["pregate", "pregate-ffn", "mola"])
def test_validate_an_engine_through_the_runner(kind, engines, example_dirs, monkeypatch):
    # before the runner contract, validate read runner.vocab_size / needs_routes, which
    # TensorRTRunner never set: AttributeError on any GPU
    runner = open_runner(monkeypatch, engines[kind], [])
    assert runner.info.model == engines[kind] and runner.info.needs_routes == (kind == "pregate")
    report = validate(load_checkpoint(example_dirs[kind]), engines[kind], steps=4, runner=runner)
    assert report["passed"], report
    assert report["runner"] == "tensorrt" and report["model"] == str(engines[kind])
    assert report["greedy_agreement"]["fraction"] == 1.0
    names = {o["name"] for o in report["outputs"]}
    assert ("expert_ids" in names) == (kind != "mola")


def test_outputs_take_the_engines_dtypes(engines, monkeypatch):
    runner = open_runner(monkeypatch, engines["pregate-ffn"], [])
    assert runner.session.dtypes["expert_ids"] == torch.int32 and runner.session.dtypes["gates"] == torch.float32
    out = runner.session.run(_feed(runner, np.array([[3, 4, 5]])), 0)
    assert out["expert_ids"].dtype == torch.int32 and out["gates"].dtype == torch.float32
    assert out["logits"].dtype == torch.float32 and list(out["expert_ids"].shape) == [1, 3, 2]
    assert out["present.0.key"].dtype == torch.float32 and out["present.0.key"].shape[2] == 3


def _feed(runner, ids):
    t = torch.as_tensor(ids)
    b, s = t.shape
    feed = {"input_ids": t, "past_lengths": torch.zeros(b, dtype=torch.int64), "seq_lens": torch.full((b,), s)}
    for name in runner.session.inputs:
        if name.startswith("past_key_values."):
            _, kv, _, d = runner.session.shapes[name]
            feed[name] = torch.zeros(b, kv, s, d)
    return feed


def test_call_order(engines, monkeypatch):
    calls: list = []
    runner = open_runner(monkeypatch, engines["pregate"], calls)
    start = len(calls)
    runner.prefill(np.array([[1, 2, 3]]))
    step = [c[0] for c in calls[start:]]
    assert calls[start] == ("set_optimization_profile_async", 0, RUNNER_STREAM)
    inputs = runner.session.inputs
    assert sorted(c[1] for c in calls[start:] if c[0] == "set_input_shape") == sorted(inputs)
    first_output = step.index("get_tensor_shape")  # every input shape is set before an output shape is read
    assert all(i < first_output for i, c in enumerate(step) if c == "set_input_shape")
    assert sorted(c[1] for c in calls[start:] if c[0] == "set_tensor_address") == sorted(inputs + runner.session.outputs)
    wait, execute = step.index("wait_stream"), step.index("execute_async_v3")
    assert calls[start + wait] == ("wait_stream", TORCH_STREAM) and calls[start + execute] == ("execute_async_v3", RUNNER_STREAM)
    assert wait < execute < step.index("synchronize") and wait > max(i for i, c in enumerate(step) if c == "set_tensor_address")
    start = len(calls)
    runner.decode(np.array([[4]]))
    assert calls[start] == ("set_optimization_profile_async", 1, RUNNER_STREAM)
    assert ("set_input_shape", "past_key_values.0.key", (1, 2, 64, 16)) in calls[start:]  # the whole cache: max_seq


@pytest.mark.parametrize("method, message", [
    ("set_optimization_profile_async", "TensorRT refused optimization profile 0"),
    ("set_input_shape", "TensorRT refused input 'input_ids' of shape [1, 3]"),
    ("set_tensor_address", "TensorRT refused the address of input 'input_ids'"),
    ("execute_async_v3", "TensorRT refused execute_async_v3"),
])
def test_false_returns_are_errors(method, message, engines, monkeypatch):
    runner = open_runner(monkeypatch, engines["mola"], [], fail=method)
    with pytest.raises(AdafuseError, match=re.escape(f"{engines['mola']}: {message}")):
        runner.prefill(np.array([[1, 2, 3]]))


def test_shape_outside_the_profile_and_no_context(engines, monkeypatch):
    runner = open_runner(monkeypatch, engines["mola"], [])
    with pytest.raises(AdafuseError, match=r"input 'input_ids' of shape \[3, 2\] \(outside profile 0's range\?\)"):
        runner.prefill(np.ones((3, 2), np.int64))  # built with --max-batch 2
    with pytest.raises(AdafuseError, match=r"0 cached \+ 65 new tokens exceed the engine's max seq 64"):
        runner.prefill(np.arange(65)[None])  # built with --max-seq 64
    with pytest.raises(AdafuseError, match="could not create an execution context"):
        open_runner(monkeypatch, engines["mola"], [], fail="create_execution_context")


def test_routing_table_ids_are_checked_at_load(engines, monkeypatch, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    engine = tmp_path / "pregate.engine"
    for suffix in (".engine", ".json", ".onnx"):
        src = engines["pregate"].with_suffix(suffix)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, engine.with_suffix(suffix))
    routes = engine.with_suffix(".onnx") / "routes.safetensors"
    table = load_file(str(routes))
    table["expert_ids"][17, 1] = 9  # 4 experts
    save_file(table, str(routes))
    manifest = json.loads(engine.with_suffix(".json").read_text())
    manifest["files"]["pregate.onnx/routes.safetensors"] = sha256_file(routes)  # a consistent but wrong table
    engine.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.raises(AdafuseError, match=r"routes.safetensors: 'expert_ids': expert id 9 is out of range \[0, 4\)"):
        open_runner(monkeypatch, engine, [])


def test_dtype_mapping_uses_the_real_enum():
    for member, name in trt_runner.TORCH_DTYPES.items():
        assert trt_runner.torch_dtype(trt, getattr(trt.DataType, member)) == getattr(torch, name)
    with pytest.raises(AdafuseError, match="has no torch equivalent"):
        trt_runner.torch_dtype(trt, trt.DataType.FP8)


def test_plugin_library_load_is_checked(monkeypatch, tmp_path):
    calls: list = []
    plugin = {"library": "libadafuse_trt_plugins.so", "name": "AdafuseLoraLinear"}
    monkeypatch.delenv("ADAFUSE_PLUGIN_LIB", raising=False)
    double = type("Trt", (), {"get_plugin_registry": staticmethod(lambda: RecordingPluginRegistry(calls, None))})
    monkeypatch.setattr(installation, "native_roots", lambda: [])  # an installation without the native build
    with pytest.raises(AdafuseError, match="which this installation does not ship; set ADAFUSE_PLUGIN_LIB to its path"):
        trt_runner.load_plugin_library(double, tmp_path / "x.engine", plugin)
    shipped = tmp_path / "_native" / "lib" / "libadafuse_trt_plugins.so"  # the wheel's: used without a variable
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b"\x7fELF")
    monkeypatch.setattr(installation, "native_roots", lambda: [tmp_path / "_native"])
    with pytest.raises(AdafuseError, match=f"^{re.escape(str(shipped))}: TensorRT could not load"):
        trt_runner.load_plugin_library(double, tmp_path / "x.engine", plugin)
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setenv("ADAFUSE_PLUGIN_LIB", str(lib))
    with pytest.raises(AdafuseError, match=f"ADAFUSE_PLUGIN_LIB={re.escape(str(lib))}: TensorRT could not load"):
        trt_runner.load_plugin_library(double, tmp_path / "x.engine", plugin)
    assert calls == [("load_library", str(shipped)), ("load_library", str(lib))]
    loaded = type("Trt", (), {"get_plugin_registry": staticmethod(lambda: RecordingPluginRegistry(calls, object()))})
    trt_runner.load_plugin_library(loaded, tmp_path / "x.engine", plugin)


def test_a_runner_must_describe_its_model(tmp_path):
    class Forgetful(Runner):
        def __init__(self):
            pass

        prefill = decode = routes = lambda self, ids: None  # noqa: E731
        past_length = 0

    with pytest.raises(TypeError, match="Forgetful.__init__ must set self.info to a ModelInfo"):
        Forgetful()
    good = dict(model=tmp_path, num_layers=2, vocab_size=256, kv_heads=2, head_dim=16, needs_routes=False,
                dtype="float32", meta={}, description="d")
    ModelInfo(**good)
    with pytest.raises(AdafuseError, match=rf"{re.escape(str(tmp_path))}: kv_heads is 'kv' in this model, expected a positive"):
        ModelInfo(**dict(good, kv_heads="kv"))
    with pytest.raises(AdafuseError, match="dtype is 'half' in this model, expected one of float32"):
        ModelInfo(**dict(good, dtype="half"))
    with pytest.raises(TypeError):
        ModelInfo(**{k: v for k, v in good.items() if k != "needs_routes"})


def test_decode_past_the_engines_max_seq_is_refused(engines, monkeypatch):
    runner = open_runner(monkeypatch, engines["mola"], [])
    runner.prefill(np.arange(63)[None])
    runner.decode(np.array([[1]]))  # position 63: the last one the profiles allow
    with pytest.raises(AdafuseError, match=r"64 cached \+ 1 new tokens exceed the engine's max seq 64 \(its profiles"):
        runner.decode(np.array([[1]]))


def test_an_in_place_engine_binds_each_present_to_its_past(cli, example_dirs, engines, monkeypatch, tmp_path):
    """engine.kv_in_place: present.{l} is bound to the memory of past_key_values.{l} (one cache; the double's context
    writes its outputs where they are bound, as TensorRT's in-place layer does). The engine is a TensorRT-RTX build of
    the plain-LoRA example described as in-place, its context running the in-place export (whose plugin flavour has no
    adafuse node, so ONNX Runtime runs it as is); validate compares it with the reference."""
    from adafuse_export.onnx.export import export_onnx

    engine, graph = tmp_path / "lora.engine", tmp_path / "in-place"
    convert(example_dirs["lora"], engine, backend="tensorrt-rtx", dtype="float32", max_batch=2, max_seq=64,
            log=lambda s: None)
    export_onnx(load_checkpoint(example_dirs["lora"]), graph, "plugin", "float32", kv_update="in-place", cache_len=64)
    manifest = json.loads(engine.with_suffix(".json").read_text())
    manifest["engine"]["kv_in_place"] = True
    engine.with_suffix(".json").write_text(json.dumps(manifest))
    assert "updated in place (present bound to the past's memory)" in cli("inspect", engine).out
    assert "copied each step (two buffers)" in cli("inspect", engines["pregate"]).out

    def opened(decoder):
        double = RecordingTrtEngine(trt, decoder, verify_engine(engine), [])
        monkeypatch.setattr(trt, "Runtime", lambda logger: RecordingTrtRuntime(logger, double))
        placement = trt_runner.Placement(torch.device("cpu"), RecordingStream([], RUNNER_STREAM),
                                         lambda: RecordingStream([], TORCH_STREAM))
        monkeypatch.setattr(trt_runner, "open_cuda", lambda engine, backend: placement)
        return trt_runner.TensorRTRunner(engine)

    runner = opened(graph / "decoder.onnx")
    assert runner.kv_in_place
    report = validate(load_checkpoint(example_dirs["lora"]), engine, steps=4, runner=runner)
    assert report["passed"] and report["greedy_agreement"]["fraction"] == 1.0, report
    bound = runner.session.context.addresses
    pasts = [n for n in bound if n.startswith("past_key_values.")]
    assert len(pasts) == 2 * runner.info.num_layers
    for past in pasts:
        assert bound["present." + past[len("past_key_values."):]] == bound[past]
    # a copy engine's present has memory of its own
    copy = open_runner(monkeypatch, engines["pregate"], [])
    copy.prefill(np.array([[1, 2, 3]]))
    assert copy.session.context.addresses["present.0.key"] != copy.session.context.addresses["past_key_values.0.key"]
    # an engine said to be in place whose cache axis is dynamic (the copy form's graph) is refused at open
    with pytest.raises(AdafuseError, match=rf"^{engine}: input 'past_key_values.0.key' has shape \[-1, \d+, -1, \d+\]: an "
                                           r"in-place cache \(engine.kv_in_place\) needs a static cache axis of max_seq 64"):
        opened(engine.with_suffix(".onnx") / "decoder.onnx")
