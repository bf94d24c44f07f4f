"""The in-place KV cache form of the plugin-flavour decoder (builder kv_update "in-place": present = TensorScatter into
the past, a static cache axis; what a TensorRT >= 10.15 engine updates in place), run by ONNX Runtime's CPU
TensorScatter: bit for bit the copy form's logits and caches over many random in-flight steps (rows of different
lengths, rows ending at the cache's last entry, rows of seq_lens 0), and every entry the contract
(onnx/contract.py) says is copied left as it was; validate passes on it, and what cannot build it is refused."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from adafuse_export.converters import load_checkpoint
from adafuse_export.errors import AdafuseError
from adafuse_export.onnx import contract
from adafuse_export.onnx.export import export_onnx
from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner
from adafuse_export.validate import validate

pytest.importorskip("onnxruntime")
CACHE = 12  # the in-place graph's static cache: small, so rows reach its end often
# the routes fed from the table, the pre-gate inside the decoder (routes out), per-layer routers with MixLoRA experts
KINDS = ("pregate", "pregate-ffn", "mixlora")


@pytest.fixture(scope="module")
def both_forms(example_dirs, tmp_path_factory):
    """(copy export, in-place export) per kind, plugin flavour, float32."""
    root = tmp_path_factory.mktemp("kv-forms")
    out = {}
    for kind in KINDS:
        ckpt = load_checkpoint(example_dirs[kind])
        export_onnx(ckpt, root / f"{kind}-copy", "plugin", "float32")
        export_onnx(ckpt, root / f"{kind}-in-place", "plugin", "float32", kv_update="in-place", cache_len=CACHE)
        out[kind] = (root / f"{kind}-copy", root / f"{kind}-in-place")
    return out


def random_step(rng, lengths: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One in-flight step: each row continues (past_lengths = its length), restarts at 0, or sits out (seq_lens 0);
    a row's new tokens fit the cache, and often fill it to its last entry."""
    batch = len(lengths)
    width = int(rng.integers(1, 5))
    past, n = lengths.copy(), np.zeros(batch, np.int64)
    for b in range(batch):
        if lengths[b] >= CACHE or rng.random() < 0.1:
            past[b] = 0  # a new sequence takes the slot
        room = min(width, CACHE - int(past[b]))
        choice = rng.random()
        n[b] = 0 if choice < 0.2 else room if choice < 0.5 else rng.integers(0, room + 1)
    return rng.integers(0, vocab, (batch, width)), past, n


@pytest.mark.parametrize("kind", KINDS)
def test_in_place_graph_equals_the_copy_graph_bit_for_bit(kind, both_forms):
    copy_dir, in_place_dir = both_forms[kind]
    copy, in_place = (OnnxRuntimeRunner(d, plugin_ops="cpu") for d in (copy_dir, in_place_dir))
    assert copy.cache_len is None and in_place.cache_len == CACHE
    rng = np.random.default_rng(21)
    batch, steps = 3, 40
    # the copy graph given the whole cache too, as an engine binds it (a shorter one sums attention's zeros in
    # another order: equal within rounding, not bit for bit)
    copy.past = {n: np.zeros((batch, copy.kv_heads, CACHE, copy.head_dim), copy.kv_dtype) for n in copy.past_names}
    lengths = np.zeros(batch, np.int64)
    reach = 0
    seen = {"zero": 0, "to_end": 0, "restart": 0}
    for step in range(steps):
        ids, past, n = random_step(rng, lengths, copy.vocab_size)
        before = {k: v.copy() for k, v in in_place.past.items()} if in_place.past is not None else None
        a, b = copy.step(ids, past, n), in_place.step(ids, past, n)
        assert np.array_equal(a.logits, b.logits), f"step {step}: logits differ"
        assert np.isfinite(b.logits).all()
        if a.expert_ids is not None:
            assert np.array_equal(a.expert_ids, b.expert_ids) and np.array_equal(a.gates, b.gates)
        reach = max(reach, int((past + n).max()))
        for name in a.present:
            cache = contract.PAST_PREFIX + name[len(contract.PRESENT_PREFIX):]
            whole = in_place.past[cache]
            assert whole.shape[2] == CACHE and np.array_equal(whole, copy.past[cache]), f"step {step}: {name} differs"
            assert np.array_equal(b.present[name], whole[:, :, :reach])  # what the runner returns: up to the reach
            assert not whole[:, :, reach:].any()  # never reached: still zeros
            if before is None:
                continue
            # the contract: row r's entries past[r] .. past[r] + n[r] - 1 are written, every other entry copied
            old = before[contract.PAST_PREFIX + name[len(contract.PRESENT_PREFIX):]]
            for r in range(batch):
                keep = np.ones(CACHE, bool)
                keep[past[r]:past[r] + n[r]] = False
                assert np.array_equal(whole[r][:, keep], old[r][:, keep]), f"step {step}: {name} row {r} changed"
                if n[r]:  # a key or value of a real token: not the zeros it replaced
                    assert np.abs(whole[r][:, past[r]:past[r] + n[r]]).sum() > 0
        seen["zero"] += int((n == 0).sum())
        seen["to_end"] += int(((past + n) == CACHE).sum())
        seen["restart"] += int(((past == 0) & (lengths > 0)).sum())
        lengths = np.where(n > 0, past + n, np.where(past == 0, 0, lengths))
    assert min(seen.values()) >= 3, seen  # the cases the test is for did happen


