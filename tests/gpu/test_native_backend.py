"""The C++ runtime's native backend (runtime/src/native_backend.h) on the GPU, through the C API: every example
kind, family and scaled RoPE converted with `convert --backend native` semantics (native_artifact.write_artifact),
opened with each strategy, greedy tokens equal to the CPU reference's (float32), prefill logits within the bound
`validate` uses, expert ids exact; prompts of different lengths sharing in-flight steps (adafuse_step) against
each prompt decoded alone by the reference; bfloat16 prefill logits within validate's measured half-precision bound.

Needs the runtime built for this GPU: runtime/tools/build_on_gpu.sh, then ADAFUSE_RUNTIME_LIB=<its output>.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from adafuse_export import native_artifact as native
from adafuse_export.converters import load_checkpoint
from adafuse_export.examples import KINDS, make_example
from adafuse_export.reference import ReferenceModel
from adafuse_export.runners.cpp_runtime import load_library, open_native
from family_decode_cases import against_reference, attention_head_dim, cases, convert, strategies

pytestmark = pytest.mark.gpu
NEW_TOKENS = 10
PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [2, 7], [1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9], [6]]  # different lengths


@pytest.fixture(scope="module")
def lib():
    path = os.environ.get("ADAFUSE_RUNTIME_LIB")
    assert path, "set ADAFUSE_RUNTIME_LIB to the runtime built by runtime/tools/build_on_gpu.sh"
    return load_library(path)


def check_against_reference(ckpt_dir: Path, art: Path, strategy: str, graphs: bool = True) -> None:
    r = against_reference(ckpt_dir, art, strategy, graphs)
    assert r["passed"], f"{art.name} ({strategy}, graphs {graphs}): {r}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_every_strategy(lib, tmp_path, kind):
    make_example(tmp_path / kind, kind, "llama")
    for strategy in strategies(kind):
        art = convert(tmp_path / kind, tmp_path / f"{kind}-{strategy}.native", max_batch=1 if strategy == "switch" else 4)
        check_against_reference(tmp_path / kind, art, strategy)


@pytest.mark.parametrize("name,family,config", cases())
def test_every_family_and_scaled_rope(lib, tmp_path, name, family, config):
    make_example(tmp_path / name, "pregate", family=family, config=attention_head_dim(config))
    for strategy in ("fused", "switch"):
        art = convert(tmp_path / name, tmp_path / f"{name}-{strategy}.native", max_batch=1 if strategy == "switch" else 4)
        check_against_reference(tmp_path / name, art, strategy)


def test_without_cuda_graphs(lib, tmp_path):
    make_example(tmp_path / "ck", "pregate", "llama")
    check_against_reference(tmp_path / "ck", convert(tmp_path / "ck", tmp_path / "a.native"), "fused", graphs=False)


@pytest.mark.parametrize("kind,family,config", [
    ("pregate", "llama", None), ("mixlora", "qwen2", None), ("mola", "llama", None), ("loramoe", "llama", None),
    ("pregate", "gemma3_text", dict(head_dim=32, num_hidden_layers=3, sliding_window=4, rope_local_base_freq=20.0,
                                    layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    ("pregate-ffn", "qwen3", None)])
def test_in_flight_rows_of_different_lengths(lib, tmp_path, kind, family, config):
    """Prompts of different lengths share steps: three prefill together, the fourth joins while they decode
    (its prompt in the same step as their decode rows); each equals the reference decoding it alone."""
    make_example(tmp_path / "ck", kind, family, config=config)
    ref = ReferenceModel(load_checkpoint(tmp_path / "ck"), dtype=torch.float32)
    want = [ref.generate(torch.tensor([p]), NEW_TOKENS)[0][0].tolist() for p in PROMPTS]
    engine = open_native(convert(tmp_path / "ck", tmp_path / "a.native", max_batch=4, max_seq=40))
    try:
        got: list[list[int]] = [[] for _ in PROMPTS]
        length = [0] * len(PROMPTS)
        rows = [(s, 0, PROMPTS[s]) for s in range(3)]
        for step in range(NEW_TOKENS + 3):
            if step == 2:
                rows.append((3, 0, PROMPTS[3]))  # joins mid-flight
            outs = engine.step(rows)
            assert engine.in_flight and engine.max_step_tokens >= engine.max_batch
            nxt = []
            for (slot, start, toks), logits in zip(rows, outs):
                length[slot] = start + len(toks)
                assert not np.isnan(logits).any()
                if len(got[slot]) < NEW_TOKENS:
                    got[slot].append(int(logits.argmax()))
                if len(got[slot]) < NEW_TOKENS:
                    nxt.append((slot, length[slot], [got[slot][-1]]))
            rows = nxt
            if not rows:
                break
        assert got == want
        assert [engine.slot_length(s) for s in range(4)] == [len(p) + NEW_TOKENS - 1 for p in PROMPTS]
    finally:
        engine.close()


# pre-gated: a router on bfloat16 activations (MoLA's, per projection) may flip a near-tie of this toy model that the
# float32 reference does not, which no logits bound can absorb
@pytest.mark.parametrize("weights", ["dtype", "fp8"])
def test_bfloat16_prefill_within_validates_bound(lib, tmp_path, weights):
    """validate's measured half-precision bound: |native - ref32| <= max(atol, 2 |ref16 - ref32|) + rtol |ref32|.
    weights fp8 (`convert --weights fp8`: FP8 e4m3 stage weights, bfloat16 activations): both references are the
    artifact's FP8 twins (validate's: its weights dequantized), so the bound is the bfloat16 one, not the quantization
    error. Expert ids exact (the routing table is float32 whatever the artifact's dtype)."""
    from adafuse_export.validate import TOLERANCES

    make_example(tmp_path / "ck", "pregate", "llama")
    ckpt = load_checkpoint(tmp_path / "ck")
    art = tmp_path / "a.native"
    art.mkdir()
    native.write_artifact(ckpt, art, "bfloat16", max_batch=4, max_seq=40, weights=weights)
    refs = {dt: ReferenceModel(ckpt, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    for ref in refs.values():  # tests/test_fp8_validate.py checks the twin's weights
        assert native.load_fp8_twin(ref, art) == (weights == "fp8")
    prompt = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    ref32, ref16 = (refs[dt].forward(prompt) for dt in (torch.float32, torch.bfloat16))
    with open_native(art) as engine:
        logits, experts, _ = engine.prefill(prompt.numpy())
    assert not np.isnan(logits).any()
    atol, rtol = TOLERANCES["bfloat16"]
    r32 = ref32.logits.numpy()
    atol = max(atol, 2 * float(np.abs(ref16.logits.float().numpy() - r32).max()))
    assert (np.abs(logits - r32) <= atol + rtol * np.abs(r32)).all()
    assert experts is not None and ref32.expert_ids is not None
    assert np.array_equal(experts, ref32.expert_ids.numpy())
