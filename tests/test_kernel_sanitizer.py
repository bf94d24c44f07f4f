"""runtime/tools/kernel_sanitizer.sh without a GPU: the subset of the kernel tests it runs (tests/gpu/conftest.py's
ADAFUSE_GPU_CASE_MAX / ADAFUSE_GPU_CASE_EVERY, collected here), its refusals, and its positive control compiling with
warnings as errors. The sanitizer runs themselves need the GPU machine (bash benchmarks/h200_all.sh --sanitize)."""
from __future__ import annotations

import dataclasses
import json
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adafuse_export.kernels import build as kbuild

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "runtime" / "tools" / "kernel_sanitizer.sh"
TESTS = [f"tests/gpu/test_gpu_{n}.py" for n in ("lora_linear", "lora_linear_fp8", "switch", "model_ops", "decode_ops")]


def collect(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           *TESTS], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ADAFUSE_GPU_CASE_MAX": "", "ADAFUSE_GPU_CASE_EVERY": "", **env})


def ids(out: str) -> list[str]:
    return [line for line in out.splitlines() if "::" in line]


@pytest.fixture(scope="module")
def gpu_conftest():
    spec = importlib.util.spec_from_file_location("gpu_conftest_under_test", ROOT / "tests" / "gpu" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "tests" / "gpu"))  # its `from gpu_numerics import ...`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "tests" / "gpu"))
    return module


def test_case_size(gpu_conftest):
    @dataclasses.dataclass(frozen=True)
    class Case:
        dtype: str
        in_f: int
        out_f: int
        rows: int
        rank: int = 16
        bias: bool = True

    @dataclasses.dataclass(frozen=True)
    class Other:
        n: int
        flag: bool

    assert gpu_conftest.case_size({"case": Case("bf16", 4096, 11008, 8)}) == 4096 * 11008 * 8  # rank not counted
    assert gpu_conftest.case_size({"dtype": "bf16", "rows": 130, "hidden": 4096, "scale": 1.5, "flag": True}) == 130 * 4096
    assert gpu_conftest.case_size({"o": Other(7, True), "window": 0}) == 7  # zero and bools are no dimension
    assert gpu_conftest.case_size({}) == 1


def test_the_subset_keeps_every_file_and_small_cases_only():
    full, subset = collect(), collect(ADAFUSE_GPU_CASE_MAX="4000000", ADAFUSE_GPU_CASE_EVERY="4")
    assert full.returncode == 0 and subset.returncode == 0, full.stdout[-2000:] + subset.stdout[-2000:]
    every, kept = ids(full.stdout), ids(subset.stdout)
    assert 100 < len(kept) < len(every) / 4, (len(kept), len(every))
    for test in TESTS:
        assert any(k.startswith(test) for k in kept), test
    assert set(kept) <= set(every)
    functions = {re.sub(r"\[.*", "", k) for k in every}
    assert functions == {re.sub(r"\[.*", "", k) for k in kept}  # every test function keeps a case
    # none of the 7B sites is that small: the smallest (down, one row) stands for them
    assert [k.split("::")[1] for k in kept if "7b_sites" in k] == ["test_lora_linear_7b_sites[bf16-11008x4096-rows1-r48-E8-k2]"]
    big = [k for k in kept if re.search(r"4096x4095-rows(512|2048)|11008x4096-rows(64|512)|rows2048", k)]
    assert not big, big[:5]
    assert f"{len(kept)}/{len(every)} tests collected" in subset.stdout


def test_a_bad_subset_setting_is_one_line():
    r = collect(ADAFUSE_GPU_CASE_EVERY="0")
    assert r.returncode == 4, r.stdout[-2000:]
    assert "ADAFUSE_GPU_CASE_EVERY='0': expected a positive integer" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout


