"""benchmarks/switch_bound.py without a GPU: the job's sizes, the derived percentages, and the
recorded run's table (benchmarks/results/switch_bound.json) against the figures KERNEL_NOTES quotes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import benchmark_scripts
import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "benchmarks" / "results" / "switch_bound.json"


@pytest.fixture(scope="module")
def sb():
    return benchmark_scripts.load("switch_bound")


def test_job_sizes_are_the_7b_adapted_linears(sb):
    # Llama-2-7B: hidden 4096, intermediate 11008, 32 layers, q/k/v/o + gate/up + down, bf16
    per_layer = 4 * 4096 * 4096 + 2 * 11008 * 4096 + 4096 * 11008
    assert sb.weight_bytes(32) == 2 * 32 * per_layer == 12_952_010_752
    assert dict(sb.shape_classes(32)) == {(4096, 4096): 128, (11008, 4096): 64, (4096, 11008): 32}
    # K = terms x rank rounded up to 16; in place carries the old route's terms too
    assert [sb.case_k(r, p) for _, r, p in sb.CASES] == [32, 64, 128, 256]
    assert sb.case_k(3, True) == 2 * 16


def test_percent_of_copy_is_the_floor_over_the_time(sb):
    res = {"weight_bytes": 1_000_000_000, "copy_TBps_2GB": 4.0,
           "rows": {"r16 pristine": {"K": 32, "flops": 6.4e10, "switch_ms": 1.0, "triton_ms": 0.625}}}
    sb.derive(res)
    assert res["floor_ms"] == pytest.approx(0.5)  # 2 GB moved at 4 TB/s
    row = res["rows"]["r16 pristine"]
    assert row["switch_pct_of_copy"] == pytest.approx(50.0)
    assert row["triton_pct_of_copy"] == pytest.approx(80.0)
    assert "nomma_pct_of_copy" not in row  # not measured: not invented
    assert row["tensor_TFps_switch"] == pytest.approx(64.0)


def test_recorded_run_gives_the_percentages_the_notes_quote(tmp_path):
    copy = tmp_path / "switch_bound.json"
    copy.write_text(RECORDED.read_text())
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "switch_bound.py"), "--resummarize", str(copy)],
                         capture_output=True, text=True, check=True).stdout
    res = json.loads(copy.read_text())
    pct = {name: round(r["switch_pct_of_copy"]) for name, r in res["rows"].items()}
    assert pct == {"r16 pristine": 52, "r16 in place": 43, "r64 pristine": 36, "r64 in place": 17}
    assert round(res["rows"]["r16 pristine"]["triton_pct_of_copy"]) == 99
    assert res["failures"] == 0
    notes = (ROOT / "benchmarks" / "results" / "KERNEL_NOTES.md").read_text()
    assert "11.70 ms (**52%**)" in notes and "**6.19 (99%)**" in notes
    assert "r16 pristine    32 |  11.704 ( 52%)" in out
