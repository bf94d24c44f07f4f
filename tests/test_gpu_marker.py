"""The gpu marker's contract (setup.cfg addopts, tests/conftest.py):

- the default selection (the README's `python3 -m pytest -q -rs`) runs no gpu test and skips none:
  they are deselected, since a skip on CI fails the session (tests/ci_skips.py);
- `python3 -m pytest -m gpu` selects exactly the tests under tests/gpu/, every one of them;
- where no CUDA device is visible, a selected gpu test fails at once with a message that says so.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pytest_run(*args: str, no_gpu: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ADAFUSE_CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if no_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def node_ids(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if "::" in line and not line.startswith(("ERROR", "FAILED"))]


def test_marker_gpu_selects_exactly_tests_gpu():
    r = pytest_run("--collect-only", "-q", "-m", "gpu")
    assert r.returncode == 0, r.stdout + r.stderr
    ids = node_ids(r.stdout)
    assert len(ids) > 100, r.stdout[-2000:]
    assert all(i.startswith("tests/gpu/") for i in ids), [i for i in ids if not i.startswith("tests/gpu/")][:5]
    files = {i.split("::")[0] for i in ids}
    assert files >= {f"tests/gpu/test_gpu_{m}.py" for m in ("lora_linear", "switch", "decode_ops", "model_ops", "run_cli")}
    assert files >= {"tests/gpu/test_native_backend.py", "tests/gpu/test_native_serve.py"}
    # the TensorRT backend's tests need full TensorRT, which the GPU machine lacks: their own marker, never -m gpu
    assert "tests/gpu/test_tensorrt_backend.py" not in files


def test_default_selection_runs_no_gpu_test_and_skips_none():
    r = pytest_run("--collect-only", "-q", "tests/gpu")
    assert r.returncode == 5, r.stdout + r.stderr  # 5: nothing selected
    assert node_ids(r.stdout) == [], r.stdout[-2000:]
    assert "deselected" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


def test_gpu_tests_fail_without_a_gpu():
    r = pytest_run("-q", "-m", "gpu", "tests/gpu/test_gpu_decode_ops.py", "-k", "silu_mul and fp32 and 1-7", no_gpu=True)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "marker gpu: this test needs a CUDA GPU, but torch" in out and "sees no CUDA device" in out, out[-3000:]
    assert "CUDA_VISIBLE_DEVICES=''" in out, out[-3000:]
    assert "1 error" in out and "skipped" not in out and "passed" not in out, out[-3000:]
