"""ONNX export: portable graphs through ONNX Runtime match the reference; plugin nodes carry the plugin fields."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from adafuse_export.converters import load_checkpoint
from adafuse_export.errors import AdafuseError
from adafuse_export.examples import KINDS, make_example
from adafuse_export.onnx import plugin_ops
from adafuse_export.onnx.export import export_onnx
from adafuse_export.validate import validate

PROMPTS = [[3, 17, 250, 4, 99, 0, 255, 42], [7, 7, 7, 1]]


@pytest.fixture(scope="session")
def portable_exports(example_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-portable")
    out = {}
    for kind, path in example_dirs.items():
        out[kind] = root / kind
        export_onnx(load_checkpoint(path), out[kind], "portable", "float32")
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_portable_matches_reference(kind, example_dirs, portable_exports):
    report = validate(load_checkpoint(example_dirs[kind]), portable_exports[kind], PROMPTS, steps=16)
    by_name = {o["name"]: o for o in report["outputs"]}
    assert by_name["logits"]["max_abs_diff"] <= 1e-4, by_name["logits"]
    assert report["greedy_agreement"]["fraction"] == 1.0 and report["greedy_agreement"]["total"] == 34
    assert report["passed"], report
    pregated = kind.startswith("pregate")
    assert ("expert_ids" in by_name) == pregated
    assert sorted(n for n in by_name if n.startswith("present.")) == sorted(
        f"present.{l}.{kv}" for l in range(2) for kv in ("key", "value"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_files_manifest_and_checker(kind, portable_exports):
    out = portable_exports[kind]
    manifest = json.loads((out / "manifest.json").read_text())
    exact = kind == "pregate"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["decoder.onnx", "manifest.json"] + (["pregate.onnx", "routes.safetensors"] if exact else []))
    onnx.checker.check_model(str(out / "decoder.onnx"), full_check=True)
    inputs = [i["name"] for i in manifest["graphs"]["decoder"]["inputs"]]
    outputs = [o["name"] for o in manifest["graphs"]["decoder"]["outputs"]]
    assert inputs[:3] == ["input_ids", "past_lengths", "seq_lens"] and manifest["version"] == 2
    assert ("expert_ids" in inputs) == exact and ("expert_ids" in outputs) == (kind == "pregate-ffn")
    assert "logits" in outputs and "present.1.value" in outputs
    if exact:
        from safetensors.numpy import load_file

        t = load_file(str(out / "routes.safetensors"))
        assert t["expert_ids"].shape == (256, 2) and t["expert_ids"].dtype == np.int32 and t["gates"].dtype == np.float32


def _pregate_float64(ckpt):
    """The pre-gate of RMSNorm_0(embed(token)) for every token in float64 (numpy, written from the math),
    and a bound on how far a float32 evaluation of it may be from that. Per row, the router logits'
    rounding error is taken as 4 sqrt(hidden + 8) eps32 sum_i |x_i| |w_i| (the statistical model of
    float32 summation, four standard deviations; the worst case, hidden instead of its root, is 8x
    larger here and never approached), softmax moves a probability by at most half the largest logit
    change, and renormalising the top k at most doubles that. The bound follows from float32 and from
    this model's magnitudes, not from one library's summation order (onnxruntime 1.31 and 1.32 differ
    by 1.85e-6 in these gates)."""

    def f64(src, name):
        return src.get(name).double().numpy()

    spec, a = ckpt.model, ckpt.adapter
    assert spec.arch.norm == "rms" and spec.embed_scale == 1.0, "the formula below is Llama's"
    emb = f64(ckpt.base, "model.embed_tokens.weight")
    norm0 = f64(ckpt.base, spec.arch.norm_weight(0, spec.arch.norms.attn_in))
    w = f64(ckpt.adapters, "pregate.weight")
    x = emb / np.sqrt((emb ** 2).mean(-1, keepdims=True) + spec.rms_norm_eps) * norm0
    logits = x @ w.T
    cond = np.abs(x) @ np.abs(w).T  # [vocab, E]
    if "pregate.bias" in ckpt.adapters:
        b = f64(ckpt.adapters, "pregate.bias")
        logits, cond = logits + b, cond + np.abs(b)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")
    ids = order[:, :a.top_k]
    gates = np.take_along_axis(p, ids, -1)
    margin = np.take_along_axis(p, order[:, a.top_k - 1:a.top_k], -1)[:, 0] - (
        np.take_along_axis(p, order[:, a.top_k:a.top_k + 1], -1)[:, 0] if p.shape[1] > a.top_k else 0.0)
    if a.normalize_topk:
        gates = gates / gates.sum(-1, keepdims=True)
    eps = np.finfo(np.float32).eps
    dz = 4 * np.sqrt(spec.hidden_size + 8) * eps * cond.max(-1)
    bound = 2 * (0.5 * dz) + 8 * eps * (1 + p.shape[1])  # per row
    return ids, gates, bound, margin


def test_routes_match_pregate_graph(example_dirs, portable_exports):
    """The routing table (torch) and the pre-gate graph (ONNX Runtime) both meet the float64 pre-gate within
    the float32 bound; expert ids agree wherever the float64 margin at the k-th expert exceeds that bound."""
    from safetensors.numpy import load_file

    from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner

    ids64, gates64, bound, margin = _pregate_float64(load_checkpoint(example_dirs["pregate"]))
    assert (bound < 1e-3).all() and (bound > 0).all(), bound  # a bound that can fail: gates are O(0.1-1)
    runner = OnnxRuntimeRunner(portable_exports["pregate"])
    table = load_file(str(portable_exports["pregate"] / "routes.safetensors"))
    e, g = runner.routes(np.arange(256, dtype=np.int64)[None])
    clear = margin > 2 * bound  # rows whose k-th expert float32 rounding cannot change
    assert clear.mean() > 0.5, "too many near-ties for the test to mean anything"
    for what, got_ids, got_gates in (("routing table", table["expert_ids"], table["gates"]),
                                     ("pre-gate graph", e[0], g[0])):
        same = (got_ids == ids64).all(-1)
        assert same[clear].all(), what
        err = np.abs(got_gates[same].astype(np.float64) - gates64[same]).max(-1)
        assert (err <= bound[same]).all(), (what, err.max(), bound[same][err.argmax()])
    assert (e[0][clear] == table["expert_ids"][clear]).all()


def _site_expectations(ckpt):
    """AdafuseLoraLinear fields expected per routed site name."""
    a, out = ckpt.adapter, {}
    for site in ckpt.sites():
        if site.static:
            continue
        e, r, inp = ckpt.adapters.info(f"{site.name}.lora_A").shape
        top_k = 1 if a.expert_kind == "ffn" else (e if a.router_kind == "dense" and a.routing == "layerwise" else a.top_k)
        out[site.name] = dict(in_features=inp, out_features=ckpt.model.linear_shape(site.module)[0], num_experts=e, rank=r,
                              top_k=top_k, scale=a.site_scale(site.name), has_bias=int(site.module in ckpt.model.bias_modules))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_plugin_flavour_fields_round_trip(kind, example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs[kind])
    manifest = export_onnx(ckpt, tmp_path / "p", "plugin", "float32")
    model = onnx.load(str(tmp_path / "p" / "decoder.onnx"))
    onnx.checker.check_model(model)
    nodes = [n for n in model.graph.node if n.op_type == plugin_ops.OP_TYPE]
    expected = _site_expectations(ckpt)
    slots = ckpt.adapter.top_k if ckpt.adapter.expert_kind == "ffn" else 1
    assert len(nodes) == len(expected) * slots
    for node in nodes:
        site = node.name.split("/")[1]
        plugin_ops.check_roundtrip(node, expected[site])
        assert [n for n, _ in plugin_ops.FIELDS] == [a.name for a in node.attribute]
    imports = {o.domain: o.version for o in model.opset_import}
    if expected:
        assert imports.get(plugin_ops.DOMAIN) == plugin_ops.DOMAIN_VERSION
        assert manifest["custom_ops"]["fields"] == [n for n, _ in plugin_ops.FIELDS]
    else:  # plain LoRA is merged: no custom op at all
        assert plugin_ops.DOMAIN not in imports and manifest["custom_ops"] is None


def test_plugin_node_check_rejects_wrong_fields():
    node = plugin_ops.make_node(["x", "W", "A", "B", "e", "g"], "y", "n", in_features=4, out_features=8, num_experts=2,
                                rank=2, top_k=1, scale=0.5, has_bias=False)
    plugin_ops.check_roundtrip(node, dict(in_features=4, out_features=8, num_experts=2, rank=2, top_k=1, scale=0.5, has_bias=0))
    with pytest.raises(AdafuseError, match="field 'rank' is 2, expected 3"):
        plugin_ops.check_roundtrip(node, dict(in_features=4, out_features=8, num_experts=2, rank=3, top_k=1, scale=0.5, has_bias=0))
    node.attribute.pop()
    with pytest.raises(AdafuseError, match="expected exactly"):
        plugin_ops.node_fields(node)


def test_qwen2_bias_and_mistral_sliding_window(tmp_path):
    # qwen2 carries q/k/v biases (plugin has_bias=1); mistral's window is shorter than the prompt
    for family, config in (("qwen2", None), ("mistral", {"sliding_window": 3})):
        src = tmp_path / family
        ckpt = make_example(src, "pregate", family=family, seed=5, config=config)
        ckpt = load_checkpoint(src)
        export_onnx(ckpt, tmp_path / f"{family}-onnx", "portable", "float32")
        report = validate(ckpt, tmp_path / f"{family}-onnx", [[5, 9, 2, 200, 31, 64, 1]], steps=6)
        assert report["passed"] and report["greedy_agreement"]["fraction"] == 1.0, report
        if family == "qwen2":
            export_onnx(ckpt, tmp_path / "qp", "plugin", "float32")
            nodes = [n for n in onnx.load(str(tmp_path / "qp" / "decoder.onnx")).graph.node if n.op_type == plugin_ops.OP_TYPE]
            biased = {n.name.split("/")[1].split(".")[-1] for n in nodes if plugin_ops.node_fields(n)["has_bias"]}
            assert biased == {"q_proj", "k_proj", "v_proj"}
            assert all(len(n.input) == 7 for n in nodes if plugin_ops.node_fields(n)["has_bias"])


@pytest.mark.parametrize("kind", ["pregate", "mixlora", "loramoe"])
def test_float16_runs_in_onnxruntime(kind, example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs[kind])
    export_onnx(ckpt, tmp_path / "h", "portable", "float16")
    onnx.checker.check_model(str(tmp_path / "h" / "decoder.onnx"), full_check=True)
    report = validate(ckpt, tmp_path / "h", [PROMPTS[0]], steps=4)
    assert report["dtype"] == "float16" and report["atol"] == 2e-2
    assert report["passed"], [o for o in report["outputs"] if not o["passed"]]


@pytest.mark.parametrize("flavour", ["portable", "plugin"])
def test_bfloat16_export_holds_the_checkpoints_weights_and_passes_checker(flavour, example_dirs, tmp_path):
    """Every checkpoint tensor in the graph is that tensor (read here with safetensors) rounded to
    bfloat16, bit for bit. Whether ONNX Runtime runs bfloat16 graphs is another question, answered by
    the CPU probe (test_convert_large.py) and, with kernels, on a GPU."""
    ckpt = load_checkpoint(example_dirs["pregate"])
    export_onnx(ckpt, tmp_path / "b", flavour, "bfloat16")
    model = onnx.load(str(tmp_path / "b" / "decoder.onnx"))
    onnx.checker.check_model(model, full_check=flavour == "portable")
    source = {**load_file(example_dirs["pregate"] / "model.safetensors"),
              **load_file(example_dirs["pregate"] / "adafuse_adapters.safetensors")}
    compared = 0
    for init in model.graph.initializer:
        if init.name in source:
            assert init.data_type == onnx.TensorProto.BFLOAT16, init.name
            want = source[init.name].to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            got = np.frombuffer(init.raw_data, dtype=np.uint16).reshape(tuple(init.dims))
            assert np.array_equal(got, want), init.name
            compared += 1
    assert compared >= 9 * ckpt.model.num_layers  # every base weight and adapter of every layer


def test_external_data_above_threshold(example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs["pregate"])
    manifest = export_onnx(ckpt, tmp_path / "x", "portable", "float32", external_data_threshold=1000)
    assert manifest["graphs"]["decoder"]["external_data"] == "decoder.onnx.data"
    assert (tmp_path / "x" / "decoder.onnx.data").stat().st_size > 100_000
    assert (tmp_path / "x" / "decoder.onnx").stat().st_size < 100_000
    assert (tmp_path / "x" / "pregate.onnx.data").is_file()
    onnx.checker.check_model(str(tmp_path / "x" / "decoder.onnx"), full_check=True)
    report = validate(ckpt, tmp_path / "x", [PROMPTS[1]], steps=3)
    assert report["passed"]
    # below the threshold: one self-contained file
    manifest = export_onnx(ckpt, tmp_path / "y", "portable", "float32")
    assert manifest["graphs"]["decoder"]["external_data"] is None and not (tmp_path / "y" / "decoder.onnx.data").exists()


def test_failed_export_leaves_nothing(example_dirs, tmp_path, monkeypatch):
    from adafuse_export.onnx import export as export_mod

    ckpt = load_checkpoint(example_dirs["pregate"])

    def boom(*a, **k):
        raise RuntimeError("simulated failure while building pregate.onnx")

    monkeypatch.setattr(export_mod, "build_pregate", boom)
    with pytest.raises(RuntimeError):
        export_onnx(ckpt, tmp_path / "out", "portable", "float32")
    assert list(tmp_path.iterdir()) == []
    # an existing export survives a failed --force re-export
    monkeypatch.undo()
    export_onnx(ckpt, tmp_path / "out", "portable", "float32")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    monkeypatch.setattr(export_mod, "build_pregate", boom)
    with pytest.raises(RuntimeError):
        export_onnx(ckpt, tmp_path / "out", "portable", "float32", force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_batch_prefill_and_decode(example_dirs, portable_exports):
    """Batch 2 through the runner interface equals the reference row by row."""
    from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner
    from adafuse_export.runners.reference import ReferenceRunner

    ckpt = load_checkpoint(example_dirs["mola"])
    ort_runner, ref = OnnxRuntimeRunner(portable_exports["mola"]), ReferenceRunner(ckpt)
    ids = np.array([[1, 2, 3, 4], [200, 100, 50, 25]])
    a, b = ort_runner.prefill(ids), ref.prefill(ids)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
    tok = b.logits[:, -1].argmax(-1)[:, None]
    a, b = ort_runner.decode(tok), ref.decode(tok)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
    assert ort_runner.past_length == 5
    assert (ort_runner.generate(ids, 5) == ReferenceRunner(ckpt).generate(ids, 5)).all()
