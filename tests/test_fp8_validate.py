"""`validate` of an FP8-weights native artifact (`convert --backend native --weights fp8`) on the CPU: the FP8 twin
(native_artifact.load_fp8_twin) the runtime is judged against, the quantization's own effect
(validate.quantization_effect), the report's fields, and the CLI stopping cleanly at the device.
What runs on a GPU: tests/gpu/test_native_backend.py::test_fp8_weights_prefill_within_the_bound_of_their_own_reference
(the native backend against this twin)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from adafuse_export import native_artifact as native
from adafuse_export.converters import load_checkpoint
from adafuse_export.errors import AdafuseError
from adafuse_export.quantize import FP8_E4M3_MAX, dequantize_fp8
from adafuse_export.reference import ReferenceModel
from adafuse_export.runners import cpp_runtime
from test_native_path import one_line, runtime_library  # noqa: F401  (fixture)
from test_runtime import monkeypatch_session, runtime_build, runtime_lib  # noqa: F401  (session fixtures)

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6]]


def fp8_artifact(ckpt, path, dtype="bfloat16", weights="fp8"):
    path.mkdir()
    native.write_artifact(ckpt, path, dtype, max_batch=2, max_seq=32, weights=weights)
    return path


# pregate: q/k/v and gate/up stacked, no static LoRA; lora: q and v carry a static LoRA merged into the stored matrix;
# mixlora: static attention LoRAs and routed FFN experts
@pytest.mark.parametrize("kind", ["pregate", "lora", "mixlora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twin_weights_are_the_stored_fp8_dequantized(example_dirs, tmp_path, kind, dtype):
    ckpt = load_checkpoint(example_dirs[kind])
    art = fp8_artifact(ckpt, tmp_path / "a.native")
    stored = load_file(str(art / native.WEIGHTS))
    plain, twin = ReferenceModel(ckpt, dtype=dtype), ReferenceModel(ckpt, dtype=dtype)
    assert native.load_fp8_twin(twin, art)
    assert isinstance(twin.w, dict) and isinstance(plain.w, dict)
    changed = set()
    for st in native.stages(ckpt):
        q, scale = stored[f"{st.prefix}.weight"], stored[f"{st.prefix}.weight_scale"]
        assert q.dtype == torch.float8_e4m3fn
        w = dequantize_fp8(q, scale)
        for x in st.members:
            name = f"{ckpt.model.arch.weight_prefix(st.layer, x.module)}.weight"
            changed.add(name)
            got = twin.w[name]
            assert got.dtype == dtype and torch.equal(got, w[x.rows[0]:x.rows[1]].to(dtype)), name
            static = x.site is not None and x.site.static
            assert ((st.layer, x.module) in twin.sites) == (x.site is not None and not static), name
            if not static:  # its own rows: within e4m3's half step (16 / 448 of the row's largest) of its weight,
                # plus the bfloat16 rounding the artifact's matrix had before quantization
                orig = plain.w[name].double()
                bound = orig.abs().amax(1, keepdim=True) * (16 / FP8_E4M3_MAX + 2 ** -7)
                assert ((got.double() - orig).abs() <= bound).all(), name
    assert changed and all(torch.equal(twin.w[n], plain.w[n]) for n in plain.w if n not in changed)
    assert twin.sites.keys() <= plain.sites.keys()


def test_streaming_twin_is_the_in_memory_twin(example_dirs, tmp_path):
    """--reference layerwise: the streaming reference's twin reads the same rows layer by layer."""
    ckpt = load_checkpoint(example_dirs["lora"])  # static LoRAs on q and v: their sites dropped in both
    art = fp8_artifact(ckpt, tmp_path / "a.native")
    held, streamed = ReferenceModel(ckpt), ReferenceModel(ckpt, stream=True)
    assert native.load_fp8_twin(held, art) and native.load_fp8_twin(streamed, art)
    assert isinstance(held.w, dict) and held.sites == streamed.sites
    assert all(torch.equal(streamed.w[n], held.w[n]) for n in held.w)
    ids = torch.tensor([PROMPTS[0]])
    assert torch.equal(streamed.forward(ids).logits, held.forward(ids).logits)
    assert not torch.equal(held.forward(ids).logits, ReferenceModel(ckpt).forward(ids).logits)


def test_twin_is_the_reference_when_weights_are_not_fp8(example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs["lora"])
    art = fp8_artifact(ckpt, tmp_path / "a.native", weights="dtype")
    plain, twin = ReferenceModel(ckpt), ReferenceModel(ckpt)
    assert not native.load_fp8_twin(twin, art)
    assert isinstance(twin.w, dict) and isinstance(plain.w, dict)
    assert twin.w.keys() == plain.w.keys() and all(torch.equal(twin.w[n], plain.w[n]) for n in plain.w)
    assert twin.sites == plain.sites
    ids = torch.tensor([PROMPTS[0]])
    assert torch.equal(twin.forward(ids).logits, plain.forward(ids).logits)


def _full_sequence_effect(ckpt, art, prompt, steps):
    """quantization_effect computed another way: greedy tokens of the unquantized reference by whole-sequence
    forwards (no KV cache), then both models on prompt + those tokens in one forward."""
    plain, twin = ReferenceModel(ckpt), ReferenceModel(ckpt)
    native.load_fp8_twin(twin, art)
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(plain.forward(torch.tensor([seq])).logits[0, -1].argmax()))
    ids = torch.tensor([seq[:len(prompt) + steps]])
    want, got = plain.forward(ids).logits.double(), twin.forward(ids).logits.double()
    return float((want - got).abs().max()), int((want.argmax(-1) == got.argmax(-1)).sum()), want.shape[1]


