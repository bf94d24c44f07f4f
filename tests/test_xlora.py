"""X-LoRA saved by PEFT: converted, run by the reference (scaling pass + classifier + real pass) and compared with
PEFT's own forward; export refused with one line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from adafuse_export.checkpoint import write_canonical
from adafuse_export.converters import detect_format, load_checkpoint
from adafuse_export.reference import ReferenceModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_real as fr  # noqa: E402

pytest.importorskip("peft")
IDS = torch.as_tensor(fr.SAMPLE_IDS)
LORAS = [  # different targets, ranks, alphas, rsLoRA and patterns: the converter folds each scale into its B
    {},
    {"target_modules": ("q_proj", "v_proj", "down_proj"), "r": 8, "lora_alpha": 4},
    {"target_modules": ("gate_proj", "up_proj"), "use_rslora": True, "rank_pattern": {"up_proj": 2}},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return fr.write_hf_base(tmp_path_factory.mktemp("base") / "llama")


@pytest.mark.parametrize("settings", [
    dict(xlora_depth=1),
    dict(xlora_depth=2, xlora_size=16, layerwise_scalings=True),
    dict(xlora_depth=3, xlora_size=8, xlora_dropout_p=0.0, softmax_temperature=0.5, global_scaling_weight=0.7),
    dict(xlora_depth=2, xlora_size=16, layerwise_scalings=True, enable_softmax=False, top_k_lora=2,
         enable_softmax_topk=True),
    dict(xlora_depth=1, layerwise_scalings=True, scaling_pass_value=0.4),
], ids=["depth1", "layerwise", "depth3-temp-weight", "topk-softmax", "scaling-pass-value"])
def test_reference_matches_peft_forward(tmp_path, base, settings):
    d, expected, _ = fr.write_peft_xlora(tmp_path, base, IDS, LORAS, **settings)
    assert detect_format(d) == "xlora"
    ckpt = load_checkpoint(d)
    assert ckpt.adapter.routing == "xlora" and ckpt.adapter.num_experts == 3
    got = ReferenceModel(ckpt)(IDS).logits
    assert (got - expected).abs().max().item() < 1e-4
    # the mixture matters: neither the base model nor the scaling pass alone gives these logits
    assert (ReferenceModel(ckpt, adapters=False)(IDS).logits - expected).abs().max().item() > 1e-2


def test_scaling_pass_applies_the_experts(tmp_path, base):
    """With scaling_pass_value 0 the scaling pass is the base model; with another value PEFT adds every expert
    scaled by it (its 'disable_adapter_layers' does not reach the X-LoRA layers): the classifier input differs."""
    d0, logits0, _ = fr.write_peft_xlora(tmp_path / "zero", base, IDS, LORAS, xlora_depth=1)
    d1, logits1, _ = fr.write_peft_xlora(tmp_path / "half", base, IDS, LORAS, xlora_depth=1, scaling_pass_value=0.5)
    assert (logits0 - logits1).abs().max().item() > 1e-3
    for d, expected in ((d0, logits0), (d1, logits1)):
        assert (ReferenceModel(load_checkpoint(d))(IDS).logits - expected).abs().max().item() < 1e-4


def test_kv_cached_decoding_matches_peft_generate(tmp_path, base):
    """PEFT re-runs both passes over the whole sequence each step (no KV cache); the reference keeps one cache
    per pass. Causality makes them equal: greedy tokens agree and the cached steps equal a full recompute."""
    d, _, generated = fr.write_peft_xlora(tmp_path, base, IDS, LORAS, xlora_depth=2, xlora_size=16,
                                         layerwise_scalings=True)
    ref = ReferenceModel(load_checkpoint(d))
    tokens, steps = ref.generate(IDS[:1], 4)
    assert torch.equal(tokens, generated)
    full = ref(torch.cat([IDS[:1], tokens[:, :3]], dim=1)).logits
    for i, step in enumerate(steps[1:]):
        assert (step.logits[:, -1] - full[:, IDS.shape[1] + i]).abs().max().item() < 1e-4


def test_peft_save_loses_the_classifier_first_layer(tmp_path, base):
    """Why the converter reads classifier layer 0 from folder "0": PEFT 0.21 leaves it out of the root file."""
    from safetensors import safe_open

    d, _, _ = fr.write_peft_xlora(tmp_path, base, IDS, LORAS, xlora_depth=2, xlora_size=16)
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        assert not any(".layers.0." in k for k in f.keys())
    with safe_open(str(d / "0" / "adapter_model.safetensors"), "pt") as f:
        assert f.get_slice("base_model.internal_xlora_classifier.layers.weight").get_shape() == [16, 64]


def test_canonical_roundtrip(tmp_path, base):
    d, expected, _ = fr.write_peft_xlora(tmp_path, base, IDS, LORAS, xlora_depth=2, xlora_size=16, top_k_lora=1)
    write_canonical(load_checkpoint(d), tmp_path / "canonical")
    ckpt = load_checkpoint(tmp_path / "canonical")
    assert ckpt.format == "adafuse" and ckpt.adapter.xlora is not None
    assert (ReferenceModel(ckpt)(IDS).logits - expected).abs().max().item() < 1e-4


def test_export_and_convert_are_refused(tmp_path, base, cli):
    d, _, _ = fr.write_peft_xlora(tmp_path, base, IDS, LORAS, xlora_depth=1)
    reason = "X-LoRA (xlora) cannot be exported: its scaling pass is a second full forward of the model"
    for args in (("export-onnx", d, tmp_path / "onnx"), ("convert", d, tmp_path / "x.engine")):
        r = cli(*args)
        assert r.code == 2 and reason in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "x.engine").exists()
    r = cli("run", d, "--prompt-ids", "1,2,3", "--max-new-tokens", "2")
    assert r.code == 0, r.err


def test_bad_xlora_checkpoints(tmp_path, base, cli):
    d, _, _ = fr.write_peft_xlora(tmp_path, base, IDS, LORAS[:2], xlora_depth=1)
    cfg = json.loads((d / "adapter_config.json").read_text())

    def inspect_with(**changes):
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
        return cli("inspect", d)

    r = inspect_with(adapters={"a": cfg["adapters"]["0"], "b": cfg["adapters"]["1"]})
    assert r.code == 2 and "adapter names must be \"0\"..\"1\" in order" in r.err
    r = inspect_with(adapters={"0": cfg["adapters"]["0"], "1": str(tmp_path / "gone")})
    assert r.code == 2 and "adapter '1' names" in r.err and "not a local LoRA directory" in r.err
    r = inspect_with(hidden_size=32)
    assert r.code == 2 and "hidden_size 32 does not match the base model's 64" in r.err
    r = inspect_with(xlora_depth=2, xlora_size=16)
    assert r.code == 2 and "missing X-LoRA classifier tensor 'base_model.internal_xlora_classifier.layers.3.weight'" in r.err


def test_phi3_site_numbering_follows_transformers_module_order(tmp_path):
    """Phi-3 registers o_proj before qkv_proj: PEFT's layer-wise scalings are numbered that way."""
    base = fr.write_hf_base(tmp_path / "phi3", "phi3", pad_token_id=0)
    loras = [{"target_modules": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")},
             {"target_modules": ("o_proj", "qkv_proj"), "r": 2}]
    d, expected, _ = fr.write_peft_xlora(tmp_path, base, IDS, loras, xlora_depth=1, layerwise_scalings=True)
    ckpt = load_checkpoint(d)
    assert ckpt.adapter.xlora is not None and ckpt.adapter.xlora.module_order[:2] == ("o_proj", "qkv_proj")
    assert (ReferenceModel(ckpt)(IDS).logits - expected).abs().max().item() < 1e-4


def test_inspect_reports_the_xlora_settings_peft_saved(tmp_path, base, cli):
    """inspect --json lists the mixing settings; compared with PEFT's own adapter_config.json."""
    d, _, _ = fr.write_peft_xlora(tmp_path, base, IDS, LORAS, xlora_depth=2, xlora_size=16, layerwise_scalings=True,
                                  top_k_lora=1, enable_softmax_topk=True, softmax_temperature=0.5)
    r = cli("inspect", d, "--json")
    assert r.code == 0, r.err
    got = json.loads(r.out)["adapter"]["xlora"]
    peft_cfg = json.loads((d / "adapter_config.json").read_text())
    for ours, theirs in (("classifier_depth", "xlora_depth"), ("classifier_size", "xlora_size"),
                         ("layerwise_scalings", "layerwise_scalings"), ("enable_softmax", "enable_softmax"),
                         ("softmax_temperature", "softmax_temperature"), ("enable_softmax_topk", "enable_softmax_topk"),
                         ("top_k_lora", "top_k_lora"), ("scaling_pass_value", "scaling_pass_value"),
                         ("global_scaling_weight", "global_scaling_weight")):
        assert got[ours] == peft_cfg[theirs], (ours, got[ours], peft_cfg[theirs])
