"""benchmarks/decode_targets.py without a GPU: issue 12's verdicts from a hand-made run whose ratios
are known, and the recorded run's verdicts against its rows recomputed here."""
from __future__ import annotations

import json
from pathlib import Path

import benchmark_scripts
import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@pytest.fixture(scope="module")
def dt():
    return benchmark_scripts.load("decode_targets")


def _row(variant, rank, batch, ms, ctx=512, floor=4.0):
    return {"variant": variant, "rank": rank, "batch": batch, "ctx": ctx, "ms_per_step": ms,
            "tokens_per_s": batch / ms * 1e3, "weight_read_floor_ms": floor}


def _run(fused_b1, gemv_dense_b1):
    rows = [_row("dense base", 16, 1, 5.0), _row("adafuse fused (graph)", 16, 1, fused_b1)]
    if gemv_dense_b1 is not None:
        rows.append(_row("dense base, kernel GEMV", 16, 1, gemv_dense_b1))
    for rank in (16, 64):
        for batch, fused in ((8, 5.7), (32, 6.4), (64, 6.6)):
            rows += [_row("dense base", rank, batch, 5.0), _row("adafuse fused (graph)", rank, batch, fused)]
    return {"ctx": 512, "decode": rows, "hf": [{"variant": "transformers static cache + torch.compile", "ms_per_token": 5.1}]}


def test_batch1_judged_against_the_faster_dense(dt):
    # 5.1 ms: 1.275x the 4.0 floor, 1.02x cuBLAS dense (5.0) -> reached without a faster dense row
    t = dt.judge(_run(5.1, None), None, None)["b1_r16_vs_floor"]
    assert t["reached"] and abs(t["x_floor"] - 1.275) < 1e-12 and abs(t["x_dense"] - 1.02) < 1e-12
    # the library's GEMV makes dense 4.6 ms: 5.1 / 4.6 = 1.109 > 1.05 -> missed, and says which dense
    t = dt.judge(_run(5.1, 4.6), None, None)["b1_r16_vs_floor"]
    assert not t["reached"] and t["dense_compared"] == "dense base, kernel GEMV"
    assert abs(t["x_dense"] - 5.1 / 4.6) < 1e-12 and abs(t["x_dense_cublas"] - 1.02) < 1e-12
    assert "why_not" in t


def test_batch_targets_use_their_own_thresholds(dt):
    t = dt.judge(_run(5.1, None), None, None)
    assert t["b8_vs_dense"]["r16"] == pytest.approx(1.14) and t["b8_vs_dense"]["reached"]  # <= 1.15
    assert t["b32_b64_vs_dense"]["r64_b64"] == pytest.approx(1.32) and not t["b32_b64_vs_dense"]["reached"]  # > 1.3
    assert not t["transformers_static_compile"]["reached"]  # 5.1 ms is not faster than 5.1 ms
    assert "context_rows" not in t  # no 2048 / 8192 rows in this run: not judged


def test_recorded_run_verdicts_match_its_rows():
    d = json.loads((RESULTS / "h200_decode.json").read_text())
    ms = {(r["variant"], r["rank"], r["batch"], r["ctx"]): r["ms_per_step"] for r in d["decode"]}
    t = d["targets"]
    fused, cublas, gemv = (ms[(v, 16, 1, 512)] for v in ("adafuse fused (graph)", "dense base", "dense base, kernel GEMV"))
    assert t["b1_r16_vs_floor"]["x_dense"] == pytest.approx(fused / min(cublas, gemv))
    assert t["b1_r16_vs_floor"]["reached"] == (t["b1_r16_vs_floor"]["x_floor"] <= 1.3 and fused / min(cublas, gemv) <= 1.05)
    for rank in (16, 64):
        assert t["b8_vs_dense"][f"r{rank}"] == pytest.approx(ms[("adafuse fused (graph)", rank, 8, 512)]
                                                             / ms[("dense base", rank, 8, 512)])
    for key, v in t.items():
        assert v["reached"] or v.get("why_not"), f"{key}: missed without a reason"
