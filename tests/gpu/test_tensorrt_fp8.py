"""FP8 weights on the engine path, on the GPU: `convert --backend tensorrt --weights fp8` (the plugin flavour: each routed
site's AdafuseLoraLinear takes its FP8 W and weight_scale, weight_dtype 1; the other projections DequantizeLinear +
Gemm) builds an engine, and `validate` of that engine (TensorRT's Python API) passes against the FP8 twin, with the
quantization's effect reported. The CPU side of the same path: tests/test_onnx_fp8.py; the plugin's FP8 kernels in
TensorRT's lifecycle: plugins/harness (`bash plugins/harness/run_gpu.sh`).

Needs full TensorRT 10 on an sm_89+ GPU and the plugin library ($ADAFUSE_PLUGIN_LIB, as test_tensorrt_backend.py).
"""
from __future__ import annotations

import json
import os

import pytest

from adafuse_export.cli import main
from adafuse_export.examples import make_example

pytestmark = pytest.mark.tensorrt  # not gpu: `pytest -m gpu` runs where TensorRT is absent


@pytest.mark.parametrize("kind", ["pregate", "mixlora"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fp8_engine_validates_against_its_twin(tmp_path, capsys, kind, dtype):
    plugins = os.environ.get("ADAFUSE_PLUGIN_LIB")
    assert plugins, "set ADAFUSE_PLUGIN_LIB to libadafuse_trt_plugins.so built for this GPU"
    make_example(tmp_path / "ck", kind)
    engine = tmp_path / "m.engine"
    assert main(["convert", str(tmp_path / "ck"), str(engine), "--backend", "tensorrt", "--dtype", dtype,
                 "--weights", "fp8", "--plugin-lib", plugins, "--max-batch", "2", "--max-seq", "64"]) == 0
    manifest = json.loads(engine.with_suffix(".json").read_text())
    assert manifest["engine"]["weights"] == "fp8_e4m3" and manifest["plugin"]["fields"][-1] == "weight_dtype"
    capsys.readouterr()
    code = main(["validate", str(tmp_path / "ck"), str(engine), "--json", "--prompt-ids", "3,1,4,1,5,9",
                 "--steps", "6"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"], report
    assert "FP8 twin" in report["reference"]
    q = report["quantization"]
    assert q is not None and q["weights"] == "fp8_e4m3" and q["greedy_agreement"]["total"] == 6 + 6


def test_fp8_engine_onnx_holds_the_plugin_fp8_inputs(tmp_path):
    """What TensorRT was given: no DequantizeLinear in front of a plugin node (it would fold it to 16-bit W)."""
    import onnx

    plugins = os.environ.get("ADAFUSE_PLUGIN_LIB")
    assert plugins
    make_example(tmp_path / "ck", "pregate")
    engine = tmp_path / "m.engine"
    assert main(["convert", str(tmp_path / "ck"), str(engine), "--backend", "tensorrt", "--dtype", "bfloat16",
                 "--weights", "fp8", "--plugin-lib", plugins, "--validate", "off"]) == 0
    model = onnx.load(str(engine.with_suffix(".onnx") / "decoder.onnx"))
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    nodes = [n for n in model.graph.node if n.domain == "adafuse"]
    assert nodes and not any(i in dq for n in nodes for i in n.input)
