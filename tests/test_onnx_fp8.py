"""ONNX export with FP8 weights (`convert --weights fp8`, export_onnx(weights="fp8")) on the CPU: the float8e4m3fn
initializers and their DequantizeLinear against quantize.py bit for bit (ONNX Runtime computing it), validate of the
export against its FP8 twin with the quantization's effect reported, tampered scales refused, the plugin nodes'
FP8 inputs. What never runs here: TensorRT building or running an engine from these graphs with the adafuse plugin,
and any GPU execution (tests/test_plugins.py has the plugin's CPU contract, plugins/harness its GPU cases)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from adafuse_export.converters import load_checkpoint
from adafuse_export.errors import AdafuseError
from adafuse_export.fp8_twin import load_fp8_twin, stores_fp8
from adafuse_export.native_artifact import stages
from adafuse_export.onnx import plugin_ops
from adafuse_export.onnx.export import export_onnx
from adafuse_export.quantize import dequantize_fp8, quantize_fp8_per_channel
from adafuse_export.reference import ReferenceModel
from adafuse_export.validate import validate
from adafuse_export.weights import base_weight


def projections(ckpt):
    """(weight name, static site or None) of every projection the export quantizes."""
    for st in stages(ckpt):
        for x in st.members:
            yield (f"{ckpt.model.arch.weight_prefix(st.layer, x.module)}.weight",
                   x.site if x.site is not None and x.site.static else None)


def dequantized_by_onnxruntime(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """The outputs of the graph's own DequantizeLinear nodes of `names`, run by ONNX Runtime's CPU provider."""
    nodes = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in names]
    inits = [t for t in model.graph.initializer if t.name in {i for n in nodes for i in n.input}]
    outs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes]
    g = helper.make_graph(nodes, "dq", [], outs, inits)
    sub = helper.make_model(g, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    return {n.input[0]: v for n, v in zip(nodes, sess.run([o.name for o in outs], {}))}


# lora: static LoRAs merged into q and v before quantization; mixlora: routed FFN experts in MixLoRA slots
@pytest.mark.parametrize("kind", ["pregate", "lora", "mixlora"])
def test_dequantize_linear_is_quantize_py_bit_for_bit(example_dirs, tmp_path, kind):
    ckpt = load_checkpoint(example_dirs[kind])
    manifest = export_onnx(ckpt, tmp_path / "o", "portable", "float16", weights="fp8")
    assert manifest["weights"] == "fp8_e4m3" and manifest["opset"] == 19
    model = onnx.load(str(tmp_path / "o" / "decoder.onnx"))
    assert {o.domain: o.version for o in model.opset_import}[""] == 19
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["adafuse.weights"] == "fp8_e4m3" and meta["adafuse.fp8_quantized_from"] == "float16"
    inits = {t.name: t for t in model.graph.initializer}
    names = dict(projections(ckpt))
    got = dequantized_by_onnxruntime(model, list(names))
    assert set(got) == set(names)  # every projection, each through its DequantizeLinear
    for name, site in names.items():
        q, scale = quantize_fp8_per_channel(base_weight(ckpt, name, torch.float16, site), name)
        stored = inits[name]
        assert stored.data_type == TensorProto.FLOAT8E4M3FN and list(stored.dims) == list(q.shape)
        assert stored.raw_data == q.view(torch.uint8).numpy().tobytes(), name
        assert np.array_equal(numpy_helper.to_array(inits[f"{name}_scale"]), scale.numpy()), name
        assert np.array_equal(got[name].view(np.uint32), dequantize_fp8(q, scale, torch.float32).numpy().view(np.uint32)), name
    # what a Gemm reads: the DequantizeLinear's float32 cast to the model dtype
    consumers = {n.input[0]: n for n in model.graph.node if n.op_type == "Cast"}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            assert [a.i for a in n.attribute if a.name == "axis"] == [0]
            assert consumers[n.output[0]].attribute[0].i == TensorProto.FLOAT16


def test_fp8_export_validates_against_its_twin_and_reports_the_quantization(example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs["lora"])
    export_onnx(ckpt, tmp_path / "o", "portable", "float32", weights="fp8", quantize_from="bfloat16")
    decoder = tmp_path / "o" / "decoder.onnx"
    assert stores_fp8(decoder)
    report = validate(ckpt, decoder, [[3, 1, 4, 1, 5]], steps=3)
    assert report["passed"], report
    assert "FP8 twin" in report["reference"]
    q = report["quantization"]
    assert q["weights"] == "fp8_e4m3" and 0 < q["max_abs_diff"] < 1
    assert q["greedy_agreement"]["total"] == 5 + 3 and 0 <= q["greedy_agreement"]["fraction"] <= 1
    # the graph is far closer to its twin than the quantization moved the logits
    logits = next(o for o in report["outputs"] if o["name"] == "logits")
    assert logits["max_abs_diff"] < q["max_abs_diff"] / 100
    # layerwise: the streaming twin and the per-layer subgraphs give the same verdict
    streamed = validate(ckpt, decoder, [[3, 1, 4, 1, 5]], steps=1, mode="layerwise")
    assert streamed["passed"] and streamed["quantization"]["max_abs_diff"] == pytest.approx(q["max_abs_diff"], abs=0.05)


def test_twin_of_the_export_equals_the_native_artifacts_twin(example_dirs, tmp_path):
    """Per-output-channel scales: the export's per-projection quantization is the native artifact's stacked one."""
    from adafuse_export import native_artifact as native

    ckpt = load_checkpoint(example_dirs["pregate"])
    export_onnx(ckpt, tmp_path / "o", "portable", "bfloat16", weights="fp8")
    (tmp_path / "a.native").mkdir()
    native.write_artifact(ckpt, tmp_path / "a.native", "bfloat16", max_batch=1, max_seq=16, weights="fp8")
    a, b = ReferenceModel(ckpt, dtype=torch.float32), ReferenceModel(ckpt, dtype=torch.float32)
    assert load_fp8_twin(a, tmp_path / "o" / "decoder.onnx") and load_fp8_twin(b, tmp_path / "a.native")
    assert isinstance(a.w, dict) and isinstance(b.w, dict)
    for name, _ in projections(ckpt):
        # the ONNX twin dequantizes in float32 (as DequantizeLinear), the native one in float64: within a float32 ulp
        assert torch.allclose(a.w[name].double(), b.w[name].double(), rtol=2 ** -23, atol=0), name


@pytest.mark.parametrize("how", ["scale", "matrix", "negative", "missing"])
def test_a_tampered_fp8_initializer_is_refused(example_dirs, tmp_path, cli, how):
    ckpt = load_checkpoint(example_dirs["pregate"])
    export_onnx(ckpt, tmp_path / "o", "portable", "float16", weights="fp8")
    path = tmp_path / "o" / "decoder.onnx"
    model = onnx.load(str(path))
    name = "model.layers.1.mlp.down_proj.weight"
    inits = {t.name: t for t in model.graph.initializer}
    if how in ("scale", "negative"):
        s = numpy_helper.to_array(inits[f"{name}_scale"]).copy()
        s[3] = s[3] * 2 if how == "scale" else -s[3]
        inits[f"{name}_scale"].CopyFrom(numpy_helper.from_array(s, f"{name}_scale"))
    elif how == "matrix":
        raw = bytearray(inits[name].raw_data)
        raw[5] ^= 0x01
        inits[name].raw_data = bytes(raw)
    else:
        model.graph.initializer.remove(inits[f"{name}_scale"])
    onnx.save(model, str(path))
    expected = {"scale": f"'{name}_scale' differs from the quantization", "matrix": f"'{name}' differs from the quantization",
                "negative": f"'{name}_scale' holds", "missing": f"'{name}_scale' is not a graph input"}[how]  # ONNX Runtime refuses the graph first
    with pytest.raises(AdafuseError, match=expected):
        validate(ckpt, path, [[1, 2, 3]], steps=0)
    r = cli("validate", example_dirs["pregate"], tmp_path / "o")
    assert r.code == 2 and expected in r.err and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1


def test_plugin_nodes_take_the_fp8_weight_and_its_scales(example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs["pregate"])
    manifest = export_onnx(ckpt, tmp_path / "p", "plugin", "float16", weights="fp8")
    assert manifest["custom_ops"]["fields"][-1] == "weight_dtype" and manifest["custom_ops"]["inputs"][-1] == "weight_scale"
    model = onnx.load(str(tmp_path / "p" / "decoder.onnx"))
    types = {t.name: t.data_type for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.domain == plugin_ops.DOMAIN]
    assert nodes
    for n in nodes:
        f = plugin_ops.node_fields(n)
        assert f["weight_dtype"] == plugin_ops.WEIGHT_FP8_E4M3
        assert len(n.input) == plugin_ops.nb_inputs(f["has_bias"], f["weight_dtype"])
        assert types[n.input[plugin_ops.W]] == TensorProto.FLOAT8E4M3FN
        assert n.input[plugin_ops.weight_scale_index(f["has_bias"])] == n.input[plugin_ops.W] + "_scale"
    # no DequantizeLinear feeds a plugin node (TensorRT would fold it into a 16-bit constant)
    dq_out = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert not any(i in dq_out for n in nodes for i in n.input)
    # the graph runs in ONNX Runtime (adafuse nodes as Python ops over the dequantized W) and matches its twin
    report = validate(ckpt, tmp_path / "p" / "decoder.onnx", [[5, 4, 3]], steps=1)
    assert report["passed"] and report["quantization"] is not None


def test_fp8_refusals_are_one_line(example_dirs, tmp_path, cli):
    r = cli("convert", example_dirs["pregate"], tmp_path / "m.engine", "--weights", "fp8", "--dtype", "float32")
    assert r.code == 2 and "--weights fp8 keeps the activations in --dtype" in r.err and "Traceback" not in r.err
    with pytest.raises(AdafuseError, match="--strategy switch"):
        export_onnx(load_checkpoint(example_dirs["pregate"]), tmp_path / "s", "plugin", "float16", weights="fp8",
                    strategy="switch")
    export_onnx(load_checkpoint(example_dirs["pregate"]), tmp_path / "d", "portable", "float32")
    r = cli("validate", example_dirs["pregate"], tmp_path / "d", "--min-greedy-agreement", "0.9")
    assert r.code == 2 and "does not hold FP8 weights" in r.err


def test_convert_records_fp8_in_the_export_and_engine_manifests(example_dirs, tmp_path, cli):
    """convert --weights fp8 through the ONNX path: the export, its validation; the engine where a TensorRT is
    installed (TensorRT-RTX builds on the CPU), its manifest then records the weights."""
    r = cli("convert", example_dirs["pregate"], tmp_path / "m.engine", "--weights", "fp8", "--dtype", "bfloat16")
    assert "FP8 quantization" in r.out and "exporting portable ONNX (bfloat16, FP8 e4m3 base weights)" in r.out, r.err
    assert json.loads((tmp_path / "m.onnx" / "manifest.json").read_text())["weights"] == "fp8_e4m3"
    if r.code == 0:
        engine = json.loads((tmp_path / "m.json").read_text())["engine"]
        assert engine["weights"] == "fp8_e4m3" and "FP8 weights: compute capability 8.9" in engine["runs_on"]
    else:
        assert "no TensorRT installed" in r.err, r.err


def test_export_onnx_cli_writes_fp8_weights(example_dirs, tmp_path, cli):
    r = cli("export-onnx", example_dirs["lora"], tmp_path / "o", "--dtype", "bfloat16", "--weights", "fp8")
    assert r.code == 0 and "(FP8 e4m3 base weights)" in r.out, r.err
    assert stores_fp8(tmp_path / "o") and json.loads((tmp_path / "o" / "manifest.json").read_text())["weights"] == "fp8_e4m3"
    r = cli("export-onnx", example_dirs["lora"], tmp_path / "p", "--weights", "fp8")  # default --dtype float32
    assert r.code == 2 and "--weights fp8 keeps the activations in --dtype" in r.err and not (tmp_path / "p").exists()
