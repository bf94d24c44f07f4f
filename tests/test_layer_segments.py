"""Layer-by-layer ONNX Runtime execution (onnx/segments.py, runners/onnxruntime.py LayerSessions): the
per-layer subgraphs compute exactly what the whole graph computes, each holds only its own layer's
weights, and layerwise validation reaches the same verdicts as full validation, also on a broken export."""
from __future__ import annotations

import re

import numpy as np
import onnx
import pytest

from adafuse_export.converters import load_checkpoint
from adafuse_export.examples import KINDS
from adafuse_export.onnx.export import export_onnx
from adafuse_export.onnx.segments import split_layers
from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner
from adafuse_export.validate import validate

ort = pytest.importorskip("onnxruntime")


def _whole_graph_session(runner: OnnxRuntimeRunner):
    """ONNX Runtime over the whole decoder, with the same options as the segments (no optimisations)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    source = runner.plugin.session_source(options) if runner.plugin else str(runner.files.decoder)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("flavour", ["portable", "plugin"])
@pytest.mark.parametrize("kind", KINDS)
def test_segments_compute_exactly_the_whole_graph(example_dirs, tmp_path, kind, flavour, dtype):
    if flavour == "plugin":
        pytest.importorskip("onnxruntime_extensions")
    ckpt = load_checkpoint(example_dirs[kind])
    export_onnx(ckpt, tmp_path / "o", flavour, dtype, external_data_threshold=0)  # weights in decoder.onnx.data
    runner = OnnxRuntimeRunner(tmp_path / "o", device="cpu", plugin_ops="cpu", layerwise=True)
    whole = _whole_graph_session(runner)
    # float32: bit for bit. float16: ONNX Runtime's CPU provider computes chains of float16 ops without
    # float16 kernels in float32 (inserted Casts, duplicates removed), so inside the whole graph a
    # hidden state may skip the float16 rounding it gets where a segment ends
    bound = 0.0 if dtype == "float32" else 4e-3
    names = [o.name for o in whole.get_outputs()]
    assert [o.name for o in runner.session.get_outputs()] == names
    assert [(i.name, i.type, i.shape) for i in runner.session.get_inputs()] == \
           [(i.name, i.type, i.shape) for i in whole.get_inputs()]
    for step, ids in enumerate(([[3, 1, 4, 1, 5, 9]], [[2]], [[6]])):
        ids = np.asarray(ids, np.int64)
        expected_past = runner.past
        got = runner.prefill(ids) if step == 0 else runner.decode(ids)
        start = runner.past_length - ids.shape[1]
        feeds = {"input_ids": ids, "past_lengths": np.array([start]), "seq_lens": np.array([ids.shape[1]])}
        grow = np.zeros((1, runner.kv_heads, ids.shape[1], runner.head_dim), runner.kv_dtype)  # the runner's zeros
        feeds.update({n: np.concatenate([(expected_past or {}).get(n, grow[:, :, :0]), grow], axis=2)
                      for n in runner.past_names})
        if runner.needs_routes:
            feeds["expert_ids"], feeds["gates"] = runner.routes(ids)
        want = dict(zip(names, whole.run(names, feeds)))
        diffs = {n: float(np.abs(np.float64(v) - want[n]).max()) for n, v in [("logits", got.logits), *got.present.items()]}
        assert max(diffs.values()) <= bound, (step, diffs)


def test_each_segment_holds_only_its_layer(example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs["mixlora"])
    export_onnx(ckpt, tmp_path / "o", "portable", "float32", external_data_threshold=0)
    model = onnx.load(str(tmp_path / "o" / "decoder.onnx"), load_external_data=False)
    segments = split_layers(model, ckpt.model.num_layers)
    assert [s.name for s in segments] == ["prologue"] + [f"layer {l}" for l in range(ckpt.model.num_layers)] + ["head"]
    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    seen: dict[str, list[str]] = {}
    for s in segments:
        for name in s.initializers:
            if name in external:
                seen.setdefault(name, []).append(s.name)
    assert set(seen) == external  # every weight is read by some segment
    for name, where in seen.items():
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if m:
            assert where == [f"layer {m.group(1)}"], name
        elif name in ("model.norm.weight", "lm_head.weight"):
            assert where == ["head"], name
        else:  # embeddings, rotary frequencies
            assert where == ["prologue"], (name, where)
    # what is carried between segments: the hidden state and small per-step tensors, never a weight
    carried = {t for s in segments for t in s.inputs} - {i.name for i in model.graph.input}
    assert carried and not carried & {t.name for t in model.graph.initializer}


def _corrupt(onnx_dir, tensor: str) -> None:
    """Scale one weight of decoder.onnx.data by 3 in place."""
    model = onnx.load(str(onnx_dir / "decoder.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == tensor)
    info = {e.key: e.value for e in t.external_data}
    data = np.memmap(onnx_dir / info["location"], np.float16, "r+", int(info["offset"]), int(info["length"]) // 2)
    data[:] = data * 3
    data.flush()


def test_layerwise_and_full_validation_fail_alike_on_a_corrupted_layer(example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs["pregate"])
    onnx_dir = tmp_path / "o"
    export_onnx(ckpt, onnx_dir, "portable", "float16", external_data_threshold=0)
    _corrupt(onnx_dir, "model.layers.0.mlp.down_proj.weight")
    full = validate(ckpt, onnx_dir / "decoder.onnx", steps=2, mode="full")
    layer = validate(ckpt, onnx_dir / "decoder.onnx", steps=2, mode="layerwise")
    assert "one layer at a time" in layer["runner_description"]
    failing = {r["method"]["mode"]: sorted(o["name"] for o in r["outputs"] if not o["passed"]) for r in (full, layer)}
    # layer 0's MLP output feeds layer 1's keys and values and the logits; layer 0's own cache is untouched
    assert failing["full"] == failing["layerwise"] == ["logits", "present.1.key", "present.1.value"]
    assert not full["passed"] and not layer["passed"]
