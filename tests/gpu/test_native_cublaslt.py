"""The native backend's GEMMs of more than 16 rows (runtime/src/native_step.cpp lt_lora: cuBLASLt for bfloat16
weights, runtime/README.md 'The native backend') against the CPU reference within validate's measured bfloat16
bound, with cuBLASLt required (ADAFUSE_NATIVE_GEMM=cublaslt: the open fails without it) and with the kernel library's
GEMMs forced (ADAFUSE_NATIVE_GEMM=kernels): a long prompt's prefill (every position's logits, rows > 16 at every
site and the LM head) and teacher-forced decode steps of batch 32, for static LoRA, pre-gated fused and switch, and
pre-gated FFN experts (a site of tokens x top_k rows). The runtime's outputs start as NaN (cpp_runtime.Engine.prefill
fills its array with NaN; decode's arrays are filled with NaN here), so a value never written fails. And one
projection of the path alone (runtime/tools/lt_site_for_tests.cpp: lt_lora.h) against a float64 reference on random
inputs, its output poisoned with NaN, within gpu_numerics' bound (the kernel library's tests' bound, plus the one
rounding more: x W^T + bias in the dtype before the LoRA term is added).

Routers on bfloat16 activations (MoLA, LoRAMoE, MixLoRA) are left out: they may flip a near-tie of these toy models
that the float32 reference does not, which no logits bound absorbs (tests/gpu/test_native_backend.py says the same).

Needs the runtime built for this GPU: runtime/tools/build_on_gpu.sh, then ADAFUSE_RUNTIME_LIB=<its output>.
"""
from __future__ import annotations

import ctypes
import dataclasses
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

from gpu_numerics import DTYPES, assert_close, error_bound, poisoned
from test_gpu_lora_linear import Case, assert_adapter_visible, operands, reference

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
    if ref16.expert_ids is not None:  # validate's rule: exact against the same-dtype reference (a routing table
        # gives both references the same ids; pregate-ffn's in-decoder pre-gate routes the bfloat16 activations)
        assert experts is not None and np.array_equal(experts, ref16.expert_ids.numpy())


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


@pytest.fixture(scope="module")
def lt_site():
    path = os.environ.get("ADAFUSE_RUNTIME_LIB")
    assert path, "set ADAFUSE_RUNTIME_LIB to the runtime built by runtime/tools/build_on_gpu.sh"
    lib = ctypes.CDLL(str(Path(path).resolve().parent / "libadafuse_lt_site_for_tests.so"))
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.adafuse_lt_site_for_tests.restype = ctypes.c_int
    lib.adafuse_lt_site_for_tests.argtypes = [ctypes.c_int, i64, i64, i64, vp, vp, vp, vp, vp, i64, i64, vp, vp, i64, vp,
                                              ctypes.c_char_p, ctypes.c_size_t]
    return lib.adafuse_lt_site_for_tests


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else int(t.data_ptr())


# rows above the few-rows kernels (17: odd, 32: a decode batch, 512: a prefill chunk); odd shapes, the 7B qkv site;
# an invalid id (adds nothing) and an expert chosen twice in a row's routes (its gates summed)
SITE_CASES = [Case(dt, i, o, rows, r, e, k, bias=b, invalid_id=bad)
              for dt in ("bf16", "fp16")
              for (i, o, rows, r, e, k, b, bad) in [(64, 96, 17, 8, 4, 2, True, False), (4096, 12288, 32, 16, 8, 2, False, True),
                                                   (4096, 4096, 512, 16, 8, 2, True, False), (96, 200, 33, 4, 2, 4, False, False)]]
# x one element into its buffer (2-byte aligned: the heuristic is told), and rows of an odd length (4095)
SITE_CASES += [Case("bf16", 64, 96, 17, 8, 4, 2, misaligned=True), Case("bf16", 4095, 4096, 64, 16, 8, 2)]
SITE_CASES += [dataclasses.replace(c, bias=False) for c in SITE_CASES[-2:]]


def left_to_the_kernels(case: Case) -> bool:
    """lt_lora.cpp: a biased site whose operands or widths are not 16-byte aligned returns 1 (the kernel library runs
    it): cuBLASLt's bias epilogue rounded x W^T before adding the bias there (seen on an H100)."""
    return case.bias and (case.misaligned or case.in_f % 8 != 0 or case.out_f % 8 != 0)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in SITE_CASES])
@pytest.mark.parametrize("adapter", [True, False])
def test_site_against_float64(lt_site, inputs, case, adapter):
    dt = DTYPES[case.dtype]
    op = operands(case, inputs)  # top_k 4 of 2 experts: some row routes one expert twice
    y = poisoned(case.rows, case.out_f, dtype=dt)
    message = ctypes.create_string_buffer(1024)
    status = lt_site(1 if dt == torch.float16 else 2, case.rows, case.in_f, case.out_f, ptr(op.x), ptr(op.W), ptr(op.bias),
                     ptr(op.A) if adapter else None, ptr(op.B) if adapter else None, case.experts, case.rank,
                     ptr(op.ids), ptr(op.gates), case.top_k, ptr(y), message, len(message))
    if left_to_the_kernels(case):
        assert status == 1 and not message.value, f"{case.id}: status {status} {message.value.decode()}"
        return
    assert status == 0, f"{case.id}: {message.value.decode() or 'cuBLASLt offered no algorithm'}"
    ref = reference(op, 1.0, adapter)  # the native backend's scale is 1 (folded into B)
    base = ref.y - ref.adapter  # x W^T + bias, rounded to the dtype before the LoRA term is added
    limit = error_bound(dt, [ref.y, base] if adapter else [ref.y], ref.rss, ref.terms, spread=[ref.z_rss])
    what = f"cuBLASLt site {case.id}" + ("" if adapter else " (no adapter)")
    if adapter:
        assert_adapter_visible(ref, limit, what)
    assert_close(y, ref.y, limit, what, inputs)
