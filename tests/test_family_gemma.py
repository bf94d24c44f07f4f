"""Gemma 2 and Gemma 3 (text) against the real libraries, through every backend.

The bases are tiny random `Gemma2ForCausalLM` / `Gemma3ForCausalLM` written by transformers itself,
with settings chosen so that each Gemma feature moves the logits (test_features_matter checks that
on transformers' own model): attention and final logit soft-capping small enough for tanh to bend,
query_pre_attn_scalar != head_dim, head_dim != hidden/heads, a sliding window (4) shorter than the
prompts, an irregular layer_types pattern and, for Gemma 3, a local RoPE base far from the global.
transformers runs with eager attention (the only implementation that soft-caps attention logits).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from adafuse_export.checkpoint import ADAPTER_CONFIG, ADAPTERS, Checkpoint
from adafuse_export.converters import load_checkpoint
from adafuse_export.converters.adafuse import load_hf_base
from adafuse_export.errors import AdafuseError
from adafuse_export.examples import KINDS, make_example
from adafuse_export.onnx import plugin_ops
from adafuse_export.onnx.export import export_onnx
from adafuse_export.reference import ReferenceModel
from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner
from adafuse_export.spec import AdapterSpec, ModelSpec
from adafuse_export.tensors import in_memory_source, save_safetensors
from adafuse_export.validate import validate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_real as fr  # noqa: E402

transformers = pytest.importorskip("transformers")

WINDOW = 4
SLIDING, FULL = "sliding_attention", "full_attention"
GEMMA = {
    "gemma2": dict(head_dim=24, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=20,
                   attn_logit_softcapping=2.0, final_logit_softcapping=1.5),
    "gemma3_text": dict(head_dim=24, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=20,
                        final_logit_softcapping=1.5, layer_types=[SLIDING, FULL, SLIDING],
                        rope_parameters={FULL: {"rope_type": "default", "rope_theta": 10000.0},
                                         SLIDING: {"rope_type": "default", "rope_theta": 20.0}}),
}
FAMILIES = list(GEMMA)
# token 0 is the pad row, which transformers initialises to zero: its pre-gate is uniform (all ties)
PROMPTS = torch.tensor([[1, 5, 9, 33, 100, 7, 64, 2, 17, 90], [3, 3, 17, 120, 45, 8, 99, 11, 0, 127]])
DECODE = torch.tensor([[4, 77, 12, 5, 31, 126], [60, 2, 2, 9, 110, 8]])  # more cached steps than the window
ATOL = 1e-4


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """(family, tied) -> a base directory written by transformers."""
    root = tmp_path_factory.mktemp("gemma-bases")
    return {(f, tied): fr.write_hf_base(root / f"{f}-{tied}", f, seed=3, tie_word_embeddings=tied, **GEMMA[f])
            for f in FAMILIES for tied in (True, False)}


def write_pregate_adapters(out: Path, base: Path, seed: int = 0) -> Path:
    """A canonical pre-gated checkpoint (4 experts, top-2, every projection) over `base` (read with --base)."""
    cfg, model, weights = load_hf_base(base)
    adapter = AdapterSpec(num_experts=4, top_k=2, r=4, lora_alpha=8.0, target_modules=model.arch.module_names)
    ckpt = Checkpoint(out, "adafuse", cfg, model, adapter, weights, in_memory_source({}, "test"))
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=gen) * (1.0 if name.startswith("pregate") else 0.1)
               for name, (shape, _) in ckpt.expected_adapter_shapes().items()}
    out.mkdir(parents=True)
    save_safetensors(tensors, out / ADAPTERS, {"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter.to_json()))
    return out


@pytest.fixture(scope="module")
def pregated(bases, tmp_path_factory):
    """family -> a pre-gated checkpoint on the tied base."""
    root = tmp_path_factory.mktemp("gemma-pregate")
    return {f: load_checkpoint(write_pregate_adapters(root / f, bases[(f, True)], seed=1), base=bases[(f, True)])
            for f in FAMILIES}


@torch.no_grad()
def hf_steps(model, prompt=PROMPTS, decode=DECODE) -> list[torch.Tensor]:
    """transformers' logits for the prompt, then for each cached decode step."""
    out = model(prompt, use_cache=True)
    steps = [out.logits]
    for t in range(decode.shape[1]):
        out = model(decode[:, t:t + 1], cache=out.cache, use_cache=True)
        steps.append(out.logits)
    return steps


