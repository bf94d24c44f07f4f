"""The GPU decoder's logic (static KV cache, routing table, switch bookkeeping) on the CPU.

On the CPU every strategy runs PyTorch ops (TorchOps); benchmarks/h200_decode.py runs the same
checks with the CUDA kernels and CUDA graphs on the H200. TorchOps is checked against a float64
formula written here, and the decoder runs that formula in place of the reference's lora_delta, so
the decoder and the reference it is compared with share no adapter code.
"""
from __future__ import annotations

import pytest
import torch

from adafuse_export.converters import load_checkpoint
from adafuse_export.errors import AdafuseError
from adafuse_export.reference import ReferenceModel, lora_delta
from adafuse_export.runners import torch_cuda
from adafuse_export.runners.torch_cuda import FUSED_MAX_ROWS, GpuDecoder, SiteWeights, TorchOps


def lora_delta_float64(x, A, B, ids, gates, scale):
    """scale * sum_j gates[n, j] * B[e] (A[e] x[n]) with e = ids[n, j], row by row in float64."""
    out = torch.zeros(x.shape[0], B.shape[1], dtype=torch.float64)
    for n in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[n, j])
            out[n] += float(gates[n, j]) * (B[e].double() @ (A[e].double() @ x[n].double()))
    return scale * out


@pytest.fixture(autouse=True)
def independent_adapter_math(monkeypatch):
    """The decoder's TorchOps computes its few-row adapter term with the float64 formula above."""
    monkeypatch.setattr(torch_cuda, "lora_delta", lambda x, *args: lora_delta_float64(x, *args).to(x.dtype))


def random_site(g, E=5, r=3, n_in=7, n_out=11):
    return SiteWeights("s", torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g),
                       torch.randn(E, r, n_in, generator=g), torch.randn(E, n_out, r, generator=g), 0.7)


def random_route(g, rows, E=5, k=2):
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(rows)])
    return ids, torch.rand(rows, k, generator=g)


def test_reference_lora_delta_is_the_float64_formula():
    g = torch.Generator().manual_seed(1)
    site = random_site(g)
    x = torch.randn(9, 7, generator=g)
    ids, gates = random_route(g, 9)
    got = lora_delta(x, site.A, site.B, ids, gates, site.scale)
    assert (got.double() - lora_delta_float64(x, site.A, site.B, ids, gates, site.scale)).abs().max().item() < 1e-5


@pytest.mark.parametrize("rows", [1, FUSED_MAX_ROWS, FUSED_MAX_ROWS + 1, 64])
def test_torch_ops_lora_linear_is_the_float64_formula(rows, monkeypatch):
    """Both paths: the per-row gather (few rows) and the dense mixture (prefill)."""
    monkeypatch.setattr(torch_cuda, "lora_delta", lora_delta)  # the real one, not the fixture's stand-in
    g = torch.Generator().manual_seed(rows)
    site = random_site(g)
    x = torch.randn(rows, 7, generator=g)
    ids, gates = random_route(g, rows)
    expected = x.double() @ site.W.double().T + site.bias.double() + lora_delta_float64(x, site.A, site.B, ids, gates,
                                                                                        site.scale)
    assert (TorchOps.lora_linear(x, site, ids, gates).double() - expected).abs().max().item() < 1e-4


def test_torch_ops_switch_merges_the_float64_formula():
    g = torch.Generator().manual_seed(3)
    site = random_site(g)
    site.W_base = site.W.clone()
    ids, gates = random_route(g, 1)
    old_ids, old_gates = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2)
    TorchOps().switch([site], ids, gates, old_ids, old_gates)
    merged = site.W_base.double() + site.scale * sum(float(gates[0, j]) * site.B[ids[0, j]].double() @ site.A[ids[0, j]].double()
                                                     for j in range(2))
    assert (site.W.double() - merged).abs().max().item() < 1e-5
    assert torch.equal(old_ids, ids) and torch.equal(old_gates, gates)


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
    with pytest.raises(AdafuseError, match="no routing table: it has no pre-gate: a router in every layer"):
        GpuDecoder.from_checkpoint(load_checkpoint(example_dirs["mola"]), device="cpu", dtype=torch.float32)


