"""The native backend's GEMMs of more than 16 rows (runtime/src/native_step.cpp lt_lora: cuBLASLt for bfloat16
weights, runtime/README.md 'The native backend') against the CPU reference within validate's measured bfloat16
bound, with cuBLASLt required (ADAFUSE_NATIVE_GEMM=cublaslt: the open fails without it) and with the kernel library's
GEMMs forced (ADAFUSE_NATIVE_GEMM=kernels): a long prompt's prefill (every position's logits, rows > 16 at every
site and the LM head) and teacher-forced decode steps of batch 32, for static LoRA, pre-gated fused and switch, and
pre-gated FFN experts (a site of tokens x top_k rows). The runtime's outputs start as NaN (cpp_runtime.Engine.prefill
fills its array with NaN; decode's arrays are filled with NaN here), so a value never written fails.

Routers on bfloat16 activations (MoLA, LoRAMoE, MixLoRA) are left out: they may flip a near-tie of these toy models
that the float32 reference does not, which no logits bound absorbs (tests/gpu/test_native_backend.py says the same).

Needs the runtime built for this GPU: runtime/tools/build_on_gpu.sh, then ADAFUSE_RUNTIME_LIB=<its output>.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from adafuse_export import native_artifact as native
from adafuse_export.checkpoint import Checkpoint
from adafuse_export.converters import load_checkpoint
from adafuse_export.examples import make_example
from adafuse_export.reference import ReferenceModel
from adafuse_export.runners.cpp_runtime import load_library, open_native

pytestmark = pytest.mark.gpu
CASES = [("lora", "fused"), ("pregate", "fused"), ("pregate", "switch"), ("pregate-ffn", "fused")]
PROMPT_LEN = 40   # batch 2 x 40 = 80 rows per prefill step (40 for switch's batch 1)
DECODE_BATCH = 32
DECODE_STEPS = 6


@pytest.fixture(scope="module")
def lib():
    path = os.environ.get("ADAFUSE_RUNTIME_LIB")
    assert path, "set ADAFUSE_RUNTIME_LIB to the runtime built by runtime/tools/build_on_gpu.sh"
    return load_library(path)


@pytest.fixture(params=["cublaslt", "kernels"])
def gemm(request, monkeypatch) -> str:
    monkeypatch.setenv("ADAFUSE_NATIVE_GEMM", request.param)
    return str(request.param)


def within_measured_bound(got: np.ndarray, ref32: torch.Tensor, ref16: torch.Tensor, what: str) -> None:
    """validate's measured half-precision bound: |got - ref32| <= max(atol, 2 |ref16 - ref32|) + rtol |ref32|."""
    from adafuse_export.validate import TOLERANCES

    atol, rtol = TOLERANCES["bfloat16"]
    r32 = ref32.float().numpy()
    atol = max(atol, 2 * float(np.abs(ref16.float().numpy() - r32).max()))
    assert not np.isnan(got).any(), f"{what}: a value the runtime never wrote"
    excess = np.abs(got - r32) - (atol + rtol * np.abs(r32))
    assert (excess <= 0).all(), f"{what}: {int((excess > 0).sum())} logits outside the bound (atol {atol:.4f}), worst by {excess.max():.4f}"


def artifact(tmp_path: Path, kind: str, strategy: str, max_batch: int, max_seq: int) -> tuple[Path, Checkpoint]:
    make_example(tmp_path / "ck", kind, "llama")
    ckpt = load_checkpoint(tmp_path / "ck")
    art = tmp_path / "a.native"
    art.mkdir()
    native.write_artifact(ckpt, art, "bfloat16", max_batch=max_batch, max_seq=max_seq)
    return art, ckpt


def prompts(batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 30, (batch, length), generator=g)


@pytest.mark.parametrize("kind,strategy", CASES)
def test_long_prompt_prefill(lib, tmp_path, gemm, kind, strategy):
    batch = 1 if strategy == "switch" else 2
    art, ckpt = artifact(tmp_path, kind, strategy, max_batch=batch, max_seq=PROMPT_LEN + 8)
    prompt = prompts(batch, PROMPT_LEN, seed=1)
    ref32, ref16 = (ReferenceModel(ckpt, dtype=dt).forward(prompt) for dt in (torch.float32, torch.bfloat16))
    with open_native(art, strategy) as engine:
        logits, experts, _ = engine.prefill(prompt.numpy())
    within_measured_bound(logits, ref32.logits, ref16.logits, f"{kind} {strategy} prefill ({gemm})")
    if ref32.expert_ids is not None:  # pre-gated: the routes come from the float32 table
        assert experts is not None and np.array_equal(experts, ref32.expert_ids.numpy())


def teacher_forced(ref: ReferenceModel, prompt: torch.Tensor, feed: torch.Tensor) -> list[torch.Tensor]:
    """The last position's logits of the prompt, then of each fed column [B, vocab]."""
    out = ref.forward(prompt)
    logits = [out.logits[:, -1]]
    for i in range(feed.shape[1]):
        out = ref.forward(feed[:, i:i + 1], out.cache)
        logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("kind,strategy", [c for c in CASES if c[1] != "switch"])  # switch runs batch 1
def test_decode_batch_32(lib, tmp_path, gemm, kind, strategy):
    """Decode steps of 32 rows (cuBLASLt's smallest bucket above the few-rows kernels), fed the float32 reference's
    greedy tokens so both sides see the same inputs; each step within the bound, graphs replayed after the second."""
    art, ckpt = artifact(tmp_path, kind, strategy, max_batch=DECODE_BATCH, max_seq=8 + DECODE_STEPS + 1)
    prompt = prompts(DECODE_BATCH, 8, seed=2)
    ref32 = ReferenceModel(ckpt, dtype=torch.float32)
    feed, _ = ref32.generate(prompt, DECODE_STEPS)
    want32 = teacher_forced(ref32, prompt, feed)
    want16 = teacher_forced(ReferenceModel(ckpt, dtype=torch.bfloat16), prompt, feed)
    with open_native(art, strategy) as engine:
        logits, _, _ = engine.prefill(prompt.numpy())
        within_measured_bound(logits[:, -1], want32[0], want16[0], f"{kind} prefill of {DECODE_BATCH} ({gemm})")
        for i in range(DECODE_STEPS):
            out = np.full((DECODE_BATCH, engine.vocab), np.nan, np.float32)
            engine.decode(feed[:, i].numpy(), logits=out)
            within_measured_bound(out, want32[i + 1], want16[i + 1], f"{kind} decode step {i} ({gemm})")