def reference_steps(ref: ReferenceModel, prompt=PROMPTS, decode=DECODE) -> list[torch.Tensor]:
    out = ref(prompt)
    steps = [out.logits]
    for t in range(decode.shape[1]):
        out = ref(decode[:, t:t + 1], out.cache)
        steps.append(out.logits)
    return steps


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_features_matter(bases, family):
    """The settings above are not decoration: switching each off in transformers moves the logits far
    beyond ATOL, so matching transformers (below) is evidence that each one is implemented."""
    base = bases[(family, True)]
    expected = hf_steps(fr._load_hf(base))
    changes = {"final_logit_softcapping": None, "query_pre_attn_scalar": 24, "sliding_window": 64}
    if family == "gemma2":
        changes["attn_logit_softcapping"] = None
    else:  # the local RoPE base
        changes["rope_parameters"] = {FULL: GEMMA[family]["rope_parameters"][FULL],
                                      SLIDING: GEMMA[family]["rope_parameters"][FULL]}
    for key, value in changes.items():
        assert max_diff(hf_steps(fr._load_hf(base, **{key: value})), expected) > 100 * ATOL, key


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reference_matches_transformers_prefill_and_cached_decode(bases, tmp_path, family, tied):
    base = bases[(family, tied)]
    ckpt = load_checkpoint(write_pregate_adapters(tmp_path / "a", base), base=base)
    assert ckpt.model.family == family
    got = reference_steps(ReferenceModel(ckpt, adapters=False))
    assert max_diff(got, hf_steps(fr._load_hf(base))) < ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_lora_matches_peft_through_reference_and_onnx(bases, tmp_path, family):
    """PEFT LoRA on every projection: PEFT's own forward == our reference == the portable ONNX graph in
    ONNX Runtime; then validate() runs cached decode steps of the graph against the reference."""
    base = bases[(family, False)]
    adapter_dir = fr.write_peft_lora(tmp_path / "lora", base)
    ckpt = load_checkpoint(adapter_dir)
    assert ckpt.format == "peft-lora" and ckpt.model.family == family
    expected = fr.peft_forward_logits(adapter_dir, base, PROMPTS)
    assert (expected - fr.hf_forward_logits(base, PROMPTS)).abs().max().item() > 100 * ATOL  # the adapter matters
    assert (ReferenceModel(ckpt)(PROMPTS).logits - expected).abs().max().item() < ATOL
    export_onnx(ckpt, tmp_path / "onnx", "portable", "float32")
    runner = OnnxRuntimeRunner(tmp_path / "onnx")
    assert np.abs(runner.prefill(PROMPTS.numpy()).logits - expected.numpy()).max() < ATOL
    report = validate(ckpt, tmp_path / "onnx", PROMPTS.tolist(), steps=2 * WINDOW)
    assert report["passed"] and report["greedy_agreement"]["fraction"] == 1.0, report


@pytest.mark.skipif(not fr.available("moe_peft"), reason="moe_peft not installed")
@pytest.mark.parametrize("kind", fr.MOE_PEFT_KINDS)
def test_moe_peft_adapters_on_gemma2_match_the_library(bases, tmp_path, kind):
    """MixLoRA / LoRAMoE / MoLA written by MoE-PEFT on a Gemma 2 base and run by MoE-PEFT's own Gemma 2
    (soft-caps, window, post-norms: it equals transformers on the base) == our reference."""
    base = bases[("gemma2", True)]
    adapter_dir = fr.write_moe_peft(tmp_path / kind, base, kind)
    expected = fr.moe_peft_forward_logits(adapter_dir, base, PROMPTS)
    assert (expected - fr.hf_forward_logits(base, PROMPTS)).abs().max().item() > 100 * ATOL  # the adapter matters
    assert (ReferenceModel(load_checkpoint(adapter_dir))(PROMPTS).logits - expected).abs().max().item() < ATOL


