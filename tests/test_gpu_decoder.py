"""The GPU decoder's logic (static KV cache, routing table, switch bookkeeping) on the CPU.

On the CPU every strategy runs PyTorch ops; benchmarks/h200_decode.py runs the same checks
with the CUDA kernels and CUDA graphs on the H200.
"""
from __future__ import annotations

import pytest
import torch

from adafuse_export.converters import load_checkpoint
from adafuse_export.errors import AdafuseError
from adafuse_export.reference import ReferenceModel
from adafuse_export.runners.torch_cuda import GpuDecoder


@pytest.mark.parametrize("strategy", ["unmerged", "fused", "switch"])
def test_decoder_matches_reference_every_step(example_dirs, strategy):
    ckpt = load_checkpoint(example_dirs["pregate"])
    ref = ReferenceModel(ckpt)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(7))
    tokens, steps = ref.generate(prompt, 10)
    dec = GpuDecoder.from_checkpoint(ckpt, device="cpu", dtype=torch.float32, strategy=strategy, max_seq=32)
    logits = dec.prefill(prompt)
    assert (logits - steps[0].logits).abs().max().item() < 1e-4
    for i, step in enumerate(steps[1:]):
        logits = dec.decode(tokens[:, i:i + 1])
        assert (logits - step.logits).abs().max().item() < 1e-4
    assert torch.equal(dec.generate(prompt, 10), tokens)


def test_switch_merges_route_and_restores_on_prefill(example_dirs):
    ckpt = load_checkpoint(example_dirs["pregate"])
    ref = ReferenceModel(ckpt)
    dec = GpuDecoder.from_checkpoint(ckpt, device="cpu", dtype=torch.float32, strategy="switch", max_seq=32)
    dec.prefill(torch.tensor([[1, 2, 3]]))
    dec.decode(torch.tensor([[4]]))
    site = dec.sites[(1, "qkv")]  # q, k, v fused: rows [q | k | v]
    ids, gates = dec.route_ids[4].long(), dec.route_gates[4]
    A, B = ref.a["layers.1.v_proj.lora_A"], ref.a["layers.1.v_proj.lora_B"]
    s = ckpt.adapter.site_scale("layers.1.v_proj")
    v_rows = slice(site.splits[0] + site.splits[1], None)
    expected = ref.w["model.layers.1.self_attn.v_proj.weight"] + s * sum(gates[j] * B[ids[j]] @ A[ids[j]] for j in range(2))
    assert torch.allclose(site.W[v_rows], expected, atol=1e-6)
    assert dec.old_ids.tolist() == ids.tolist()
    dec.prefill(torch.tensor([[1, 2, 3]]))
    assert torch.equal(site.W, site.W_base)


@pytest.mark.parametrize("strategy", ["fused", "switch"])
@pytest.mark.parametrize("fuse", [True, False])
def test_projection_groups_with_bias_and_partial_targets(tmp_path, strategy, fuse):
    """q/k/v and gate/up fused into one site each: qwen2 biases, and only some members adapted."""
    import json

    from adafuse_export.examples import make_example

    make_example(tmp_path, "pregate", family="qwen2", seed=9)
    cfg = json.loads((tmp_path / "adafuse_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "up_proj"]
    (tmp_path / "adafuse_config.json").write_text(json.dumps(cfg))
    ckpt = load_checkpoint(tmp_path)
    prompt = torch.tensor([[7, 8, 9, 10]])
    tokens, steps = ReferenceModel(ckpt).generate(prompt, 6)
    dec = GpuDecoder.from_checkpoint(ckpt, device="cpu", dtype=torch.float32, strategy=strategy, max_seq=16,
                                     fuse_projections=fuse)
    assert (dec.prefill(prompt) - steps[0].logits).abs().max().item() < 1e-4
    assert torch.equal(dec.generate(prompt, 6), tokens)


def test_batched_decode_with_different_routes(example_dirs):
    ckpt = load_checkpoint(example_dirs["pregate"])
    ref = ReferenceModel(ckpt)
    prompt = torch.randint(0, 256, (3, 4), generator=torch.Generator().manual_seed(8))
    tokens, _ = ref.generate(prompt, 6)
    dec = GpuDecoder.from_checkpoint(ckpt, device="cpu", dtype=torch.float32, strategy="fused", max_batch=3, max_seq=16)
    assert torch.equal(dec.generate(prompt, 6), tokens)


def test_decoder_errors(example_dirs):
    ckpt = load_checkpoint(example_dirs["pregate"])
    with pytest.raises(AdafuseError, match="strategy 'switch' merges one route"):
        GpuDecoder.from_checkpoint(ckpt, device="cpu", dtype=torch.float32, strategy="switch", max_batch=2)
    dec = GpuDecoder.from_checkpoint(ckpt, device="cpu", dtype=torch.float32, strategy="fused", max_seq=4)
    with pytest.raises(AdafuseError, match="exceeds max batch 1 / max seq 4"):
        dec.prefill(torch.tensor([[1, 2, 3, 4, 5]]))
    with pytest.raises(AdafuseError, match="routing table needs a pre-gate"):
        GpuDecoder.from_checkpoint(load_checkpoint(example_dirs["mola"]), device="cpu", dtype=torch.float32)



def test_prefill_mixture_path_equals_per_row_gather():
    """Above FUSED_MAX_ROWS rows the PyTorch path runs every expert densely and masks by gate."""
    from adafuse_export.reference import lora_delta
    from adafuse_export.runners.torch_cuda import FUSED_MAX_ROWS, SiteWeights, TorchOps

    g = torch.Generator().manual_seed(0)
    E, r, n_in, n_out, k = 5, 3, 7, 11, 2
    site = SiteWeights("s", torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g),
                       torch.randn(E, r, n_in, generator=g), torch.randn(E, n_out, r, generator=g), 0.7)
    for rows in (FUSED_MAX_ROWS + 1, 64):
        x = torch.randn(rows, n_in, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(rows)])
        gates = torch.rand(rows, k, generator=g)
        expected = x @ site.W.T + site.bias + lora_delta(x, site.A, site.B, ids, gates, site.scale)
        assert (TorchOps.lora_linear(x, site, ids, gates) - expected).abs().max().item() < 1e-4
