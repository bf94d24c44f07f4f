"""Every registered family against the real libraries, through every backend.

Bases are tiny random `XxxForCausalLM` written by transformers itself (float32, norms perturbed),
with settings that make each family's features move the logits: a sliding window shorter than the
prompt (mistral on every layer, qwen2 from layer 1 on), Qwen3's q/k norms with a head_dim that is
not hidden/heads, Phi-3's fused projections and partial rotary. Adapters are PEFT LoRA written and
run by peft (on Phi-3 they target the fused qkv_proj / gate_up_proj, as PEFT users do).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adafuse_export import families
from adafuse_export.converters import load_checkpoint
from adafuse_export.errors import AdafuseError
from adafuse_export.examples import KINDS, make_example
from adafuse_export.reference import ReferenceModel
from adafuse_export.spec import ModelSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_real as fr  # noqa: E402

transformers = pytest.importorskip("transformers")

WINDOW = 4
BASES = {  # family -> config overrides of fixtures_real.TINY_DIMS
    "llama": dict(),
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(head_dim=24),
    "phi3": dict(pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5}),
}
# PEFT target_modules per family: every projection the family has (Phi-3's are fused)
TARGETS = {f: list(families.get(f).module_names) for f in BASES}
PROMPTS = torch.tensor([[1, 5, 9, 33, 100, 7, 64, 2, 17, 90], [3, 3, 17, 120, 45, 8, 99, 11, 0, 127]])
DECODE = torch.tensor([[4, 77, 12, 5], [60, 2, 2, 9]])  # cached steps past the window
ATOL = 1e-4


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-bases")
    return {f: fr.write_hf_base(root / f, f, seed=3, tie_word_embeddings=(f == "qwen3"), **BASES[f]) for f in BASES}


def _base(path):
    """The transformers base alone as a Checkpoint (its adapter spec is never read: adapters=False)."""
    from adafuse_export.checkpoint import Checkpoint
    from adafuse_export.converters.adafuse import load_hf_base
    from adafuse_export.spec import AdapterSpec
    from adafuse_export.tensors import in_memory_source

    cfg, model, weights = load_hf_base(Path(path))
    none = AdapterSpec(num_experts=1, top_k=1, r=1, lora_alpha=1.0, target_modules=(), routing="none",
                       static_modules=model.arch.module_names[:1])
    return Checkpoint(Path(path), "adafuse", cfg, model, none, weights, in_memory_source({}, "none"))


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def cached_logits(model: ReferenceModel, prompt: torch.Tensor = PROMPTS, decode: torch.Tensor = DECODE) -> torch.Tensor:
    """Prefill `prompt`, then feed `decode` one token at a time through the KV cache: [B, S+D, vocab]."""
    out = model(prompt)
    logits = [out.logits]
    for t in range(decode.shape[1]):
        out = model(decode[:, t:t + 1], out.cache)
        logits.append(out.logits)
    return torch.cat(logits, 1)


def test_registry_lists_every_family():
    assert set(families.names()) >= set(BASES)
    with pytest.raises(AdafuseError, match="model_type 'gpt2' is not supported \\(expected one of ") as err:
        ModelSpec.from_hf_config({"model_type": "gpt2"}, "config.json")
    assert str(err.value).endswith(f"(expected one of {', '.join(families.names())})")


@pytest.mark.parametrize("family", list(BASES))
def test_base_matches_transformers_prefill_and_cached_decode(bases, family):
    ckpt = _base(bases[family])
    hf = _hf(bases[family])
    with torch.no_grad():
        expected = hf(torch.cat([PROMPTS, DECODE], 1)).logits
    got = cached_logits(ReferenceModel(ckpt, adapters=False))
    assert (got - expected).abs().max().item() < ATOL


def test_family_features_are_read(bases):
    """What each base exercises is really in the parsed spec (so the comparisons above test it)."""
    spec = {f: _base(bases[f]).model for f in BASES}
    assert spec["mistral"].sliding_layers == (0, 1) and spec["mistral"].sliding_window == WINDOW
    assert spec["qwen2"].sliding_layers == (1,) and spec["qwen2"].bias_modules == ("q_proj", "k_proj", "v_proj")
    assert spec["qwen3"].arch.qk_norm and spec["qwen3"].head_dim == 24 and spec["qwen3"].bias_modules == ()
    assert spec["phi3"].rotary_dim == 8 and spec["phi3"].arch.module_names == ("qkv_proj", "o_proj", "gate_up_proj",
                                                                               "down_proj")
    assert spec["phi3"].linear_shape("qkv_proj") == (64 + 2 * 32, 64)


@pytest.mark.parametrize("family", list(BASES))
def test_peft_lora_matches_peft_through_reference_and_onnx(tmp_path, bases, family):
    pytest.importorskip("peft")
    from adafuse_export.onnx.export import export_onnx
    from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner

    d = fr.write_peft_lora(tmp_path / "lora", bases[family], target_modules=TARGETS[family])
    ckpt = load_checkpoint(d)
    assert ckpt.adapter.static_modules == tuple(TARGETS[family])
    expected = fr.peft_forward_logits(d, bases[family], PROMPTS)
    base = fr.hf_forward_logits(bases[family], PROMPTS)
    assert (expected - base).abs().max().item() > 1e-2  # the adapter matters
    assert (ReferenceModel(ckpt)(PROMPTS).logits - expected).abs().max().item() < ATOL
    export_onnx(ckpt, tmp_path / "onnx", "portable", "float32")
    runner = OnnxRuntimeRunner(tmp_path / "onnx")
    got = runner.prefill(PROMPTS.numpy()).logits
    assert np.abs(got - expected.numpy()).max() < ATOL


def test_peft_lora_rank_pattern_on_a_fused_projection(tmp_path, bases):
    """PEFT's per-module patterns name the fused module; the site's rank and scale follow it."""
    pytest.importorskip("peft")
    d = fr.write_peft_lora(tmp_path / "lora", bases["phi3"], target_modules=["qkv_proj", "gate_up_proj"],
                           rank_pattern={"qkv_proj": 8}, alpha_pattern={"gate_up_proj": 4})
    ckpt = load_checkpoint(d)
    assert ckpt.adapter.site_rank("layers.1.qkv_proj") == 8
    assert ckpt.adapter.site_scale("layers.1.gate_up_proj") == 4 / 4
    expected = fr.peft_forward_logits(d, bases["phi3"], PROMPTS)
    assert (ReferenceModel(ckpt)(PROMPTS).logits - expected).abs().max().item() < ATOL


NEW = ["qwen3", "phi3"]


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Canonical examples of every kind on the new families (Phi-3's adapters sit on fused projections)."""
    root = tmp_path_factory.mktemp("family-examples")
    config = {"qwen3": {"head_dim": 24}, "phi3": {"partial_rotary_factor": 0.5}}
    return {(f, kind): make_example(root / f"{f}-{kind}", kind, family=f, seed=11, config=config[f])
            for f in NEW for kind in KINDS}


