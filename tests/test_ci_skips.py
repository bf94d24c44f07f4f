"""tests/ci_skips.py: on CI (ADAFUSE_CI=1) an unexpected skip fails the pytest session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ci_skips

TESTS = Path(__file__).resolve().parent
SUITE = """
import pytest

def test_runs():
    pass

def test_skips():
    pytest.skip("widget not installed")
"""


def _pytest(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k != ci_skips.CI_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    if ci:
        env[ci_skips.CI_ENV] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "ci_skips", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def test_unexpected_skip_fails_the_session_on_ci(tmp_path):
    r = _pytest(tmp_path, ci=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 passed, 1 skipped" in r.stdout
    assert "UNEXPECTED SKIP test_sample.py::test_skips: widget not installed" in r.stdout


def test_skip_is_only_reported_off_ci(tmp_path):
    r = _pytest(tmp_path, ci=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "UNEXPECTED SKIP" not in r.stdout


def test_listed_skips_are_expected():
    skipped = {"tests/test_a.py::test_x": "no gpu", "tests/test_b.py": "module skipped",
               "tests/test_b.py::test_y": "inside a listed module", "tests/test_c.py::test_z": "missing tool"}
    expected = {"tests/test_a.py::test_x": "GPU-only", "tests/test_b.py": "whole module"}
    assert ci_skips.unexpected_skips(skipped, expected) == {"tests/test_c.py::test_z": "missing tool"}
