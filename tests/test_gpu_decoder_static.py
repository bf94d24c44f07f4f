"""A pre-gated checkpoint with static (always-on, unrouted) LoRA modules beside its routed ones: the decoder
merges the static ones into the weights (as the exporters do) instead of dropping them. Runs the decoder's
PyTorch ops on the CPU against the float32 reference; tests/gpu runs the kernels."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adafuse_export.converters import load_checkpoint
from adafuse_export.examples import make_example
from adafuse_export.reference import ReferenceModel
from adafuse_export.runners.torch_cuda import GpuDecoder

PROMPT = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
STATIC = ("q_proj", "v_proj")


def pregate_with_static(root):
    """The pregate example with q_proj and v_proj turned into static LoRAs (their first expert, scaled up so
    that dropping them changes the tokens)."""
    make_example(root, "pregate")
    cfg = json.loads((root / "adafuse_config.json").read_text())
    cfg["target_modules"] = [m for m in cfg["target_modules"] if m not in STATIC]
    cfg["static_modules"] = list(STATIC)
    (root / "adafuse_config.json").write_text(json.dumps(cfg))
    tensors = load_file(root / "adafuse_adapters.safetensors")
    for name in list(tensors):
        if any(f".{m}.lora_" in name for m in STATIC):
            tensors[name] = (tensors[name][:1] * 4).contiguous()
    save_file(tensors, root / "adafuse_adapters.safetensors")
    return load_checkpoint(root)


@pytest.mark.parametrize("strategy", ["unmerged", "fused", "switch"])
def test_static_modules_are_merged_not_dropped(tmp_path, strategy):
    ckpt = pregate_with_static(tmp_path / "ck")
    assert ckpt.adapter.static_modules == STATIC
    want, steps = ReferenceModel(ckpt, dtype=torch.float32).generate(PROMPT, 8)
    dec = GpuDecoder.from_checkpoint(ckpt, device="cpu", dtype=torch.float32, strategy=strategy, max_seq=20)
    logits = dec.prefill(PROMPT)
    assert float((logits - steps[0].logits).abs().max()) <= 1e-4
    assert torch.equal(dec.generate(PROMPT, 8), want)


def test_the_static_modules_matter_here(tmp_path):
    """Without its static modules the same checkpoint's logits move far beyond the tolerance above, so the
    test above fails for a decoder that drops them (as it did before)."""
    ckpt = pregate_with_static(tmp_path / "ck")
    with_static = ReferenceModel(ckpt, dtype=torch.float32).generate(PROMPT, 1)[1][0].logits
    cfg = json.loads((tmp_path / "ck" / "adafuse_config.json").read_text())
    cfg["static_modules"] = []
    (tmp_path / "ck" / "adafuse_config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "ck" / "adafuse_adapters.safetensors")
    save_file({n: t for n, t in tensors.items() if not any(f".{m}.lora_" in n for m in STATIC)},
              tmp_path / "ck" / "adafuse_adapters.safetensors")
    without = ReferenceModel(load_checkpoint(tmp_path / "ck"), dtype=torch.float32).generate(PROMPT, 1)[1][0].logits
    assert float((with_static - without).abs().max()) > 1e-2