def test_kernel_ops_keeps_one_workspace_per_site_and_rows():
    """The one-row shrink writes its flag before the previous kernel completes (PDL), so a site's
    workspace must never be a block just freed by another call: KernelOps keeps one per (site, rows)."""
    from adafuse_export.runners.torch_cuda import KernelOps, SiteWeights

    class Sizes:  # the library's workspace-size query, stood in by a formula: only the caching is under test
        def lora_linear_workspace_size(self, rows, in_f, out_f, E, rank, top_k):
            return rows * top_k * rank * 4 + 16

    def site(out_f, rank):
        return SiteWeights("s", torch.zeros(out_f, 8), None, torch.zeros(4, rank, 8), torch.zeros(4, out_f, rank), 1.0)

    ops = KernelOps(Sizes())
    qkv, o = site(24, 6), site(8, 2)
    w1 = ops._workspace(qkv, 1, 2)
    assert ops._workspace(qkv, 1, 2) is w1 and w1.numel() == 1 * 2 * 6 * 4 + 16
    w8 = ops._workspace(qkv, 8, 2)
    wo = ops._workspace(o, 1, 2)
    assert w8 is not w1 and wo is not w1 and w8.numel() == 8 * 2 * 6 * 4 + 16
    assert len({w1.data_ptr(), w8.data_ptr(), wo.data_ptr()}) == 3  # all alive at once: no reuse


def test_kernel_ops_passes_its_kept_workspace_as_exclusive():
    """Only a workspace kept per (site, rows) may be declared exclusive (the one-row shrink then launches before
    the previous kernel completes); KernelOps passes exactly that one, every call."""
    from adafuse_export.runners.torch_cuda import KernelOps, SiteWeights

    class Recorder:  # records what KernelOps hands the binding
        calls: list = []

        def lora_linear_workspace_size(self, rows, in_f, out_f, E, rank, top_k):
            return rows * top_k * rank * 4 + 16

        def lora_linear(self, x, W, A, B, ids, gates, scale, **kw):
            self.calls.append(kw)
            return x

    site = SiteWeights("s", torch.zeros(24, 8), None, torch.zeros(4, 6, 8), torch.zeros(4, 24, 6), 1.0)
    rec = Recorder()
    ops = KernelOps(rec)
    for _ in range(2):
        ops.lora_linear(torch.zeros(1, 8), site, torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 2))
    assert [c["exclusive_workspace"] for c in rec.calls] == [True, True]
    assert rec.calls[0]["workspace"] is rec.calls[1]["workspace"] is ops._workspace(site, 1, 2)


def test_workspace_follows_the_shapes_at_a_reused_address():
    """A later decoder sharing the ops can hold a weight at a freed weight's address with other shapes (the H100
    run of gpu_families.py: a 784-byte workspace kept for a site that needed 1296): the size follows the shapes."""
    from adafuse_export.runners.torch_cuda import KernelOps, SiteWeights

    class Sizes:
        def lora_linear_workspace_size(self, rows, in_f, out_f, E, rank, top_k):
            return rows * top_k * rank * 4 + out_f

    W = torch.zeros(24, 8)
    small = SiteWeights("s", W, None, torch.zeros(4, 2, 8), torch.zeros(4, 24, 2), 1.0)
    large = SiteWeights("s", W, None, torch.zeros(4, 16, 8), torch.zeros(4, 24, 16), 1.0)  # same W address
    ops = KernelOps(Sizes())
    assert ops._workspace(small, 10, 2).numel() == 10 * 2 * 2 * 4 + 24
    assert ops._workspace(large, 10, 2).numel() == 10 * 2 * 16 * 4 + 24
