"""Every registered family and every scaled RoPE through the GPU decoder, against the CPU reference.

Shared by tests/test_family_decode_cpu.py (the decoder's PyTorch ops, TorchOps: the CPU suite) and
tests/gpu/test_gpu_family_decode.py (the kernel library, KernelOps, CUDA graphs: marker gpu).

For each family a pre-gated example is built with the features that set the family apart turned
up (short sliding windows, soft-caps, query scale, a local RoPE base, partial RoPE), and one more per
scaled RoPE the bases people fine-tune use (Llama 3.1's llama3, Qwen2.5's YaRN, Phi-3.5's LongRoPE with
its switch to the long factors inside the decoded steps, Gemma 3's linear on the full layers with tied
embeddings, linear, dynamic). The CPU reference (float32) decodes greedily; the decoder (float32)
decodes the same prompt with every strategy (dense without adapters; unmerged, fused, switch with
them): the tokens must be equal. A prompt longer than the windows makes the windows matter.
A new family adds its distinguishing config to FEATURES.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adafuse_export import families
from adafuse_export.examples import make_example
from adafuse_export.reference import ReferenceModel
from adafuse_export.runners.torch_cuda import GpuDecoder

WINDOW = 4
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # longer than WINDOW
NEW_TOKENS = 12
# float32 decoder against the float32 reference: the prefill logits' largest difference (the GPU
# runs measured 1e-6 to 3e-6 on these models; tests/test_families.py holds the CPU decoder to the same)
LOGITS_ATOL = 1e-4
# Per family: config overrides that switch its distinguishing features on in the tiny example.
FEATURES: dict[str, dict] = {
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(head_dim=24, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=WINDOW),
    "gemma2": dict(head_dim=24, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=20,
                   final_logit_softcapping=1.5, attn_logit_softcapping=2.0),
    "gemma3_text": dict(head_dim=24, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=20,
                        final_logit_softcapping=1.5, rope_local_base_freq=20.0,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
# name -> (family, config overrides): scaled RoPE, original context lengths short enough to matter here
SCALED: dict[str, tuple[str, dict]] = {
    "llama3.1-llama3": ("llama", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "qwen2.5-yarn": ("qwen2", dict(rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0,
                                                                 "original_max_position_embeddings": 16})),
    "phi3.5-longrope": ("phi3", dict(original_max_position_embeddings=16, rope_scaling={
        "type": "longrope", "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 1.8],
        "long_factor": [1.0, 1.5, 2.5, 4.0, 7.0, 12.0, 20.0, 32.0]})),  # switches at position 16: mid-decode
    "gemma3-linear-tied": ("gemma3_text", dict(FEATURES["gemma3_text"], tie_word_embeddings=True, rope_theta=1e6,
                                               rope_scaling={"rope_type": "linear", "factor": 8.0})),
    "mistral-linear": ("mistral", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen3-dynamic": ("qwen3", dict(head_dim=24, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
}
STRATEGY_RUNS = [(False, "dense"), (True, "unmerged"), (True, "fused"), (True, "switch")]  # (adapters, strategy)


def cases() -> list:
    """pytest params (name, family, config): every registered family, then every scaled RoPE."""
    return ([pytest.param(f, f, FEATURES.get(f), id=f) for f in families.names()]
            + [pytest.param(n, f, c, id=n) for n, (f, c) in SCALED.items()])


def decode_against_reference(name: str, family: str, config: dict | None, root: Path, ops, device: str) -> None:
    """Every strategy's greedy tokens equal the reference's, and its prefill logits lie within LOGITS_ATOL."""
    ckpt = make_example(root / name, "pregate", family=family, config=config)
    prompt = torch.tensor([PROMPT])
    expected = {adapters: ReferenceModel(ckpt, dtype=torch.float32, adapters=adapters).generate(prompt, NEW_TOKENS)
                for adapters in (False, True)}
    for adapters, strategy in STRATEGY_RUNS:
        want, steps = expected[adapters]
        dec = GpuDecoder.from_checkpoint(ckpt, device=device, dtype=torch.float32, strategy=strategy,
                                         max_seq=len(PROMPT) + NEW_TOKENS + 1, ops=ops)
        logits = dec.prefill(prompt.to(device)).float().cpu()
        got = dec.generate(prompt.to(device), NEW_TOKENS).cpu()
        diff = float((logits - steps[0].logits).abs().max())
        assert torch.equal(got, want), (f"{name} ({device}, {strategy}): tokens {got[0].tolist()}, the reference's "
                                        f"{want[0].tolist()} (prefill logits max |diff| {diff:.2e})")
        assert diff <= LOGITS_ATOL, f"{name} ({device}, {strategy}): prefill logits max |diff| {diff:.2e} > {LOGITS_ATOL}"
