"""`adafuse-export run --device cuda` prints the CPU reference's tokens, for every adapter strategy."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

PROMPT = ["--prompt-ids", "3,1,4,1,5", "--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """The pre-gated example kinds (the GPU decoder needs a routing table), written by make-example."""
    from adafuse_export.examples import make_example

    root = tmp_path_factory.mktemp("run-cuda")
    return {kind: make_example(root / kind, kind).path for kind in ("pregate", "pregate-ffn")}


@pytest.mark.parametrize("strategy", ["fused", "switch", "unmerged", "auto", "no-adapters"])
@pytest.mark.parametrize("kind", ["pregate", "pregate-ffn"])
def test_run_on_gpu_prints_the_reference_tokens(cli, examples, kind, strategy):
    base_only = ["--no-adapters"] if strategy == "no-adapters" else []
    cpu = cli("run", examples[kind], *PROMPT, *base_only)
    gpu = cli("run", examples[kind], *PROMPT, "--device", "cuda", *(base_only or ["--strategy", strategy]))
    assert cpu.code == 0, cpu.err
    assert gpu.code == 0, gpu.err
    tokens = cpu.out.strip().splitlines()[-1]
    assert len(tokens.split()) == 12, cpu.out
    assert gpu.out.strip().splitlines()[-1] == tokens, f"--device cuda, {strategy}: {gpu.out!r}, CPU reference: {cpu.out!r}"
