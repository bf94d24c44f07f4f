"""Every family and scaled RoPE through the GPU decoder's logic on the CPU (TorchOps) against the
reference, every strategy (tests/family_decode_cases.py; the same cases run on the GPU with the
kernels in tests/gpu/test_gpu_family_decode.py)."""
from __future__ import annotations

import pytest

from adafuse_export.runners.torch_cuda import TorchOps
from family_decode_cases import cases, decode_against_reference


@pytest.mark.parametrize("name,family,config", cases())
def test_decoder_on_cpu_matches_reference(tmp_path, name, family, config):
    decode_against_reference(name, family, config, tmp_path, TorchOps(), "cpu")
