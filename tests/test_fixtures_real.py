"""Sanity tests for tests/fixtures_real.py: the real-library checkpoints write,
load back into their own library, and the adapters change the logits."""

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_real as fr  # noqa: E402

IDS = fr.SAMPLE_IDS
ATOL = 1e-4


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    return fr.write_hf_base(tmp_path_factory.mktemp("base") / "llama", "llama")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_hf_base_writes_float32_safetensors(tmp_path, family):
    d = fr.write_hf_base(tmp_path / family, family)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == family
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2
    assert (d / "model.safetensors").exists()
    logits = fr.hf_forward_logits(d, IDS)
    assert logits.shape == (2, 8, 128) and logits.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"down_proj": 16}},
        {"target_modules": ["q_proj", "v_proj"]},
    ],
)
def test_peft_lora_roundtrip_changes_logits(tmp_path, llama_base, kwargs):
    pytest.importorskip("peft")
    d = fr.write_peft_lora(tmp_path / "lora", llama_base, **kwargs)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["base_model_name_or_path"] == str(llama_base)
    assert (d / "adapter_model.safetensors").exists()
    from safetensors.torch import load_file

    tensors = load_file(str(d / "adapter_model.safetensors"))
    b = [v for k, v in tensors.items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)
    if "rank_pattern" in kwargs:
        q = [v for k, v in tensors.items() if "q_proj.lora_A" in k]
        assert all(t.shape[0] == 8 for t in q)
    base = fr.hf_forward_logits(llama_base, IDS)
    adapted = fr.peft_forward_logits(d, llama_base, IDS)
    assert (adapted - base).abs().max() > 1e-2
    # deterministic
    assert torch.equal(adapted, fr.peft_forward_logits(d, llama_base, IDS))


needs_moe_peft = pytest.mark.skipif(not fr.available("moe_peft"), reason="moe_peft not installed")
needs_mixlora = pytest.mark.skipif(not fr.available("mixlora"), reason="mixlora not installed")


@needs_moe_peft
@pytest.mark.parametrize("kind", fr.MOE_PEFT_KINDS)
def test_moe_peft_writes_loads_and_matches_reference(tmp_path, llama_base, kind):
    d = fr.write_moe_peft(tmp_path / kind, llama_base, kind)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["routing_strategy"] == kind
    assert cfg["peft_type"] == kind.upper()
    w = torch.load(d / "adapter_model.bin", weights_only=True)
    assert all(k.startswith(f"{kind}.layers.") for k in w)
    if kind == "mixlora":
        assert w["mixlora.layers.1.mlp.moe_gate.weight"].shape == (4, 64)
        assert w["mixlora.layers.0.mlp.down_proj.experts.3.lora_A.weight"].shape == (4, 96)
        assert w["mixlora.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    elif kind == "loramoe":
        assert w["loramoe.layers.0.mlp.down_proj.moe_gate.weight"].shape == (4, 96)
        assert "loramoe.layers.0.self_attn.q_proj.moe_gate.weight" not in w
    else:
        assert w["mola.layers.0.self_attn.o_proj.moe_gate.weight"].shape == (4, 64)
        assert w["mola.layers.0.mlp.up_proj.experts.2.lora_B.weight"].shape == (96, 4)

    base = fr.hf_forward_logits(llama_base, IDS)
    real = fr.moe_peft_forward_logits(d, llama_base, IDS)
    assert (real - base).abs().max() > 1e-2
    assert torch.equal(real, fr.moe_peft_forward_logits(d, llama_base, IDS))
    ref = fr.moe_peft_reference_logits(d, llama_base, IDS)
    torch.testing.assert_close(ref, real, atol=ATOL, rtol=0)


@needs_moe_peft
def test_moe_peft_mixlora_expert_lora_and_rslora(tmp_path, llama_base):
    d = fr.write_moe_peft(tmp_path / "mx", llama_base, "mixlora", expert_r=8, expert_alpha=4, use_rslora=True,
                          num_experts=3, top_k=1)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["expert_lora"]["r"] == 8 and cfg["use_rslora"] is True
    w = torch.load(d / "adapter_model.bin", weights_only=True)
    assert w["mixlora.layers.0.mlp.gate_proj.experts.0.lora_A.weight"].shape == (8, 64)
    assert w["mixlora.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    real = fr.moe_peft_forward_logits(d, llama_base, IDS)
    ref = fr.moe_peft_reference_logits(d, llama_base, IDS)
    torch.testing.assert_close(ref, real, atol=ATOL, rtol=0)


@needs_moe_peft
@needs_mixlora
@pytest.mark.parametrize("targets", [fr.ALL_LINEARS, ("gate_proj", "up_proj")])
def test_mixlora_package_agrees_with_moe_peft(tmp_path, llama_base, targets):
    d = fr.write_moe_peft(tmp_path / "mx", llama_base, "mixlora", target_modules=targets, num_experts=8, top_k=3)
    real = fr.moe_peft_forward_logits(d, llama_base, IDS)
    pkg = fr.mixlora_forward_logits(d, llama_base, IDS)
    torch.testing.assert_close(pkg, real, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", fr.MOE_PEFT_KINDS)
def test_synthetic_layout_runs_in_reference(tmp_path, llama_base, kind):
    d = fr.write_moe_peft_synthetic(tmp_path / kind, llama_base, kind)
    ref = fr.moe_peft_reference_logits(d, llama_base, IDS)
    assert (ref - fr.hf_forward_logits(llama_base, IDS)).abs().max() > 1e-2
    if fr.available("moe_peft"):
        torch.testing.assert_close(ref, fr.moe_peft_forward_logits(d, llama_base, IDS), atol=ATOL, rtol=0)
