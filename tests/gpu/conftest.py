"""Fixtures of the gpu tests: the kernel library built for this GPU, and fresh random inputs per test.

Every test here is marked gpu: `python3 -m pytest -m gpu tests/gpu` runs them; the default
selection (setup.cfg addopts) leaves them out. Without a CUDA device they fail at setup
(tests/conftest.py), before the library is built.
"""
from __future__ import annotations

import pytest
import torch

from gpu_numerics import Inputs


@pytest.fixture(scope="session")
def kernels():
    """libadafuse_kernels.so for this GPU's architecture ($ADAFUSE_KERNELS_LIB overrides), built once."""
    from adafuse_export.kernels import load_kernels

    major, minor = torch.cuda.get_device_capability()
    return load_kernels(archs=[f"{major}{minor}"])


@pytest.fixture
def inputs(request) -> Inputs:
    return Inputs(request.node.nodeid)