def test_the_script_refuses_a_bad_tool_and_a_missing_sanitizer(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    r = subprocess.run(["bash", str(SCRIPT), "initcheck"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr == "usage: kernel_sanitizer.sh [memcheck|racecheck|all] (found 'initcheck')\n"
    r = subprocess.run(["bash", str(SCRIPT), "memcheck"], capture_output=True, text=True, timeout=60,
                       env={**env, "COMPUTE_SANITIZER": "/nonexistent/compute-sanitizer"})
    assert r.returncode == 2
    assert r.stderr == "compute-sanitizer not found at /nonexistent/compute-sanitizer (set COMPUTE_SANITIZER to its path)\n"


@pytest.mark.skipif(kbuild.find_nvcc() is None, reason="nvcc not found (install the CUDA toolkit)")
def test_the_positive_control_compiles_with_warnings_as_errors(tmp_path):
    r = subprocess.run([str(kbuild.find_nvcc()), "-arch=sm_90", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra",
                        "-o", str(tmp_path / "control"), str(ROOT / "runtime" / "tools" / "sanitizer_control.cu")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    usage = subprocess.run([str(tmp_path / "control")], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and usage.stderr == "usage: sanitizer_control oob|race\n"


FAKE_NVCC = """#!/usr/bin/env bash
while [[ $# -gt 0 ]]; do [[ $1 == -o ]] && { printf '#!/bin/sh\\nexit 0\\n' > "$2"; chmod +x "$2"; }; shift; done
"""
# Stands in for compute-sanitizer: records its arguments and the subset settings, writes the report the real one
# writes (--log-file) and exits as it would: the control reported (86) unless FAKE_CONTROL=missed, the tests with
# FAKE_ERRORS errors (86 when any).
FAKE_SANITIZER = """#!/usr/bin/env bash
echo "$* | $ADAFUSE_GPU_CASE_MAX $ADAFUSE_GPU_CASE_EVERY" >> "$FAKE_CALLS"
while [[ $# -gt 0 && $1 == --* ]]; do [[ $1 == --log-file ]] && log=$2; shift 2; done
if [[ $1 == *sanitizer_control ]]; then
  if [[ ${FAKE_CONTROL:-} == missed ]]; then echo "========= ERROR SUMMARY: 0 errors" > "$log"; exit 0; fi
  echo "========= ERROR SUMMARY: 1 error" > "$log"; exit 86
fi
echo "========= ERROR SUMMARY: ${FAKE_ERRORS:-0} errors" > "$log"
echo "394 passed, 1864 deselected in 1.00s"
[[ ${FAKE_ERRORS:-0} == 0 ]] || exit 86
"""


def fake_run(tmp_path, tool="all", **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("nvcc", FAKE_NVCC), ("compute-sanitizer", FAKE_SANITIZER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    calls = tmp_path / "calls.txt"
    r = subprocess.run(["bash", str(SCRIPT), tool], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out),
                            "FAKE_CALLS": str(calls), "COMPUTE_SANITIZER": "", **env})
    summary = json.loads((out / "sanitizer_summary.json").read_text())
    return r, summary, calls.read_text().splitlines()


def test_the_script_runs_each_tool_after_its_control_and_summarises(tmp_path):
    r, summary, calls = fake_run(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert summary["passed"] and summary["subset"] == {"ADAFUSE_GPU_CASE_MAX": "4000000", "ADAFUSE_GPU_CASE_EVERY": "4"}
    assert [(t["tool"], t["control"], t["rc"]) for t in summary["tools"]] == [("memcheck", "reported", "0"),
                                                                             ("racecheck", "reported", "0")]
    assert summary["tools"][0]["sanitizer_summary"] == "ERROR SUMMARY: 0 errors"
    assert summary["tools"][0]["pytest"] == "394 passed, 1864 deselected in 1.00s"
    assert len(calls) == 4  # per tool: the control, then the tests
    for call, tool, program in zip(calls, ["memcheck", "memcheck", "racecheck", "racecheck"],
                                   ["sanitizer_control oob", "python3 -m pytest -m gpu", "sanitizer_control race",
                                    "python3 -m pytest -m gpu"]):
        assert call.startswith(f"--tool {tool} --error-exitcode 86 --kernel-name kns=adafuse "), call
        assert program in call and call.endswith("| 4000000 4"), call
    assert all(t in calls[1] for t in TESTS)
    assert r.stdout.rstrip().endswith("kernel sanitizer: PASS (summary in " + str(tmp_path / "out") + "/sanitizer_summary.json)")


def test_an_unreported_control_or_a_reported_error_fails(tmp_path):
    r, summary, _ = fake_run(tmp_path, "memcheck", FAKE_CONTROL="missed")
    assert r.returncode == 1 and not summary["passed"]
    assert summary["tools"] == [dict(summary["tools"][0], tool="memcheck", control="NOT REPORTED", rc="0")]
    r, summary, _ = fake_run(tmp_path, "racecheck", FAKE_ERRORS="3")
    assert r.returncode == 1 and not summary["passed"]
    assert (summary["tools"][0]["rc"], summary["tools"][0]["sanitizer_summary"]) == ("86", "ERROR SUMMARY: 3 errors")
    assert "kernel sanitizer: FAIL" in r.stdout
