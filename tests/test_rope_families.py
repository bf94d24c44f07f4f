"""The bases people fine-tune, with scaled RoPE, against transformers and PEFT, through every backend.

Tiny bases written by transformers 5 (float32, norms perturbed) in the shapes of Llama 3.1 (llama3), Qwen2.5
with YaRN, Phi-3.5 (LongRoPE), Gemma 3 4B+ (`linear` on the full-attention layers only, tied embeddings) and
two more variants (linear, dynamic), each saved twice: as transformers 5 writes it (`rope_parameters`) and as
the published checkpoints spell it (top-level rope_theta + rope_scaling; Gemma 3's rope_local_base_freq).
original_max_position_embeddings is small (8 to 16) so that every scaling moves logits at these lengths,
and LongRoPE's switch to its long factors happens inside the prompts and the decoded steps.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adafuse_export import families
from adafuse_export.converters import load_checkpoint
from adafuse_export.reference import ReferenceModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_real as fr  # noqa: E402
from test_families import _base, cached_logits  # noqa: E402

transformers = pytest.importorskip("transformers")

SLIDING, FULL = "sliding_attention", "full_attention"
ORIGINAL = 8  # Phi-3.5's original_max_position_embeddings here: prompts and decode steps cross it
BASES = {  # name -> (family, transformers-5 config overrides of fixtures_real.TINY_DIMS)
    "llama3.1": ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 16})),
    "qwen2.5-yarn": ("qwen2", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                    "original_max_position_embeddings": 16})),
    "phi3.5": ("phi3", dict(original_max_position_embeddings=ORIGINAL, pad_token_id=0, rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 1.8],
        "long_factor": [1.0, 1.5, 2.5, 4.0, 7.0, 12.0, 20.0, 32.0]})),
    "gemma3": ("gemma3_text", dict(head_dim=24, num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=20,
                                   layer_types=[SLIDING, FULL, SLIDING], tie_word_embeddings=True,
                                   rope_parameters={FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                                    SLIDING: {"rope_type": "default", "rope_theta": 1e4}})),
    "mistral-linear": ("mistral", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0})),
    "qwen3-dynamic": ("qwen3", dict(head_dim=24, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                                  "factor": 2.0})),
}
NAMED = ["llama3.1", "qwen2.5-yarn", "phi3.5", "gemma3"]  # the shapes issue 19 names: converted in CI
SPELLINGS = ("transformers-5", "published")
PROMPT = torch.tensor([[1, 5, 9, 33, 100, 7]])  # 6 positions: below Phi-3.5's switch at 8
LONG_PROMPT = torch.tensor([[1, 5, 9, 33, 100, 7, 64, 2, 17, 90, 3, 45]])  # 12: past it
DECODE = torch.tensor([[4, 77, 12, 5, 31, 126, 60, 2]])  # cached steps 6..13: across it
ATOL = 1e-4


def published(config: dict) -> dict:
    """A transformers-5 config.json rewritten in the spelling of the published checkpoints."""
    cfg = dict(config)
    params = cfg.pop("rope_parameters")
    if FULL in params:  # Gemma 3: the global base and scaling, the local base under its own key
        full, local = dict(params[FULL]), params[SLIDING]
        cfg["rope_theta"], cfg["rope_local_base_freq"] = full.pop("rope_theta"), local["rope_theta"]
        cfg["rope_scaling"] = full if full["rope_type"] != "default" else None
        return cfg
    params = dict(params)
    cfg["rope_theta"] = params.pop("rope_theta")
    params.pop("partial_rotary_factor", None)
    kind = params.pop("rope_type")
    cfg["rope_scaling"] = {("type" if kind in ("yarn", "longrope") else "rope_type"): kind, **params}
    return cfg


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """(name, spelling) -> a base directory written by transformers (the published one: same weights)."""
    root = tmp_path_factory.mktemp("scaled-bases")
    out = {}
    for name, (family, overrides) in BASES.items():
        modern = fr.write_hf_base(root / f"{name}-transformers-5", family, seed=5, **overrides)
        old = root / f"{name}-published"
        shutil.copytree(modern, old)
        cfg = json.loads((old / "config.json").read_text())
        (old / "config.json").write_text(json.dumps(published(cfg), indent=2))
        out[name, "transformers-5"], out[name, "published"] = modern, old
    return out


def hf_cached_logits(path: Path, prompt: torch.Tensor, decode: torch.Tensor, **config) -> torch.Tensor:
    """transformers' own cached decoding (as generate runs it): the prompt, then one step per token."""
    model = fr._load_hf(path, **config)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(decode.shape[1]):
            out = model(decode[:, t:t + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.past_key_values
    return torch.cat(logits, 1)


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("name", list(BASES))
def test_spec_reads_the_scaling(bases, name, spelling):
    """Both spellings parse to the same RoPE, the one the base was written with."""
    spec = _base(bases[name, spelling]).model
    family, overrides = BASES[name]
    params = overrides["rope_parameters"]
    assert spec.rope.kind == params.get(FULL, params)["rope_type"]
    assert spec.rope == _base(bases[name, SPELLINGS[0]]).model.rope
    if name == "phi3.5":
        assert spec.rope.switch_at == ORIGINAL and spec.rope.attention_factor > 1.4  # sqrt(1 + ln 32 / ln 8)
    if name == "gemma3":
        assert spec.sliding_rope.kind == "default" and spec.tie_word_embeddings


@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT], ids=["short-prompt", "long-prompt"])
@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("name", list(BASES))
def test_cached_decoding_matches_transformers(bases, name, spelling, prompt):
    """The reference against transformers' cached decoding."""
    path = bases[name, spelling]
    expected = hf_cached_logits(path, prompt, DECODE)
    ref = ReferenceModel(_base(path), adapters=False)
    assert (cached_logits(ref, prompt, DECODE) - expected).abs().max().item() < ATOL


