"""Every family and scaled RoPE through the GPU decoder with the kernel library (KernelOps, CUDA
graphs) against the CPU reference, every strategy (tests/family_decode_cases.py; the CPU suite
runs the same cases on the decoder's PyTorch ops)."""
from __future__ import annotations

import pytest

from adafuse_export.runners.torch_cuda import KernelOps
from family_decode_cases import cases, decode_against_reference

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def shared_ops(kernels):
    """One KernelOps for every decoder of the module, as one process serves many: its workspaces and
    site tables must follow each decoder's shapes even where freed buffers' addresses come back."""
    return KernelOps(kernels)


@pytest.mark.parametrize("name,family,config", cases())
def test_decoder_on_gpu_matches_reference(shared_ops, tmp_path, name, family, config):
    decode_against_reference(name, family, config, tmp_path, shared_ops, "cuda")


@pytest.mark.parametrize("strategy", ["unmerged", "fused", "switch"])
def test_static_modules_on_gpu(shared_ops, tmp_path, strategy):
    """A pre-gated checkpoint with static LoRA modules too (tests/test_gpu_decoder_static.py): merged, not dropped."""
    import torch

    from adafuse_export.reference import ReferenceModel
    from adafuse_export.runners.torch_cuda import GpuDecoder
    from test_gpu_decoder_static import PROMPT, pregate_with_static

    ckpt = pregate_with_static(tmp_path / "ck")
    want, _ = ReferenceModel(ckpt, dtype=torch.float32).generate(PROMPT, 8)
    dec = GpuDecoder.from_checkpoint(ckpt, device="cuda", dtype=torch.float32, strategy=strategy, max_seq=20,
                                     ops=shared_ops)
    assert torch.equal(dec.generate(PROMPT.cuda(), 8).cpu(), want)