def test_in_place_export_is_a_static_tensorscatter_graph(both_forms):
    _, in_place_dir = both_forms["pregate"]
    model = onnx.load(str(in_place_dir / "decoder.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == 24
    inputs = {v.name: v for v in model.graph.input}
    outputs = {v.name: v for v in model.graph.output}
    scatters = [n for n in model.graph.node if n.op_type == "TensorScatter"]
    layers = sum(1 for name in inputs if name.startswith(contract.PAST_PREFIX)) // 2
    assert len(scatters) == 2 * layers
    for node in scatters:  # each writes a graph input's cache into the graph output of the same name and shape
        past, present = node.input[0], node.output[0]
        assert past in inputs and present in outputs and present == contract.PRESENT_PREFIX + past[len(contract.PAST_PREFIX):]
        dims = [d.dim_value or d.dim_param for d in inputs[past].type.tensor_type.shape.dim]
        assert dims[2] == CACHE and dims == [d.dim_value or d.dim_param for d in outputs[present].type.tensor_type.shape.dim]
        assert {a.name: a.i for a in node.attribute} == {"axis": 2}
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["adafuse.kv_update"] == "in-place"
    manifest = (in_place_dir / "manifest.json").read_text()
    assert '"kv_update": "in-place"' in manifest and f"head_dim] hold position" in manifest
    copy_meta = {p.key: p.value for p in onnx.load(str(both_forms["pregate"][0] / "decoder.onnx"),
                                                   load_external_data=False).metadata_props}
    assert "adafuse.kv_update" not in copy_meta  # the copy form's graph is the one it always was


@pytest.mark.parametrize("layerwise", [False, True])
def test_validate_passes_on_the_in_place_export(example_dirs, both_forms, layerwise):
    _, in_place_dir = both_forms["mixlora"]
    runner = OnnxRuntimeRunner(in_place_dir, plugin_ops="cpu", layerwise=layerwise)
    report = validate(load_checkpoint(example_dirs["mixlora"]), in_place_dir, [[3, 17, 250, 4, 99], [7, 7, 1]],
                      steps=4, runner=runner)
    assert report["passed"] and report["greedy_agreement"]["fraction"] == 1.0, report


def test_a_step_past_the_static_cache_is_refused(both_forms):
    runner = OnnxRuntimeRunner(both_forms["pregate"][1], plugin_ops="cpu")
    runner.step(np.ones((1, 4), np.int64), [0], [4])
    with pytest.raises(AdafuseError, match=rf"'seq_lens' 4 must satisfy .* past_lengths \+ seq_lens <= {CACHE}"):
        runner.step(np.ones((1, 4), np.int64), [CACHE - 3], [4])
    runner.prefill(np.ones((1, CACHE), np.int64))  # the whole cache: fits
    with pytest.raises(AdafuseError, match=f"{CACHE + 1} positions exceed the graph's static cache of {CACHE}"):
        runner.decode(np.ones((1, 1), np.int64))


@pytest.mark.parametrize("flavour, kv_update, cache_len, message", [
    ("portable", "in-place", CACHE, "--kv-update in-place: only the plugin flavour (full TensorRT >= 10.15) updates the "
                                    "cache in place; found flavour 'portable'"),
    ("plugin", "in-place", None, "--kv-update in-place needs the cache's static length (--max-seq) >= 2, found None"),
    ("plugin", "in-place", 1, "--kv-update in-place needs the cache's static length (--max-seq) >= 2, found 1"),
    ("plugin", "copy", CACHE, f"--max-seq {CACHE}: a static cache length is only for --kv-update in-place"),
    ("plugin", "scatter", None, "--kv-update 'scatter' is unknown (expected one of copy, in-place)"),
])
def test_what_cannot_build_the_in_place_form_is_refused(example_dirs, tmp_path, flavour, kv_update, cache_len, message):
    with pytest.raises(AdafuseError) as e:
        export_onnx(load_checkpoint(example_dirs["pregate"]), tmp_path / "out", flavour, kv_update=kv_update,
                    cache_len=cache_len)
    assert str(e.value).startswith(message)
    assert not (tmp_path / "out").exists()


def test_fp8_weights_take_the_in_place_form_too(example_dirs, tmp_path):
    """FP8 weights (opset 19 otherwise) in the in-place graph's opset 24: the float32 twin of a float16 export, as
    convert validates it, passes against the FP8 twin reference."""
    ckpt = load_checkpoint(example_dirs["pregate"])
    export_onnx(ckpt, tmp_path / "fp8", "plugin", "float32", weights="fp8", quantize_from="float16", kv_update="in-place",
                cache_len=CACHE)
    model = onnx.load(str(tmp_path / "fp8" / "decoder.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == 24
    assert any(n.op_type == "TensorScatter" for n in model.graph.node)
    report = validate(ckpt, tmp_path / "fp8", [[3, 17, 250, 4, 99]], steps=3,
                      runner=OnnxRuntimeRunner(tmp_path / "fp8", plugin_ops="cpu"))
    assert report["passed"] and report["greedy_agreement"]["fraction"] == 1.0, report
