"""Converters against the real libraries: converted checkpoint + reference == the library's own forward."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from adafuse_export.converters import detect_format, load_checkpoint
from adafuse_export.reference import ReferenceModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_real as fr  # noqa: E402

IDS = torch.as_tensor(fr.SAMPLE_IDS)
ATOL = 1e-4
needs_moe_peft = pytest.mark.skipif(not fr.available("moe_peft"), reason="moe_peft not installed")
needs_mixlora = pytest.mark.skipif(not fr.available("mixlora"), reason="mixlora not installed")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {f: fr.write_hf_base(root / f, f, tie_word_embeddings=(f == "qwen2")) for f in ("llama", "mistral", "qwen2")}


def reference_logits(path, **kw):
    return ReferenceModel(load_checkpoint(path, **kw))(IDS).logits


@pytest.mark.parametrize("family,kwargs", [
    ("llama", {}), ("mistral", {}), ("qwen2", {}),
    ("llama", {"use_rslora": True}),
    ("llama", {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"down_proj": 16}}),
    ("llama", {"target_modules": ["q_proj", "v_proj"]}),
], ids=["llama", "mistral", "qwen2", "rslora", "patterns", "qv"])
def test_peft_lora_matches_peft(tmp_path, bases, family, kwargs):
    pytest.importorskip("peft")
    d = fr.write_peft_lora(tmp_path / "lora", bases[family], **kwargs)
    assert detect_format(d) == "peft-lora"
    ckpt = load_checkpoint(d)
    assert ckpt.adapter.routing == "none" and ckpt.adapter.num_experts == 1
    expected = fr.peft_forward_logits(d, bases[family], IDS)
    got = ReferenceModel(ckpt)(IDS).logits
    assert (got - expected).abs().max().item() < ATOL
    if "rank_pattern" in kwargs:
        assert ckpt.adapter.site_rank("layers.0.q_proj") == 8 and ckpt.adapter.site_rank("layers.0.k_proj") == 4


def test_peft_lora_base_option_and_missing_base(tmp_path, bases, cli):
    pytest.importorskip("peft")
    d = fr.write_peft_lora(tmp_path / "lora", bases["llama"])
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    r = cli("inspect", d)
    assert r.code == 2 and "base_model_name_or_path 'meta-llama/Llama-2-7b-hf' is not a local directory; pass --base DIR" in r.err
    r = cli("inspect", d, "--base", bases["llama"], "--json")
    assert r.code == 0 and json.loads(r.out)["format"] == "peft-lora"
    r = cli("inspect", d, "--base", tmp_path / "nothing")
    assert r.code == 2 and "--base" in r.err and "not found" in r.err


@needs_moe_peft
@pytest.mark.parametrize("kind", fr.MOE_PEFT_KINDS)
def test_moe_peft_matches_library(tmp_path, bases, kind):
    """Checkpoints written by moe_peft itself, against moe_peft's own forward."""
    d = fr.write_moe_peft(tmp_path / kind, bases["llama"], kind)
    assert detect_format(d) == "moe-peft"
    assert (reference_logits(d) - fr.moe_peft_forward_logits(d, bases["llama"], IDS)).abs().max().item() < ATOL
    # the library's layout read by the per-token implementation of docs/formats/moe-peft.md, too
    assert (reference_logits(d) - fr.moe_peft_reference_logits(d, bases["llama"], IDS)).abs().max().item() < ATOL


@pytest.mark.parametrize("kind", fr.MOE_PEFT_KINDS)
def test_moe_peft_layout_matches_the_documented_formula(tmp_path, bases, kind, cli):
    """Checkpoints laid out by the suite as docs/formats/moe-peft.md describes, against the suite's own
    per-token implementation of that document (no moe_peft needed; the library is the test above)."""
    d = fr.write_moe_peft_synthetic(tmp_path / kind, bases["llama"], kind)
    assert detect_format(d) == "moe-peft"
    assert (reference_logits(d) - fr.moe_peft_reference_logits(d, bases["llama"], IDS)).abs().max().item() < ATOL
    r = cli("inspect", d, "--json")
    info = json.loads(r.out)
    assert r.code == 0 and info["format"] == "moe-peft"
    assert info["adapter"]["expert_kind"] == ("ffn" if kind == "mixlora" else "linear")
    assert info["adapter"]["router_kind"] == ("dense" if kind == "loramoe" else "topk")


@needs_moe_peft
def test_mixlora_expert_lora_rslora_top1(tmp_path, bases):
    d = fr.write_moe_peft(tmp_path / "mx", bases["llama"], "mixlora", expert_r=8, expert_alpha=4, use_rslora=True,
                          num_experts=3, top_k=1)
    ckpt = load_checkpoint(d)
    assert ckpt.adapter.r == 8 and ckpt.adapter.site_rank("layers.0.q_proj") == 4
    expected = fr.moe_peft_forward_logits(d, bases["llama"], IDS)
    assert (ReferenceModel(ckpt)(IDS).logits - expected).abs().max().item() < ATOL


@needs_moe_peft
@needs_mixlora
def test_mixlora_package_forward(tmp_path, bases):
    d = fr.write_moe_peft(tmp_path / "mx", bases["llama"], "mixlora", num_experts=8, top_k=3)
    assert (reference_logits(d) - fr.mixlora_forward_logits(d, bases["llama"], IDS)).abs().max().item() < ATOL


@pytest.mark.parametrize("strategy,fragment", [
    ("mixlora-switch", "routing_strategy 'mixlora-switch' (switch routing with capacity) is not supported"),
    ("mixlora-dynamic", "routing_strategy 'mixlora-dynamic' (top-p routing) is not supported"),
])
def test_moe_peft_unsupported_strategies(tmp_path, bases, cli, strategy, fragment):
    d = fr.write_moe_peft_synthetic(tmp_path / "x", bases["llama"], "mixlora")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["routing_strategy"] = strategy
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    r = cli("inspect", d)
    assert r.code == 2 and fragment in r.err


def test_mixlora_expert_activation_must_be_the_base_models(tmp_path, bases, cli):
    """MixLoRA experts are copies of the base FFN: an act_fn other than the base's own is refused."""
    d = fr.write_moe_peft_synthetic(tmp_path / "x", bases["llama"], "mixlora")
    cfg = json.loads((d / "adapter_config.json").read_text())
    for act, ok in (("silu", True), ("gelu_pytorch_tanh", False), ("relu", False)):
        cfg["act_fn"] = act
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        r = cli("inspect", d)
        assert r.code == (0 if ok else 2), r.err
        assert ok or f"act_fn '{act}' is not supported (expected the base model's 'silu')" in r.err


def test_moe_peft_missing_expert_tensor(tmp_path, bases, cli):
    d = fr.write_moe_peft_synthetic(tmp_path / "x", bases["llama"], "mola")
    w = torch.load(d / "adapter_model.bin", weights_only=True)
    del w["mola.layers.1.mlp.up_proj.experts.2.lora_B.weight"]
    torch.save(w, d / "adapter_model.bin")
    r = cli("inspect", d)
    assert r.code == 2 and "missing tensor 'mola.layers.1.mlp.up_proj.experts.2.lora_B.weight'" in r.err


def test_format_option_forces_a_converter(tmp_path, bases, cli):
    d = fr.write_moe_peft_synthetic(tmp_path / "x", bases["llama"], "mola")
    r = cli("inspect", d, "--format", "peft-lora")
    assert r.code == 2 and r.err.startswith("error: ")