@pytest.mark.parametrize("flavour", ["portable", "plugin"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pregated_onnx_matches_reference(pregated, tmp_path, family, flavour):
    """Pre-gate graph (embedding scale and the 1+w norm before the router) and decoder, cached steps;
    the plugin flavour's adapter nodes run as ONNX Runtime custom ops."""
    ckpt = pregated[family]
    export_onnx(ckpt, tmp_path / "onnx", flavour, "float32")
    nodes = onnx.load(str(tmp_path / "onnx" / "decoder.onnx"), load_external_data=False).graph.node
    assert sum(n.domain == plugin_ops.DOMAIN for n in nodes) == (7 * 3 if flavour == "plugin" else 0)
    report = validate(ckpt, tmp_path / "onnx", PROMPTS.tolist(), steps=2 * WINDOW)
    by_name = {o["name"]: o for o in report["outputs"]}
    assert by_name["logits"]["max_abs_diff"] <= ATOL and by_name["expert_ids"]["max_abs_diff"] == 0, by_name
    assert report["passed"] and report["greedy_agreement"]["fraction"] == 1.0, report


HUB_LIKE = {  # configs as the Hub holds them: keys left to the config class's defaults, older key names
    "gemma2": {"model_type": "gemma2", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1,
               "head_dim": 32, "intermediate_size": 96, "num_hidden_layers": 5, "vocab_size": 128},
    "gemma3_text": {"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1,
                    "head_dim": 32, "intermediate_size": 96, "num_hidden_layers": 7, "vocab_size": 128,
                    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window_pattern": 3,
                    "sliding_window": 512, "rope_scaling": None, "query_pre_attn_scalar": 32,
                    "attn_logit_softcapping": 50.0},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_config_defaults_and_older_keys_read_as_transformers_reads_them(family):
    """Absent keys take the config class's defaults; Gemma 3's older rope_theta / rope_local_base_freq /
    sliding_window_pattern keys; Gemma 3 ignores attn_logit_softcapping as its attention does."""
    cfg = HUB_LIKE[family]
    spec = ModelSpec.from_hf_config(dict(cfg), "config.json")
    hf = transformers.AutoConfig.for_model(**cfg)
    assert spec.sliding_layers == tuple(i for i, t in enumerate(hf.layer_types) if t == SLIDING)
    assert 0 < len(spec.sliding_layers) < spec.num_layers and spec.sliding_window == hf.sliding_window
    assert spec.query_scale == hf.query_pre_attn_scalar ** -0.5 and spec.embed_scale == hf.hidden_size ** 0.5
    assert spec.final_softcap == hf.final_logit_softcapping and spec.tie_word_embeddings == hf.tie_word_embeddings
    assert spec.hidden_act == "gelu_tanh" and hf.hidden_activation == "gelu_pytorch_tanh"
    if family == "gemma2":
        assert spec.attn_softcap == hf.attn_logit_softcapping == 50.0 and spec.final_softcap == 30.0
        uncapped = {**cfg, "attn_logit_softcapping": None, "final_logit_softcapping": None}  # null: no capping
        hf = transformers.AutoConfig.for_model(**uncapped)
        spec = ModelSpec.from_hf_config(uncapped, "config.json")
        assert spec.attn_softcap is hf.attn_logit_softcapping is None and spec.final_softcap is hf.final_logit_softcapping is None
        assert spec.rope.theta == hf.rope_parameters["rope_theta"] and spec.sliding_rope is None
    else:
        assert spec.attn_softcap is None
        assert spec.rope.theta == hf.rope_parameters[FULL]["rope_theta"] == 1e6
        assert spec.sliding_rope.theta == hf.rope_parameters[SLIDING]["rope_theta"] == 1e4
        assert [spec.layer_rope(i).theta for i in range(3)] == [1e4, 1e4, 1e6]


@pytest.mark.parametrize("family,change,message", [
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention true is not supported"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported for model_type 'gemma2'"),
    ("gemma2", {"layer_types": [SLIDING, FULL]}, "layer_types must list 5 of"),
    ("gemma2", {"sliding_window": None}, "names sliding_attention layers but sliding_window is not set"),
    ("gemma2", {"attn_logit_softcapping": -1.0}, "key 'attn_logit_softcapping' must be positive"),
    ("gemma2", {"query_pre_attn_scalar": "256"}, "key 'query_pre_attn_scalar' must be int or float"),
    ("gemma3_text", {"rope_scaling": {"rope_type": "proportional", "factor": 8.0}},
     "rope_scaling rope type 'proportional' is not supported"),
    ("gemma3_text", {"rope_parameters": {FULL: {"rope_type": "linear", "rope_theta": 1e6}}},
     "rope_parameters['full_attention'] needs 'factor' for rope type 'linear'"),
    ("gemma3_text", {"rope_local_base_freq": 0}, "key 'rope_local_base_freq' must be a positive number"),
    ("gemma3_text", {"sliding_window_pattern": 0}, "key 'sliding_window_pattern' must be positive"),
])
def test_bad_configs_are_one_line_errors(family, change, message):

    with pytest.raises(AdafuseError, match=r"^config\.json: ") as err:
        ModelSpec.from_hf_config({**HUB_LIKE[family], **change}, "config.json")
    assert message in str(err.value) and "\n" not in str(err.value)


EXAMPLE_CONFIG = {  # make_example configs (over examples.TINY_CONFIG) with every Gemma feature switched on
    "gemma2": dict(head_dim=24, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=20,
                   attn_logit_softcapping=2.0, final_logit_softcapping=1.5),
    "gemma3_text": dict(head_dim=24, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=20,
                        final_logit_softcapping=1.5, layer_types=[SLIDING, FULL, SLIDING], rope_local_base_freq=20.0),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_example_kind_through_onnx(tmp_path, family, kind):
    """Every adapter kind on Gemma (pregate-ffn's router reads pre_feedforward_layernorm's output, Gemma's
    MLP input) through the portable graph against the reference, prompts and cached steps past the window.
    (The plugin flavour differs only in the adapter nodes: test_pregated_onnx_matches_reference runs it.)"""
    ckpt = make_example(tmp_path / "ckpt", kind, family=family, seed=12, config=EXAMPLE_CONFIG[family])
    spec = ckpt.model
    assert spec.attn_softcap == (2.0 if family == "gemma2" else None) and spec.sliding_layers == (0, 2)
    assert (spec.sliding_rope and spec.sliding_rope.theta) == (None if family == "gemma2" else 20.0)
    export_onnx(ckpt, tmp_path / "onnx", "portable", "float32")
    report = validate(ckpt, tmp_path / "onnx", [[5, 9, 2, 200, 31, 64, 1], [7, 7, 1, 0]], steps=WINDOW)
    by_name = {o["name"]: o for o in report["outputs"]}
    assert report["passed"] and by_name["logits"]["max_abs_diff"] <= ATOL, by_name["logits"]
    assert report["greedy_agreement"]["matched"] == report["greedy_agreement"]["total"]