def test_quantization_effect_is_the_twin_against_the_unquantized_reference(example_dirs, tmp_path):
    from adafuse_export.validate import quantization_effect

    ckpt = load_checkpoint(example_dirs["pregate"])
    art = fp8_artifact(ckpt, tmp_path / "a.native")
    steps = 4
    q = quantization_effect(ckpt, art, PROMPTS, steps)
    expected = [_full_sequence_effect(ckpt, art, p, steps) for p in PROMPTS]
    g = q["greedy_agreement"]
    assert g["total"] == sum(len(p) + steps for p in PROMPTS) == sum(n for _, _, n in expected)
    assert g["matched"] == sum(m for _, m, _ in expected) and g["fraction"] == g["matched"] / g["total"]
    worst = max(d for d, _, _ in expected)
    assert worst > 0 and q["max_abs_diff"] == pytest.approx(worst, rel=1e-3, abs=1e-5)
    assert q["weights"] == "fp8_e4m3" and q["dtype"] == "float32"
    dense = fp8_artifact(ckpt, tmp_path / "b.native", weights="dtype")
    with pytest.raises(AdafuseError, match=r"its weights are not FP8"):
        quantization_effect(ckpt, dense, PROMPTS, 1)


def _fp8_model_runner(ckpt, art):
    """The runtime's stand-in on the CPU: a bfloat16 reference holding the artifact's FP8 weights (what the native
    backend computes), presenting the artifact's metadata as CppRuntimeRunner does."""
    from adafuse_export.runners.reference import ReferenceRunner

    r = ReferenceRunner(ckpt, "bfloat16")
    assert native.load_fp8_twin(r.model, art)
    r.info = replace(r.info, model=art, meta=cpp_runtime.native_meta(cpp_runtime.native_manifest(art)))
    return r


def test_validate_report_of_an_fp8_artifact(example_dirs, tmp_path):
    from adafuse_export.validate import quantization_effect, report_lines, summary, validate

    ckpt = load_checkpoint(example_dirs["pregate"])
    art = fp8_artifact(ckpt, tmp_path / "a.native")
    assert cpp_runtime.native_meta(cpp_runtime.native_manifest(art))["adafuse.weights"] == "fp8_e4m3"
    report = validate(ckpt, art, PROMPTS, 3, runner=_fp8_model_runner(ckpt, art))
    # the FP8 model is within the measured bfloat16 bound of its float32 twin
    assert report["passed"], report_lines(report)
    assert "FP8 twin" in report["reference"] and "FP8 twin" in report["routing_reference"]
    q = report["quantization"]
    assert q == quantization_effect(ckpt, art, PROMPTS, 3, "float32")
    assert "passed" not in q  # information only unless a floor is asked
    text = "\n".join(report_lines(report))
    assert "FP8 quantization (" in text and f"{q['greedy_agreement']['matched']}/{q['greedy_agreement']['total']}" in text
    assert any(line.startswith("FP8 quantization") for line in summary(report))
    layerwise = validate(ckpt, art, PROMPTS, 3, runner=_fp8_model_runner(ckpt, art), mode="layerwise")
    assert layerwise["passed"] and layerwise["quantization"]["greedy_agreement"] == q["greedy_agreement"]
    assert layerwise["outputs"] == report["outputs"]
    floor = validate(ckpt, art, PROMPTS, 3, runner=_fp8_model_runner(ckpt, art), min_greedy_agreement=1.0)
    fraction = floor["quantization"]["greedy_agreement"]["fraction"]
    assert floor["quantization"]["passed"] == floor["passed"] == (fraction == 1.0)
    assert all(o["passed"] for o in floor["outputs"])


def test_non_fp8_artifact_has_no_quantization_report(example_dirs, tmp_path):
    from adafuse_export.runners.reference import ReferenceRunner
    from adafuse_export.validate import report_lines, validate

    ckpt = load_checkpoint(example_dirs["pregate"])
    art = fp8_artifact(ckpt, tmp_path / "a.native", weights="dtype")
    r = ReferenceRunner(ckpt, "bfloat16")
    r.info = replace(r.info, model=art, meta=cpp_runtime.native_meta(cpp_runtime.native_manifest(art)))
    report = validate(ckpt, art, PROMPTS[:1], 2, runner=r, min_greedy_agreement=1.0)
    assert report["quantization"] is None and report["passed"] and "FP8 twin" not in report["reference"]
    assert not any(line.startswith("FP8") for line in report_lines(report))


def test_validate_cli_of_an_fp8_artifact_stops_at_the_device(cli, example_dirs, tmp_path, runtime_library, monkeypatch):
    art = fp8_artifact(load_checkpoint(example_dirs["pregate"]), tmp_path / "a.native")
    monkeypatch.setenv("ADAFUSE_RUNTIME_LIB", runtime_library)
    for extra in ([], ["--min-greedy-agreement", "0.9", "--json"]):
        res = cli("validate", example_dirs["pregate"], art, "--runtime", "cpp", *extra)
        assert res.code == 2 and res.out == ""
        assert one_line(res.err).startswith(f"CUDA device 0 (running {art} needs an NVIDIA GPU): ")
    res = cli("validate", example_dirs["pregate"], art, "--runtime", "cpp", "--min-greedy-agreement", "1.5")
    assert res.code == 2 and "--min-greedy-agreement" in res.err and "Traceback" not in res.err
    dense = fp8_artifact(load_checkpoint(example_dirs["pregate"]), tmp_path / "b.native", weights="dtype")
    res = cli("validate", example_dirs["pregate"], dense, "--runtime", "cpp", "--min-greedy-agreement", "0.9")
    assert res.code == 2 and one_line(res.err) == (
        f"--min-greedy-agreement: {dense} does not hold FP8 weights (it applies to a native artifact or an ONNX "
        "export of `convert --weights fp8`)")
