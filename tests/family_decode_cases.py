"""Every registered family and every scaled RoPE, with every example kind, through the native backend (the C++
runtime over its C API, cpp_runtime.Engine) against the CPU reference.

Shared by tests/gpu/test_native_backend.py (marker gpu) and benchmarks/h200_decode.py (its correctness table).

For each family a pre-gated example is built with the features that set the family apart turned
up (short sliding windows, soft-caps, query scale, a local RoPE base, partial RoPE), and one more per
scaled RoPE the bases people fine-tune use (Llama 3.1's llama3, Qwen2.5's YaRN, Phi-3.5's LongRoPE with
its switch to the long factors inside the decoded steps, Gemma 3's linear on the full layers with tied
embeddings, linear, dynamic). The CPU reference (float32) decodes greedily; the native backend (a float32
artifact) decodes the same prompt with every strategy the artifact allows: the tokens must be equal, the prefill
logits within LOGITS_ATOL, the expert ids exact. A prompt longer than the windows makes the windows matter.
A new family adds its distinguishing config to FEATURES.
"""
from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch

from adafuse_export import families
from adafuse_export import native_artifact as native
from adafuse_export.converters import load_checkpoint
from adafuse_export.examples import KINDS
from adafuse_export.reference import ReferenceModel
from adafuse_export.runners.cpp_runtime import open_native

WINDOW = 4
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # longer than WINDOW
NEW_TOKENS = 12
# float32 native backend against the float32 reference: the prefill logits' largest difference (GPU runs of the
# kernels measured 1e-6 to 3e-6 on these models)
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


def cases() -> list:
    """pytest params (name, family, config): every registered family, then every scaled RoPE."""
    return ([pytest.param(f, f, FEATURES.get(f), id=f) for f in families.names()]
            + [pytest.param(n, f, c, id=n) for n, (f, c) in SCALED.items()])


def attention_head_dim(config: dict | None) -> dict | None:
    """The attention kernels take heads of a power-of-two count of 16-byte vectors (NativeArtifact::features refuses
    others at open): the cases' head_dim 24 (6 float32 vectors) becomes 32, every other feature as the case sets it."""
    if config is None or config.get("head_dim") != 24:
        return config
    return {**config, "head_dim": 32}


def strategies(kind: str) -> list[str]:
    """The native strategies an example kind allows (switch: pre-gated, batch 1)."""
    config = cast(dict, KINDS[kind])
    return ["fused", "switch"] if config["routing"] == "pregate" else ["fused"]


def convert(ckpt_dir: Path, out: Path, dtype: str = "float32", max_batch: int = 4, max_seq: int = 40) -> Path:
    """`convert --backend native` of ckpt_dir into out (write_artifact, no validation run)."""
    out.mkdir()
    native.write_artifact(load_checkpoint(ckpt_dir), out, dtype, max_batch=max_batch, max_seq=max_seq)
    return out


def against_reference(ckpt_dir: Path, art: Path, strategy: str, graphs: bool = True, library: str | None = None) -> dict:
    """The artifact opened with `strategy`, PROMPT decoded greedily for NEW_TOKENS against the float32 reference:
    {"tokens", "reference_tokens", "prefill_max_abs_diff", "expert_ids_equal" (None without routes), "passed"}."""
    ckpt = load_checkpoint(ckpt_dir)
    want, steps = ReferenceModel(ckpt, dtype=torch.float32).generate(torch.tensor([PROMPT]), NEW_TOKENS)
    with open_native(art, strategy, cuda_graphs=graphs, library=library) as engine:
        got, logits, experts = engine.generate(PROMPT, NEW_TOKENS)
    diff = float(np.abs(logits - steps[0].logits.numpy()).max())  # NaN (a value never written) fails below
    same_routes = None
    if experts is not None or steps[0].expert_ids is not None:
        same_routes = (experts is not None and steps[0].expert_ids is not None
                       and np.array_equal(experts, steps[0].expert_ids.numpy()))
    return {"tokens": got, "reference_tokens": want[0].tolist(), "prefill_max_abs_diff": diff,
            "expert_ids_equal": same_routes,
            "passed": got == want[0].tolist() and diff <= LOGITS_ATOL and same_routes is not False}
