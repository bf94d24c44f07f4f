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
def test_run_on_gpu_prints_the_reference_tokens(cli, examples, strategy):
    base_only = ["--no-adapters"] if strategy == "no-adapters" else []
    cpu = cli("run", examples["pregate"], *PROMPT, *base_only)
    gpu = cli("run", examples["pregate"], *PROMPT, "--device", "cuda", *(base_only or ["--strategy", strategy]))
    assert cpu.code == 0, cpu.err
    assert gpu.code == 0, gpu.err
    tokens = cpu.out.strip().splitlines()[-1]
    assert len(tokens.split()) == 12, cpu.out
    assert gpu.out.strip().splitlines()[-1] == tokens, f"--device cuda, {strategy}: {gpu.out!r}, CPU reference: {cpu.out!r}"


def test_run_on_gpu_refuses_a_pregate_that_no_table_can_replace(cli, examples):
    """pregate-ffn's pre-gate reads layer 0's MLP input (it depends on the context): the GPU decoder, which
    routes by a table, says so in one line instead of decoding something else."""
    gpu = cli("run", examples["pregate-ffn"], *PROMPT, "--device", "cuda")
    assert gpu.code == 2
    assert gpu.err.strip().endswith("no routing table: its pre-gate reads 'mlp_norm_0' (after layer 0's attention, which "
                                    "depends on the whole context), so the route is not a function of the token id and no "
                                    "table can replace it"), gpu.err
