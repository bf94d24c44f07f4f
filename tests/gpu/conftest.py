"""Fixtures of the gpu tests: the kernel library built for this GPU, and fresh random inputs per test.

Every test here is marked gpu: `python3 -m pytest -m gpu tests/gpu` runs them; the default
selection (setup.cfg addopts) leaves them out. Without a CUDA device they fail at setup
(tests/conftest.py), before the library is built.
"""
from __future__ import annotations

import dataclasses
import os

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


# runtime/tools/kernel_sanitizer.sh runs the kernel tests under compute-sanitizer, which multiplies a kernel's time:
# with these set, a subset is collected: of each test function's parametrized cases those of at most
# ADAFUSE_GPU_CASE_MAX (case_size), and of those every ADAFUSE_GPU_CASE_EVERY-th (the first always); a function with
# no case that small keeps its smallest.
CASE_MAX_ENV, CASE_EVERY_ENV = "ADAFUSE_GPU_CASE_MAX", "ADAFUSE_GPU_CASE_EVERY"


def case_size(params: dict) -> int:
    """A parametrized case's size: the product of its positive integer parameters, where a case object (a
    dataclass) counts as in_f * out_f * rows when it has those fields, else as the product of its integer fields."""
    size = 1
    for value in params.values():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            dims = [fields[n] for n in ("in_f", "out_f", "rows")] if {"in_f", "out_f", "rows"} <= fields.keys() \
                else list(fields.values())
        else:
            dims = [value]
        for d in dims:
            if isinstance(d, int) and not isinstance(d, bool) and d > 0:
                size *= d
    return size


def _positive(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{name}={value!r}: expected a positive integer")
    return int(value)


def pytest_collection_modifyitems(config, items) -> None:
    largest, every = _positive(CASE_MAX_ENV), _positive(CASE_EVERY_ENV)
    if largest is None and every is None:
        return
    by_function: dict[str, list] = {}
    for item in items:
        by_function.setdefault(item.nodeid.split("[")[0], []).append(item)
    chosen = set()
    for cases in by_function.values():
        sizes = [case_size(c.callspec.params) if hasattr(c, "callspec") else 1 for c in cases]
        small = [c for c, n in zip(cases, sizes) if largest is None or n <= largest]
        if small:
            chosen.update(id(c) for c in small[::every or 1])
        else:
            chosen.add(id(cases[sizes.index(min(sizes))]))
    drop = [item for item in items if id(item) not in chosen]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if id(item) in chosen]