def test_examples_adapt_fused_projections(examples):
    ckpt = examples["phi3", "pregate"]
    assert ckpt.adapter.target_modules == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert ckpt.adapters.info("layers.0.qkv_proj.lora_B").shape == (4, 64 + 2 * 32, 8)
    assert examples["phi3", "lora"].adapter.static_modules == ("qkv_proj",)  # roles q and v live in qkv_proj
    assert examples["phi3", "mixlora"].adapter.target_modules == ("gate_up_proj", "down_proj")


def test_fused_site_is_adapted_before_the_split(examples):
    """The LoRA of qkv_proj acts on the stacked [q; k; v] output: checked by hand in float64."""
    ckpt = examples["phi3", "pregate"]
    model = ReferenceModel(ckpt, dtype=torch.float64)
    x = torch.randn(3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ids, gates = torch.tensor([[0, 3], [1, 2], [2, 0]]), torch.rand(3, 2, dtype=torch.float64)
    W = model.w["model.layers.1.self_attn.qkv_proj.weight"]
    A, B = model.a["layers.1.qkv_proj.lora_A"], model.a["layers.1.qkv_proj.lora_B"]
    s = ckpt.adapter.site_scale("layers.1.qkv_proj")
    full = torch.stack([W @ x[n] + s * sum(gates[n, j] * B[ids[n, j]] @ (A[ids[n, j]] @ x[n]) for j in range(2))
                        for n in range(3)])
    q, k, v = model._project(x, 1, "qkv", (ids, gates))
    assert torch.allclose(torch.cat([q, k, v], -1), full, atol=1e-10)
    assert q.shape[-1] == 64 and k.shape[-1] == v.shape[-1] == 32


@pytest.mark.parametrize("flavour", ["portable", "plugin"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", NEW)
def test_onnx_matches_reference(tmp_path, examples, family, kind, flavour):
    from adafuse_export.onnx.export import export_onnx
    from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner
    from adafuse_export.validate import validate

    ckpt = examples[family, kind]
    export_onnx(ckpt, tmp_path / "onnx", flavour, "float32")
    runner = OnnxRuntimeRunner(tmp_path / "onnx", plugin_ops="cpu") if flavour == "plugin" else None
    report = validate(ckpt, tmp_path / "onnx", [[5, 9, 2, 200, 31, 64, 1], [7, 7, 1, 0]], steps=5, runner=runner)
    by_name = {o["name"]: o for o in report["outputs"]}
    assert report["passed"] and by_name["logits"]["max_abs_diff"] <= 1e-4, by_name["logits"]
    assert report["greedy_agreement"]["matched"] == report["greedy_agreement"]["total"]


@pytest.mark.parametrize("cfg,message", [
    ({"model_type": "llama", "partial_rotary_factor": 0.5},
     "partial_rotary_factor 0.5 is not supported for model_type 'llama' \\(expected 1.0\\)"),
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
     "rope_parameters 'short_factor' must be a list of 8 numbers \\(rotary dimensions / 2\\), found None"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.35},
     "the rotary dimensions \\(head_dim 16 x partial_rotary_factor 0.35\\) must be even and positive, found 5"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4, "layer_types": ["full_attention"]},
     "layer_types must list 2 of 'full_attention' / 'sliding_attention'"),
    ({"model_type": "qwen3", "hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for model_type 'qwen3'"),
])
def test_config_refusals(cfg, message):
    from adafuse_export.examples import TINY_CONFIG

    with pytest.raises(AdafuseError, match=f"^config.json: {message}"):
        ModelSpec.from_hf_config({**TINY_CONFIG, **cfg}, "config.json")


def test_adapter_on_a_module_the_family_lacks(examples, tmp_path):
    """A canonical adapter naming llama's q_proj on Phi-3 (which has qkv_proj) is refused by name."""
    import json
    import shutil

    src = examples["phi3", "pregate"].path
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adafuse_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    (dst / "adafuse_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdafuseError, match="unknown module 'q_proj' for model_type 'phi3' \\(expected one of "
                                           "qkv_proj, o_proj, gate_up_proj, down_proj\\)"):
        load_checkpoint(dst)


def test_register_refuses_an_incomplete_description():
    """A family must compute every role exactly once, with a norm and activation the backends implement."""
    from adafuse_export.families import Family, Projection, register

    class NoDown(Family):
        name = "no_down"
        projections = tuple(p for p in Family.projections if p.name != "down_proj")

    class TwoQ(Family):
        name = "two_q"
        projections = Family.projections + (Projection("q2_proj", "self_attn", ("q",)),)

    class LayerNormed(Family):
        name = "layer_normed"
        norm = "layer_norm"

    for cls in (NoDown, TwoQ, LayerNormed):
        with pytest.raises(ValueError, match=cls.name):
            register(cls)
    with pytest.raises(ValueError, match="already registered"):
        register(type("Again", (Family,), {"name": "llama"}))
    with pytest.raises(ValueError, match="must be roles of one stage"):
        Projection("qo_proj", "self_attn", ("q", "o"))
    assert not set(families.names()) & {"no_down", "two_q", "layer_normed"}
