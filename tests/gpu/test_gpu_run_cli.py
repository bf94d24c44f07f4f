"""`adafuse-export run --device cuda` (the native backend over the C API) prints the CPU reference's tokens, for
every strategy it offers and every example kind; --save-logits writes the prompt's logits within the float32 bound.

Needs the runtime built for this GPU: runtime/tools/build_on_gpu.sh, then ADAFUSE_RUNTIME_LIB=<its output>.
"""
from __future__ import annotations

import os

import pytest

from adafuse_export.examples import KINDS

pytestmark = pytest.mark.gpu

PROMPT = ["--prompt-ids", "3,1,4,1,5", "--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Every example kind, written by make-example."""
    from adafuse_export.examples import make_example

    assert os.environ.get("ADAFUSE_RUNTIME_LIB"), "set ADAFUSE_RUNTIME_LIB to the runtime built by runtime/tools/build_on_gpu.sh"
    root = tmp_path_factory.mktemp("run-cuda")
    return {kind: make_example(root / kind, kind).path for kind in KINDS}


def tokens(result) -> str:
    assert result.code == 0, result.err
    line = result.out.strip().splitlines()[-1]
    assert len(line.split()) == 12, result.out
    return line


def routes(result) -> list[str]:
    return [line for line in result.err.splitlines() if line.startswith("# prompt routes")]


@pytest.mark.parametrize("strategy", ["fused", "switch", "auto", "no-adapters"])
def test_run_on_gpu_prints_the_reference_tokens(cli, examples, strategy):
    base_only = ["--no-adapters"] if strategy == "no-adapters" else []
    cpu = cli("run", examples["pregate"], *PROMPT, *base_only)
    gpu = cli("run", examples["pregate"], *PROMPT, "--device", "cuda", *(base_only or ["--strategy", strategy]))
    assert tokens(gpu) == tokens(cpu), f"--device cuda, {strategy}: {gpu.out!r}, CPU reference: {cpu.out!r}"
    assert routes(gpu) == routes(cpu)  # the prompt's expert ids (none printed without adapters)
    if strategy == "auto":
        assert any(line.startswith("# auto strategy: fused ") for line in gpu.err.splitlines()), gpu.err


def test_run_fp8_weights_switch_on_gpu(cli, examples):
    """--weights fp8: the temporary artifact's FP8 weights run by switch (experts merged into bfloat16 copies) print
    the tokens fused prints on the same FP8 artifact (tests/gpu/test_native_backend.py holds both to the FP8 twin)."""
    args = [*PROMPT, "--device", "cuda", "--dtype", "bfloat16", "--weights", "fp8"]
    fused = cli("run", examples["pregate"], *args, "--strategy", "fused")
    switch = cli("run", examples["pregate"], *args, "--strategy", "switch")
    assert tokens(switch) == tokens(fused), f"FP8 switch {switch.out!r}, FP8 fused {fused.out!r}"
    assert routes(switch) == routes(fused)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "pregate"])
def test_every_kind_on_gpu(cli, examples, kind):
    """Layer-routed, in-decoder pre-gate and plain LoRA checkpoints: auto runs them fused."""
    cpu = cli("run", examples[kind], *PROMPT)
    gpu = cli("run", examples[kind], *PROMPT, "--device", "cuda")
    assert tokens(gpu) == tokens(cpu), kind
    assert routes(gpu) == routes(cpu), kind


def test_save_logits_on_gpu(cli, examples, tmp_path):
    from safetensors.torch import load_file

    cpu = cli("run", examples["pregate"], *PROMPT, "--save-logits", tmp_path / "cpu.safetensors")
    gpu = cli("run", examples["pregate"], *PROMPT, "--device", "cuda", "--save-logits", tmp_path / "gpu.safetensors")
    assert cpu.code == 0 and gpu.code == 0, cpu.err + gpu.err
    want, got = load_file(tmp_path / "cpu.safetensors")["logits"], load_file(tmp_path / "gpu.safetensors")["logits"]
    assert got.shape == want.shape == (1, 5, want.shape[-1])
    assert float((got - want).abs().max()) <= 1e-4  # family_decode_cases.LOGITS_ATOL: float32 against float32
