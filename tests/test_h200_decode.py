"""benchmarks/h200_decode.py's CPU-side parts: the bytes floor of a routed batch (the adapter bytes one expert adds,
against the artifact the writer produces; the experts a batch's routes touch) and the FP8 greedy agreement's figures.
The GPU rows themselves run on the device (bash benchmarks/h200_all.sh --no-checks)."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from benchmark_scripts import load

from adafuse_export import native_artifact as native


@pytest.fixture(scope="module")
def bench():
    return load("h200_decode")  # puts benchmarks/ on sys.path


@pytest.fixture
def narrow(bench, monkeypatch):
    """The 7B shape's layout at a narrow width, weights drawn on the CPU (as tests/test_native_path.py)."""
    import synthetic_checkpoint

    monkeypatch.setattr(bench, "WEIGHTS_DEVICE", "cpu")
    monkeypatch.setitem(synthetic_checkpoint.SHAPES, "llama2-7b", dict(
        synthetic_checkpoint.SHAPES["llama2-7b"], vocab_size=512, hidden_size=128, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=4))


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return {k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}


@pytest.mark.parametrize("rank", [16, 64])
def test_adapter_bytes_per_expert_are_the_artifacts_A_and_B_over_its_experts(bench, narrow, tmp_path, rank):
    ckpt = bench.synthetic_checkpoint(2, rank)
    native.write_artifact(ckpt, tmp_path, "bfloat16", max_batch=8, max_seq=64)
    lora = {k: v for k, v in _header(tmp_path / native.ADAPTERS).items() if k.endswith((".lora_A", ".lora_B"))}
    assert lora and all(v["shape"][0] == bench.EXPERTS for v in lora.values())
    stored = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in lora.values())
    assert bench.adapter_bytes_per_expert(ckpt) * bench.EXPERTS == stored


def test_adapter_bytes_per_expert_of_the_7b_shape(bench):
    # Llama-2-7B (hidden 4096, intermediate 11008, 32 layers), bf16, every projection routed, q/k/v and gate/up
    # stacked with a block-diagonal B: per layer qkv 3r x (4096 + 12288), o r x 8192, gate_up 2r x (4096 + 22016),
    # down r x (11008 + 4096) elements
    for rank in (16, 64):
        per_layer = 3 * rank * (4096 + 12288) + rank * 8192 + 2 * rank * (4096 + 22016) + rank * (11008 + 4096)
        assert bench.adapter_bytes_per_expert(bench.synthetic_checkpoint(32, rank)) == 32 * 2 * per_layer


def test_experts_per_step_counts_the_timed_steps_routes(bench):
    ids = np.array([[0, 1], [2, 3], [0, 1], [4, 5], [1, 6], [7, 0]])  # a routing table of 6 token ids, top-2
    feed = [0, 1, 2, 3, 4, 5]
    # batch 2, one warm-up step: step 1 takes feed[2], feed[3] -> {0, 1, 4, 5}; step 2 feed[4], feed[5] -> {1, 6, 7, 0}
    assert bench.experts_per_step(ids, feed, 2, 2, warmup=1) == 4.0
    # batch 4 wraps the feed: step 1 takes 4, 5, 0, 1 -> {1, 6, 7, 0, 2, 3}
    assert bench.experts_per_step(ids, feed, 4, 1, warmup=1) == 6.0
    assert bench.experts_per_step(ids, [0, 2], 2, 3, warmup=0) == 2.0  # one route repeated


def test_agreement_figures(bench):
    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    free = [[1, 2, 9, 9], [5, 6, 7, 8]]
    forced = [[1, 2, 3, 0], [5, 6, 7, 8]]
    a = bench.agreement_figures(reference, free, forced)
    assert a == {"agreement": 7 / 8, "free_running": 6 / 8, "first_divergence": [2, 4], "prompts": 2, "new_tokens": 4}
    with pytest.raises(ValueError, match="same prompts and lengths"):
        bench.agreement_figures(reference, free, [[1, 2, 3], [5, 6, 7, 8]])


def test_held_prompts_are_fixed(bench):
    p = bench.held_prompts(512)
    assert p == bench.held_prompts(512) and len(p) == bench.HELD_PROMPTS
    assert all(len(x) == bench.HELD_PROMPT_TOKENS and all(0 <= t < 512 for t in x) for x in p)