def _unscaled(path: Path) -> dict:
    """from_pretrained overrides that drop the scaling and keep each layer type's base."""
    params = json.loads((path / "config.json").read_text())["rope_parameters"]
    if FULL in params:
        return {"rope_parameters": {t: {"rope_type": "default", "rope_theta": p["rope_theta"]} for t, p in params.items()}}
    return {"rope_parameters": {"rope_type": "default", "rope_theta": params["rope_theta"]}}


@pytest.mark.parametrize("name", list(BASES))
def test_scaling_matters(bases, name):
    """On transformers' own model the scaling moves the logits far beyond the tolerance, so the comparisons
    above test it; dynamic NTK is the exception: transformers changes nothing below max_position_embeddings,
    and every length a command accepts is below it, so its logits equal the unscaled ones."""
    path = bases[name, "transformers-5"]
    scaled = hf_cached_logits(path, LONG_PROMPT, DECODE)
    plain = hf_cached_logits(path, LONG_PROMPT, DECODE, **_unscaled(path))
    diff = (scaled - plain).abs().max().item()
    if name == "qwen3-dynamic":
        assert diff < 1e-5
    else:
        assert diff > 100 * ATOL, diff


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("name", list(BASES))
def test_peft_lora_through_run_and_onnx(tmp_path, bases, name, spelling, cli):
    """A PEFT LoRA on every projection: `run --save-logits` against PEFT's own forward, and the portable ONNX
    graph (ONNX Runtime) against PEFT over cached steps past LongRoPE's switch."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from adafuse_export.onnx.export import export_onnx
    from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner

    base = bases[name, spelling]
    family = BASES[name][0]
    lora = fr.write_peft_lora(tmp_path / "lora", base, target_modules=list(families.get(family).module_names))
    expected = fr.peft_forward_logits(lora, base, LONG_PROMPT)
    assert (expected - fr.hf_forward_logits(base, LONG_PROMPT)).abs().max().item() > 1e-2  # the adapter matters
    ids = ",".join(str(i) for i in LONG_PROMPT[0].tolist())
    r = cli("run", lora, "--prompt-ids", ids, "--max-new-tokens", "4", "--save-logits", tmp_path / "l.safetensors")
    assert r.code == 0, r.err
    saved = load_file(str(tmp_path / "l.safetensors"))["logits"]
    assert (saved - expected).abs().max().item() < ATOL

    ckpt = load_checkpoint(lora)
    export_onnx(ckpt, tmp_path / "onnx", "portable", "float32")
    runner = OnnxRuntimeRunner(tmp_path / "onnx")
    ref = ReferenceModel(ckpt)
    want = cached_logits(ref, PROMPT, DECODE).numpy()
    step = runner.prefill(PROMPT.numpy())
    got = [step.logits]
    for t in range(DECODE.shape[1]):
        step = runner.decode(DECODE[:, t:t + 1].numpy())
        got.append(step.logits)
    assert np.abs(np.concatenate(got, 1) - want).max() < ATOL


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("name", NAMED)
def test_convert_with_defaults_then_validate(tmp_path, bases, name, spelling, cli):
    """The user's first two commands on a PEFT LoRA over each named base: convert with its defaults (float16,
    layerwise validation, TensorRT-RTX engine), then validate the ONNX export it left beside the engine."""
    pytest.importorskip("peft")
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is installed by the README's test command")
    base = bases[name, spelling]
    lora = fr.write_peft_lora(tmp_path / "lora", base, target_modules=list(families.get(BASES[name][0]).module_names))
    r = cli("convert", lora, tmp_path / "m.engine")
    assert r.code == 0 and "PASSED" in r.out, r.out + r.err
    r = cli("validate", lora, tmp_path / "m.onnx", "--prompt-ids", ",".join(map(str, LONG_PROMPT[0].tolist())))
    assert r.code == 0 and "PASSED" in r.out, r.out + r.err


EXAMPLES = {  # make_example configs: a scaled RoPE per family, LongRoPE switching inside the validated steps
    "llama": {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "qwen2": {"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    "phi3": {"original_max_position_embeddings": 6, "rope_scaling": {
        "type": "longrope", "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 1.8],
        "long_factor": [1.0, 1.5, 2.5, 4.0, 7.0, 12.0, 20.0, 32.0]}},
}


@pytest.mark.parametrize("flavour", ["portable", "plugin"])
@pytest.mark.parametrize("family", list(EXAMPLES))
def test_pregated_examples_through_both_flavours(tmp_path, family, flavour):
    """Pre-gated experts on every projection with scaled RoPE: both ONNX flavours (the plugin flavour's
    adafuse nodes as ONNX Runtime custom ops) against the reference, prompts and cached steps."""
    from adafuse_export.examples import make_example
    from adafuse_export.onnx.export import export_onnx
    from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner
    from adafuse_export.validate import validate

    ckpt = make_example(tmp_path / "ckpt", "pregate", family=family, seed=9, config=EXAMPLES[family])
    assert ckpt.model.rope.kind != "default"
    export_onnx(ckpt, tmp_path / "onnx", flavour, "float32")
    runner = OnnxRuntimeRunner(tmp_path / "onnx", plugin_ops="cpu") if flavour == "plugin" else None
    report = validate(ckpt, tmp_path / "onnx", [[5, 9, 2, 200, 31], [7, 7, 1, 0, 3]], steps=6, runner=runner)
    by_name = {o["name"]: o for o in report["outputs"]}
    assert report["passed"] and by_name["logits"]["max_abs_diff"] <= ATOL, by_name["logits"]
    assert report["greedy_agreement"]["matched"] == report["greedy_agreement"]["total"]
