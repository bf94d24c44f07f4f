"""The plugin-flavour graph (adafuse::AdafuseLoraLinear nodes, the graph TensorRT is given) executed by
ONNX Runtime, its adafuse nodes run as Python custom ops (runners/plugin_ops_ort.py, CPU implementation)."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from adafuse_export.converters import load_checkpoint
from adafuse_export.errors import AdafuseError
from adafuse_export.examples import KINDS
from adafuse_export.onnx import plugin_ops
from adafuse_export.onnx.export import export_onnx
from adafuse_export.runners import plugin_op_impl
from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner
from adafuse_export.runners.plugin_ops_ort import PluginGraph
from adafuse_export.validate import validate

ort = pytest.importorskip("onnxruntime")
PROMPTS = [[3, 17, 250, 4, 99, 0, 255, 42], [7, 7, 7, 1]]
ROUTED = [k for k in KINDS if k != "lora"]


@pytest.fixture(scope="module")
def plugin_exports(example_dirs, tmp_path_factory):
    """Plugin-flavour exports of every kind, float32 and float16 (pregate float32 with external data)."""
    root = tmp_path_factory.mktemp("onnx-plugin")
    out = {}
    for kind, path in example_dirs.items():
        for dtype in ("float32", "float16"):
            out[kind, dtype] = root / f"{kind}-{dtype}"
            threshold = 0 if (kind, dtype) == ("pregate", "float32") else 2**40
            export_onnx(load_checkpoint(path), out[kind, dtype], "plugin", dtype, external_data_threshold=threshold)
    return out


def _adafuse_nodes(path):
    return [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.domain == plugin_ops.DOMAIN]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_plugin_graph_matches_reference(kind, dtype, example_dirs, plugin_exports):
    decoder = plugin_exports[kind, dtype] / "decoder.onnx"
    before = hashlib.sha256(decoder.read_bytes()).hexdigest()
    nodes = _adafuse_nodes(decoder)
    assert (len(nodes) > 0) == (kind != "lora")  # plain LoRA is merged at export: no adapter nodes at all
    assert len({n.name for n in nodes}) == len(nodes)  # ONNX Runtime and TensorRT need unique names
    runner = OnnxRuntimeRunner(plugin_exports[kind, dtype], plugin_ops="cpu")
    assert (runner.plugin is not None) == (kind != "lora")
    report = validate(load_checkpoint(example_dirs[kind]), plugin_exports[kind, dtype], PROMPTS, steps=6, runner=runner)
    by_name = {o["name"]: o for o in report["outputs"]}
    assert report["passed"], report
    greedy = report["greedy_agreement"]
    assert greedy["total"] == 14
    if dtype == "float32":
        assert greedy["matched"] == 14 and by_name["logits"]["max_abs_diff"] <= 1e-4, (greedy, by_name["logits"])
    else:  # float16: logits within d of the reference can flip the argmax only where its top-2 margin is < 2d
        margin = 2 * by_name["logits"]["max_abs_diff"]
        assert greedy["matched"] >= 14 - _near_ties(example_dirs[kind], dtype, margin), (greedy, margin)
    if kind.startswith("pregate"):  # routing agreement: every expert id equal to the reference's
        assert by_name["expert_ids"]["mismatched"] == 0 and by_name["expert_ids"]["elements"] > 0
    if runner.plugin is not None:
        assert f"{len(nodes)} adafuse nodes (AdafuseLoraLinear)" in report["runner_description"]
        assert "cpu (numpy, float32 accumulation)" in report["runner_description"]
    assert hashlib.sha256(decoder.read_bytes()).hexdigest() == before  # the file on disk is untouched


@pytest.mark.parametrize("kind", ["pregate", "mixlora"])
def test_switch_strategy_graph_matches_reference(kind, example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs[kind])
    export_onnx(ckpt, tmp_path / "s", "plugin", "float32", strategy="switch")
    assert {n.op_type for n in _adafuse_nodes(tmp_path / "s" / "decoder.onnx")} == {"AdafuseSwitchLinear"}
    report = validate(ckpt, tmp_path / "s", PROMPTS, steps=4, runner=OnnxRuntimeRunner(tmp_path / "s", plugin_ops="cpu"))
    assert report["passed"] and report["greedy_agreement"]["fraction"] == 1.0, report
    assert "adafuse nodes (AdafuseSwitchLinear)" in report["runner_description"]


def _near_ties(ckpt_dir, dtype: str, margin: float) -> int:
    """Steps of validate's trajectory (the reference's greedy tokens) whose top-2 logits differ by < margin."""
    from adafuse_export.runners.reference import ReferenceRunner

    ref, ties = ReferenceRunner(load_checkpoint(ckpt_dir), dtype=dtype), 0
    for prompt in PROMPTS:
        out = ref.prefill(np.array([prompt], dtype=np.int64))
        for step in range(7):
            top2 = np.sort(out.logits[0, -1])[-2:]
            ties += int(top2[1] - top2[0] < margin)
            if step < 6:
                out = ref.decode(out.logits[:, -1].argmax(-1)[:, None].astype(np.int64))
    return ties


def test_bfloat16_plugin_graph_is_refused_with_the_reason(example_dirs, tmp_path):
    # ONNX Runtime's CPU provider has no bfloat16 kernels for the standard ops around the adafuse nodes
    export_onnx(load_checkpoint(example_dirs["mola"]), tmp_path / "bf", "plugin", "bfloat16")
    with pytest.raises(AdafuseError, match=r"ONNX Runtime cannot load this model: .*NOT_IMPLEMENTED"):
        OnnxRuntimeRunner(tmp_path / "bf", plugin_ops="cpu")


@pytest.mark.parametrize("kind", ROUTED)
def test_plugin_graph_equals_portable_graph(kind, example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs[kind])
    export_onnx(ckpt, tmp_path / "portable", "portable", "float32")
    export_onnx(ckpt, tmp_path / "plugin", "plugin", "float32")
    portable = OnnxRuntimeRunner(tmp_path / "portable")
    plugin = OnnxRuntimeRunner(tmp_path / "plugin", plugin_ops="cpu")
    assert portable.plugin is None and plugin.plugin is not None
    ids = np.array([[5, 9, 200, 31, 77], [1, 2, 3, 4, 250]], dtype=np.int64)
    a, b = portable.prefill(ids), plugin.prefill(ids)
    for step in range(3):
        np.testing.assert_allclose(b.logits, a.logits, rtol=1e-4, atol=2e-5, err_msg=f"step {step}")
        assert np.abs(a.logits).max() > 0.1
        nxt = a.logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        a, b = portable.decode(nxt), plugin.decode(nxt)


# ---- the op itself, on one node ---------------------------------------------------------------

ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
NP = {"float32": np.float32, "float16": np.float16}


def _one_node_model(node, dtype: str, shapes: dict[str, tuple]):
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT32 if name == "ids" else TensorProto.FLOAT if name == "gates"
                                            else ELEM[dtype], list(shapes[name])) for name in node.input]
    y = helper.make_tensor_value_info(node.output[0], ELEM[dtype], None)
    graph = helper.make_graph([node], "one_node", inputs, [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(plugin_ops.DOMAIN, 1)])


def run_node(node, feeds: dict, dtype: str, tmp_path, op_type: str = plugin_ops.OP_TYPE):
    """Run one adafuse node through ONNX Runtime as the runner does; returns y."""
    node.op_type = op_type
    model = _one_node_model(node, dtype, {k: v.shape for k, v in feeds.items()})
    plugin = PluginGraph(model, tmp_path / "node.onnx", "cpu")
    options = ort.SessionOptions()
    session = ort.InferenceSession(plugin.session_source(options), options, providers=["CPUExecutionProvider"])
    return plugin.run(session, [node.output[0]], feeds)[0]


def _node(has_bias: bool, **fields):
    names = ["x", "W", "A", "B", "ids", "gates"] + (["bias"] if has_bias else [])
    return plugin_ops.make_node(names, "y", "/layers.3.q_proj/AdafuseLoraLinear", has_bias=has_bias, **fields)


def _random_case(rng, lead, in_f, out_f, E, r, k, has_bias, dtype):
    dt = NP[dtype]
    feeds = {"x": rng.standard_normal(lead + (in_f,)).astype(dt), "W": (0.3 * rng.standard_normal((out_f, in_f))).astype(dt),
             "A": (0.3 * rng.standard_normal((E, r, in_f))).astype(dt), "B": (0.3 * rng.standard_normal((E, out_f, r))).astype(dt),
             "ids": np.stack([rng.permutation(E)[:k] for _ in range(int(np.prod(lead)))]).reshape(lead + (k,)).astype(np.int32),
             "gates": rng.uniform(0.1, 1.0, lead + (k,)).astype(np.float32)}
    if has_bias:
        feeds["bias"] = rng.standard_normal(out_f).astype(dt)
    return feeds


def float64_formula(feeds: dict, scale: float) -> np.ndarray:
    """y[n] = W x[n] + bias + scale * sum_j g[n,j] B[e] (A[e] x[n]), e = ids[n,j], every step in float64."""
    x = feeds["x"].astype(np.float64)
    W, A, B = (feeds[k].astype(np.float64) for k in ("W", "A", "B"))
    y = np.einsum("...i,oi->...o", x, W)
    if "bias" in feeds:
        y += feeds["bias"].astype(np.float64)
    ids, gates = feeds["ids"], feeds["gates"].astype(np.float64)
    for j in range(ids.shape[-1]):
        t = np.einsum("...ri,...i->...r", A[ids[..., j]], x)
        y += scale * gates[..., j, None] * np.einsum("...or,...r->...o", B[ids[..., j]], t)
    return y


CASES = [  # (leading dims of x, in, out, experts, rank, top_k, bias, dtype)
    ((7,), 13, 11, 5, 3, 2, True, "float32"),
    ((2, 3), 9, 17, 4, 5, 3, False, "float32"),
    ((1,), 64, 96, 8, 16, 1, True, "float32"),
    ((4, 1, 3), 5, 7, 3, 2, 3, True, "float32"),
    ((6,), 31, 19, 6, 4, 2, True, "float16"),
    ((3, 2), 12, 20, 4, 8, 4, False, "float16"),
]


@pytest.mark.parametrize("op_type", plugin_ops.OP_TYPES)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[-1]}-k{c[5]}-{'bias' if c[6] else 'nobias'}-{len(c[0])}d" for c in CASES])
def test_op_matches_float64_formula(case, op_type, tmp_path):
    lead, in_f, out_f, E, r, k, has_bias, dtype = case
    rng = np.random.default_rng(CASES.index(case))
    scale = float(np.float32(rng.uniform(0.1, 3.0)))  # not a round number: 6-digit text would not carry it
    feeds = _random_case(rng, lead, in_f, out_f, E, r, k, has_bias, dtype)
    node = _node(has_bias, in_features=in_f, out_features=out_f, num_experts=E, rank=r, top_k=k, scale=scale)
    y = run_node(node, feeds, dtype, tmp_path, op_type)
    want = float64_formula(feeds, scale)
    assert y.dtype == NP[dtype] and y.shape == lead + (out_f,)
    # float32 accumulation of fp32 inputs; float16 adds one rounding of the output (2^-11 relative)
    rtol, atol = (2e-5, 2e-5) if dtype == "float32" else (1e-3, 1e-3)
    np.testing.assert_allclose(y.astype(np.float64), want, rtol=rtol, atol=atol * np.abs(want).max())
    # the LoRA term matters at this tolerance: without it the result is far off
    no_lora = float64_formula(dict(feeds, gates=np.zeros_like(feeds["gates"])), scale)
    assert np.abs(no_lora - want).max() > 100 * atol * np.abs(want).max()


def test_switch_and_lora_ops_agree(tmp_path):
    rng = np.random.default_rng(7)
    feeds = _random_case(rng, (5,), 10, 6, 4, 3, 2, True, "float32")
    fields = dict(in_features=10, out_features=6, num_experts=4, rank=3, top_k=2, scale=0.37)
    ys = [run_node(_node(True, **fields), feeds, "float32", tmp_path, op) for op in plugin_ops.OP_TYPES]
    np.testing.assert_array_equal(ys[0], ys[1])


# ---- bad fields and bad inputs: clear errors naming the node, never a crash -------------------

GOOD = dict(in_features=6, out_features=4, num_experts=3, rank=2, top_k=2, scale=0.5)


def _with_attr(node, name, value):
    for a in node.attribute:
        if a.name == name:
            node.attribute.remove(a)
            break
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))
    return node


@pytest.mark.parametrize("name, value, message", [
    ("top_k", 0, "field 'top_k' expected in [1, num_experts=3], found 0"),
    ("top_k", 4, "field 'top_k' expected in [1, num_experts=3], found 4"),
    ("rank", 0, "field 'rank' expected > 0, found 0"),
    ("in_features", -6, "field 'in_features' expected > 0, found -6"),
    ("num_experts", 2**31, "field 'num_experts' = 2147483648 does not fit the plugin's int32 field"),
    ("scale", float("inf"), "field 'scale' expected a finite float, found inf"),
    ("scale", float("nan"), "field 'scale' expected a finite float, found nan"),
    ("has_bias", 2, "field 'has_bias' expected 0 or 1, found 2"),  # on a node with 7 inputs
    ("scale", 1, "attribute 'scale' has type INT, expected float"),
    ("rank", None, "attributes"),
])
def test_bad_fields_are_refused_naming_the_node(name, value, message, tmp_path):
    node = _with_attr(_node(name == "has_bias", **GOOD), name, value)
    model = _one_node_model(node, "float32", {"x": (2, 6), "W": (4, 6), "A": (3, 2, 6), "B": (3, 4, 2), "ids": (2, 2),
                                              "gates": (2, 2), "bias": (4,)})
    with pytest.raises(AdafuseError) as e:
        PluginGraph(model, tmp_path / "bad.onnx", "cpu")
    assert str(e.value).startswith(f"{tmp_path / 'bad.onnx'}: AdafuseLoraLinear node '/layers.3.q_proj/AdafuseLoraLinear'")
    assert message in str(e.value)


def test_bad_dtype_and_unknown_op_are_refused(tmp_path):
    node = _node(False, **GOOD)
    model = _one_node_model(node, "float32", {"x": (2, 6), "W": (4, 6), "A": (3, 2, 6), "B": (3, 4, 2), "ids": (2, 2), "gates": (2, 2)})
    model.graph.input[2].type.tensor_type.elem_type = TensorProto.FLOAT16  # A
    with pytest.raises(AdafuseError, match=r"input 2 \(A\) expected the dtype of W \(float32\), found FLOAT16"):
        PluginGraph(model, tmp_path / "m.onnx", "cpu")
    model.graph.node[0].op_type = "AdafuseMystery"
    with pytest.raises(AdafuseError, match=r"is adafuse::AdafuseMystery, which no adafuse plugin implements"):
        PluginGraph(model, tmp_path / "m.onnx", "cpu")


@pytest.mark.parametrize("bad_id", [3, -1, 1000])
def test_out_of_range_expert_id_is_an_error_not_a_zero(bad_id, tmp_path):
    rng = np.random.default_rng(1)
    feeds = _random_case(rng, (4,), 6, 4, 3, 2, 2, False, "float32")
    feeds["ids"][2, 1] = bad_id
    with pytest.raises(AdafuseError) as e:
        run_node(_node(False, **GOOD), feeds, "float32", tmp_path)
    assert f"AdafuseLoraLinear node '/layers.3.q_proj/AdafuseLoraLinear': input 4 (expert_ids) holds {bad_id} at [2, 1], " \
           f"outside [0, num_experts=3)" in str(e.value)


def test_inputs_inconsistent_with_fields_are_errors(tmp_path):
    rng = np.random.default_rng(2)
    feeds = _random_case(rng, (4,), 6, 4, 3, 2, 2, False, "float32")
    node = _node(False, **dict(GOOD, rank=3))
    with pytest.raises(AdafuseError, match=r"input 2 \(A\) dimension 1 expected rank=3, found 2 \(shape \[3, 2, 6\]\)"):
        run_node(node, feeds, "float32", tmp_path)
    feeds["gates"] = feeds["gates"][:3]
    with pytest.raises(AdafuseError, match=r"input 5 \(gates\) dimension 0 expected the matching leading dimension of x=4, found 3"):
        run_node(_node(False, **GOOD), feeds, "float32", tmp_path)


def test_runner_reports_op_failures_through_the_runner(example_dirs, tmp_path, monkeypatch):
    """A failing op inside a whole decoder surfaces as an AdafuseError from prefill, naming the node."""
    export_onnx(load_checkpoint(example_dirs["mola"]), tmp_path / "p", "plugin", "float32")
    runner = OnnxRuntimeRunner(tmp_path / "p", plugin_ops="cpu")

    def broken(f, x, *args):
        raise RuntimeError("kernel refused")

    monkeypatch.setitem(plugin_op_impl.IMPLEMENTATIONS, "cpu", broken)
    runner2 = OnnxRuntimeRunner(tmp_path / "p", plugin_ops="cpu")
    with pytest.raises(AdafuseError, match=r"decoder.onnx: AdafuseLoraLinear node '/layers\.0\.q_proj/AdafuseLoraLinear': "
                                           r"kernel refused \(and \d+ more node failure\(s\)\)"):
        runner2.prefill(np.array([[1, 2, 3]], dtype=np.int64))
    assert np.isfinite(runner.prefill(np.array([[1, 2, 3]], dtype=np.int64)).logits).all()  # built before the patch


def test_plugin_ops_cuda_without_gpu_is_a_clear_error(example_dirs, tmp_path, cli):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --plugin-ops cuda runs there (benchmarks/plugin_graph_gpu.py)")
    export_onnx(load_checkpoint(example_dirs["mola"]), tmp_path / "p", "plugin", "float32")
    r = cli("validate", example_dirs["mola"], tmp_path / "p", "--plugin-ops", "cuda")
    assert r.code == 2 and r.err.strip() == "error: --plugin-ops cuda: torch sees no CUDA GPU here; use --plugin-ops cpu"
    r = cli("validate", example_dirs["mola"], tmp_path / "p", "--plugin-ops", "cpu", "--steps", "2")
    assert r.code == 0, r.err
    assert "plugin ops: 6 adafuse nodes (AdafuseLoraLinear) as onnxruntime-extensions" in r.out
    assert "cpu (numpy, float32 accumulation)" in r.out and r.out.strip().endswith("PASSED")


# ---- convert --backend tensorrt validates the plugin graph it hands to TensorRT ----------------

@pytest.fixture
def tensorrt_stand_in(monkeypatch, tmp_path):
    """Full TensorRT does not install here: stand in for its selection and record what would be built."""
    from adafuse_export.trt import backends, build

    built = []

    def build_engine(backend, onnx_path, **kwargs):
        built.append([n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node
                      if n.domain == plugin_ops.DOMAIN])
        raise AdafuseError("no TensorRT builder here")

    monkeypatch.setattr(backends, "select_backend", lambda requested: backends.Backend("tensorrt", None, "stand-in"))
    monkeypatch.setattr(build, "build_engine", build_engine)
    library = tmp_path / "libadafuse_trt_plugins.so"
    library.write_bytes(b"")
    return built, library


def test_convert_tensorrt_validates_the_plugin_graph_before_building(example_dirs, tmp_path, tensorrt_stand_in):
    from adafuse_export.convert import convert

    built, library = tensorrt_stand_in
    log: list[str] = []
    with pytest.raises(AdafuseError, match="no TensorRT builder here"):
        convert(example_dirs["mola"], tmp_path / "m.engine", backend="tensorrt", plugin_library=library, log=log.append)
    assert any("[3/4" in line and "validating the plugin ONNX export" in line for line in log), log
    assert built == [["AdafuseLoraLinear"] * 6]  # stage 4 was reached with the plugin graph


def test_convert_tensorrt_stops_when_the_plugin_graph_is_wrong(example_dirs, tmp_path, tensorrt_stand_in, monkeypatch):
    from adafuse_export.convert import convert

    def base_only(f, x, W, A, B, ids, gates, bias, dtype):  # an op that forgets the adapters
        return plugin_op_impl.round_to(x @ W.T, dtype)

    monkeypatch.setitem(plugin_op_impl.IMPLEMENTATIONS, "cpu", base_only)
    built, library = tensorrt_stand_in
    with pytest.raises(AdafuseError, match=r"the ONNX export does not match the reference \(logits"):
        convert(example_dirs["mola"], tmp_path / "m.engine", backend="tensorrt", plugin_library=library, log=lambda s: None)
    assert built == [] and sorted(p.name for p in tmp_path.iterdir()) == ["libadafuse_trt_plugins.so"]


# ---- benchmarks/plugin_graph_gpu.py: its machinery, with the CPU implementation ----------------

def _gpu_script():
    import benchmark_scripts

    return benchmark_scripts.load("plugin_graph_gpu")


def test_gpu_script_records_what_ran_and_why_not(tmp_path, monkeypatch):
    import json

    script = _gpu_script()
    real = script.check_nodes

    def check_nodes(export, impl, dtype, seed):  # one case breaks: the others must still run
        if dtype == "float16":
            raise RuntimeError("broken case")
        return real(export, impl, dtype, seed)

    monkeypatch.setattr(script, "check_nodes", check_nodes)
    out = tmp_path / "r.json"
    code = script.main([str(out), "--impl", "cpu", "--kinds", "mola", "--dtypes", "float32", "float16", "bfloat16",
                        "--steps", "1"])
    result = json.loads(out.read_text())
    cases = {c["dtype"]: c for c in result["cases"]}
    assert code == 1 and not result["all_passed"] and list(cases) == ["float32", "float16", "bfloat16"]
    f32, f16, bf16 = cases["float32"], cases["float16"], cases["bfloat16"]
    assert f32["graph"]["passed"] and f32["graph"]["greedy"]["fraction"] == 1.0 and f32["graph"]["plugin_nodes"] == 6
    assert f32["nodes"]["passed"] and f32["nodes"]["nodes"] == 6 and f32["nodes"]["max_rel_err"]["cpu"] < 1e-4
    assert f16["error"] == "RuntimeError: broken case"
    assert not bf16["graph"]["ran"] and "NOT_IMPLEMENTED" in bf16["graph"]["reason"]  # no bf16 kernels in ORT CPU
    assert bf16["nodes"]["passed"] and bf16["nodes"]["max_rel_err"]["cpu"] < bf16["nodes"]["tolerance"]
