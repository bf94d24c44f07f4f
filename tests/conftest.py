"""Shared fixtures: tiny canonical checkpoints of every kind, and a CLI runner."""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from adafuse_export.cli import main
from adafuse_export.examples import KINDS, make_example
# a skip on CI fails the session unless expected (tests/ci_skips.py)
from native_build import build_native
from ci_skips import pytest_collectreport, pytest_runtest_logreport, pytest_sessionfinish, pytest_terminal_summary  # noqa: F401


@functools.lru_cache(maxsize=1)
def missing_cuda() -> str | None:
    """Why no CUDA device can run the gpu tests here, or None when one can."""
    import torch

    if torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False"
            + (f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "") + ")")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """A test marked gpu fails (never skips) where there is no GPU: `-m gpu` on a CPU machine is a mistake
    to report, not a pass. Checked before its fixtures, so nothing is built for a run that cannot happen."""
    for marker in ("gpu", "tensorrt"):
        if item.get_closest_marker(marker) is not None and missing_cuda():
            pytest.fail(f"marker {marker}: this test needs a CUDA GPU, but {missing_cuda()}; run `python3 -m pytest "
                        f"-m {marker} tests/gpu` on a GPU machine", pytrace=False)


@pytest.fixture(scope="session")
def example_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("examples")
    out = {}
    for seed, kind in enumerate(KINDS):
        out[kind] = root / kind
        make_example(out[kind], kind, seed=seed)
    return out


@pytest.fixture
def example_copy(example_dirs, tmp_path):
    """A private copy of an example, safe to break."""
    def copy(kind: str = "pregate") -> Path:
        dst = tmp_path / f"{kind}-copy"
        shutil.copytree(example_dirs[kind], dst)
        return dst
    return copy


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli():
    """Run the CLI in-process through main(), as the console script does."""
    def invoke(*args: str) -> CliResult:
        with CliRunner().isolation() as (out, err, _):
            code = main([str(a) for a in args])
            return CliResult(code, out.getvalue().decode(), err.getvalue().decode())
    return invoke


@pytest.fixture(scope="session")
def native_build(tmp_path_factory) -> Path:
    """The top-level CMake project built with the dev preset (tests/native_build.py)."""
    return build_native(tmp_path_factory)
