"""Shared fixtures: tiny canonical checkpoints of every kind, and a CLI runner."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from adafuse_export.cli import main
from adafuse_export.examples import KINDS, make_example
# a skip on CI fails the session unless expected (tests/ci_skips.py)
from native_build import build_native
from ci_skips import pytest_collectreport, pytest_runtest_logreport, pytest_sessionfinish, pytest_terminal_summary  # noqa: F401


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
