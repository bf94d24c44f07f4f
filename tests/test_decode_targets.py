"""benchmarks/decode_targets.py without a GPU: issue 23's verdicts from hand-made runs whose ratios are known (every
target met; every target missed, its reason built from the side files' figures; rows absent), and the recorded H100
run (benchmarks/results) judged with its own side files, its figures recomputed here from the rows."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import benchmark_scripts
import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GPU = "NVIDIA H100 80GB HBM3"


@pytest.fixture(scope="module")
def dt():
    return benchmark_scripts.load("decode_targets")


def _row(strategy, batch, ms, floor=4.0, **extra):
    return {"strategy": strategy, "batch": batch, "ctx": 512, "routes": "route changes", "ms_per_step": ms,
            "tokens_per_s": batch / ms * 1e3, "weight_read_floor_ms": floor, "x_floor": ms / floor, **extra}


def _run(b1=4.6, b8=6.0, r64=6.5, b32=11.0, b64=15.0, fp8=2.6, agreement=0.95):
    """dense 4.5 / 5.5 / 10 / 14 ms at batch 1 / 8 / 32 / 64, floor 4.0 ms; the r64 row's bytes floor 6.4 ms."""
    rows = [_row("dense", b, ms) for b, ms in ((1, 4.5), (8, 5.5), (32, 10.0), (64, 14.0))]
    rows += [_row("fused", 1, b1), _row("fused", 8, b8), _row("fused", 32, b32), _row("fused", 64, b64),
             _row("fused-fp8", 1, fp8, floor=2.1),
             _row("fused-r64", 8, r64, bytes_floor_ms=6.4,
                  bytes_read={"weights": 12.8e9, "adapters": 3.2e9, "experts_per_step": 7.25,
                              "adapter_bytes_per_expert": 3.2e9 / 7.25})]
    return {"device": GPU, "ctx": 512, "decode": rows,
            "fp8_agreement": {"agreement": agreement, "free_running": 0.5, "first_divergence": [3, 24, 12, 24],
                              "prompts": 4, "new_tokens": 24, "bf16_forced_self_agreement": 0.98}}


def _switch(pct, device=GPU):
    return {"device": device, "floor_ms": 6.0, "weight_bytes": 12.0e9, "copy_TBps_2GB": 4.0,
            "rows": {"r16 pristine": {"switch_pct_of_copy": pct, "switch_ms": 6.0 / (pct / 100),
                                      "nomma_pct_of_copy": 63.0, "triton_pct_of_copy": 99.0},
                     "r64 pristine": {"switch_pct_of_copy": 36.0, "switch_ms": 26.0}}}


def _profile():
    """The fused step at batch 8 and 32: linear 2.0 ms, attention 1.0, copies 0.5, other 0.5 (of 4 ms busy); the
    dense step at batch 8: linear 1.5 ms, attention 1.0, copies 0.5, other 0.4."""
    def entry(gemm, attn, copies, other):
        return {"span_ms_median": gemm + attn + copies + other + 0.1, "kernels": [
            {"kernel": "nvjet_sm90_tst_192x32_64x7_4x1_v_bz_TNT", "ms": gemm * 0.75},
            {"kernel": "adafuse::gemv_mma_kernel", "ms": gemm * 0.25},
            {"kernel": "adafuse::attn_partial_kernel", "ms": attn * 0.9},
            {"kernel": "adafuse::attn_combine_kernel", "ms": attn * 0.1},
            {"kernel": "Memcpy DtoH", "ms": copies},
            {"kernel": "adafuse::norm_kernel", "ms": other}]}
    return {"device": GPU, "layers": 8, "decode": {"fused b8": entry(2.0, 1.0, 0.5, 0.5),
                                                   "dense b8": entry(1.5, 1.0, 0.5, 0.4),
                                                   "fused b32": entry(2.0, 1.0, 0.5, 0.5)}}


def _gemv():
    def site(name, rows, rank, floor, fused, linear=None):
        s = {"site": name, "rows": rows, "rank": rank, "floor_us": floor, "floor_fused_us": floor * 1.1,
             "cublas_us": floor / 0.8, "fused_default_us": floor * 1.1 / fused}
        if linear is not None:
            s["linear_default_us"] = floor / linear
        return s
    return {"device": GPU, "sites": [site("qkv", 1, 16, 30.0, 0.9, 0.95), site("o", 1, 16, 10.0, 0.7, 0.8),
                                     site("qkv", 8, 16, 30.0, 0.6, 0.85), site("qkv", 8, 64, 30.0, 0.5)]}


def _fp8():
    return {"device": GPU, "step_projections": [{"r": 16, "rows": 1, "adapter": True, "fp8_over_bf16": 0.61}],
            "sites": [{"site": "qkv", "r": 16, "rows": 1, "adapter": True, "fp8_frac_of_copy": 0.69},
                      {"site": "qkv", "r": 16, "rows": 1, "adapter": False, "fp8_frac_of_copy": 0.79}]}


def _targets(t):
    return {k: v for k, v in t.items() if k != "device"}


def test_a_run_that_meets_every_target(dt):
    t = dt.judge(_run(), _switch(85.0), _profile(), _gemv(), _fp8())
    assert t["device"] == GPU
    for key, v in _targets(t).items():
        assert v["reached"] and "why_not" not in v, (key, v)
    assert t["b1_r16"]["x_floor"] == pytest.approx(4.6 / 4.0) and t["b1_r16"]["x_dense"] == pytest.approx(4.6 / 4.5)
    assert t["b8_r16"]["x_dense"] == pytest.approx(6.0 / 5.5)  # 1.091 <= 1.15
    assert t["b8_r64"]["x_bytes_floor"] == pytest.approx(6.5 / 6.4)  # within 5%
    assert t["b32_b64"]["x_dense"] == {"b32": pytest.approx(1.1), "b64": pytest.approx(15.0 / 14.0)}
    assert t["switch_kernel"]["fraction_of_copy"]["r16 pristine"] == pytest.approx(0.85)
    assert t["fp8_b1"]["x_bf16_dense"] == pytest.approx(2.6 / 4.5)  # 0.578 <= 0.6
    assert t["fp8_b1"]["agreement"]["agreement"] == 0.95


def test_thresholds_are_the_issues(dt):
    assert not dt.judge(_run(fp8=2.8))["fp8_b1"]["reached"]  # 0.622x the bf16 dense step
    assert dt.judge(_run(b1=4.72))["b1_r16"]["reached"]  # 1.049x dense
    assert not dt.judge(_run(b1=4.75))["b1_r16"]["reached"]  # 1.056x
    assert not dt.judge(_run(b1=4.9))["b1_r16"]["reached"]  # 1.089x dense, 1.225x the floor
    assert not dt.judge(_run(b1=4.7, b8=6.4))["b8_r16"]["reached"]  # 6.4 / 5.5 = 1.164 > 1.15
    assert dt.judge(_run(r64=6.71))["b8_r64"]["reached"] and not dt.judge(_run(r64=6.75))["b8_r64"]["reached"]
    assert not dt.judge(_run(b64=17.6))["b32_b64"]["reached"]  # 1.257x at batch 64
    assert not dt.judge(_run(agreement=0.85))["fp8_b1"]["reached"]  # fast enough, but disagrees


def test_missed_targets_say_why_from_the_side_files(dt):
    run = _run(b1=5.6, b8=7.0, r64=8.0, b32=13.0, b64=15.0, fp8=3.9, agreement=0.8)
    t = dt.judge(run, _switch(52.0, device="NVIDIA H200"), _profile(), _gemv(), _fp8())
    assert not any(v["reached"] for v in _targets(t).values())
    b1 = t["b1_r16"]["why_not"]
    assert "1.400x the weight-read floor (4.00 ms)" in b1 and "the adapters add 1.100 ms" in b1
    assert "no fused batch-1 profile (profiled: dense b8, fused b32, fused b8)" in b1
    assert "qkv 90% / 95% / 80%, o 70% / 80% / 80%" in b1  # gemv_sites: fused / no adapter / cuBLAS
    b8 = t["b8_r16"]
    # the split computed from the kernels: linear 2.0 of 4.0 ms, attention 1.0, copies 0.5, other 0.5
    assert b8["profile"]["fused"]["share"] == pytest.approx(
        {"linear layers": 0.5, "attention": 0.25, "copies": 0.125, "other": 0.125})
    assert "linear layers 50%, attention 25%, copies 12%, other 12%" in b8["why_not"]
    assert "linear layers +0.500 ms, attention +0.000 ms, copies +0.000 ms, other +0.100 ms" in b8["why_not"]
    assert "qkv 60% / 85% / 80%" in b8["why_not"]
    r64 = t["b8_r64"]["why_not"]
    assert "8.00 ms is 1.250x the 6.40 ms of reading W (12.80 GB) and the A and B of 7.25 experts" in r64
    assert "+25% bytes" in r64 and "qkv 50% / 85% / 80%" in r64  # the no-adapter GEMV: any rank's record
    big = t["b32_b64"]
    assert set(big["profile"]) == {"b32"} and "batch 32: 13.00 ms against dense 10.00 ms (1.300x)" in big["why_not"]
    assert "batch 64" not in big["why_not"]  # 15 / 14 is within 1.25x
    sw = t["switch_kernel"]["why_not"]
    assert sw.startswith("switch_bound.json (measured on NVIDIA H200, not this run's GPU): the r16 switch (pristine) "
                         "runs at 52% of copy (11.54 ms against the floor 6.00 ms: its 24.0 GB read and written at the "
                         "2 GiB copy's 4.00 TB/s)")
    assert "without its delta MMA 63%" in sw and "a one-tile-per-CTA Triton kernel 99%" in sw
    fp8 = t["fp8_b1"]["why_not"]
    assert "3.90 ms is 0.867x the bf16 dense step" in fp8 and "FP8 over bf16: 0.610" in fp8 and "qkv 69%" in fp8
    assert ("greedy agreement 0.800 < 0.9 on the bf16 tokens' prefixes (the bf16 artifact's own prefill: 0.98; "
            "free-running 0.500, first divergence per prompt [3, 24, 12, 24])") in fp8


def test_agreement_below_the_models_own_consistency_is_called_noise(dt):
    """The bf16 artifact disagreeing with itself (prefill against decode picks) below the bar: the verdict stays
    missed, and the why says the agreement measures the synthetic model's near ties, not FP8."""
    run = _run(agreement=0.2)
    run["fp8_agreement"]["bf16_forced_self_agreement"] = 0.8
    t = dt.judge(run)["fp8_b1"]
    assert not t["reached"]
    assert "agrees with itself (its prefill's picks against its decode path's) on only 0.800" in t["why_not"]
    run["fp8_agreement"]["bf16_forced_self_agreement"] = 0.98  # consistent model: no such note
    assert "agrees with itself" not in dt.judge(run)["fp8_b1"]["why_not"]


def test_rows_the_run_lacks_are_not_measured(dt):
    run = _run()
    run["decode"] = [r for r in run["decode"] if r["strategy"] in ("fused", "dense") and r["batch"] <= 8]
    del run["fp8_agreement"]
    t = dt.judge(run)
    for key in ("b8_r64", "b32_b64", "switch_kernel", "fp8_b1"):
        assert not t[key]["reached"] and t[key]["why_not"].startswith("not measured: "), key
    run["decode"].append(_row("fused-fp8", 1, 2.5))
    assert dt.judge(run)["fp8_b1"]["why_not"] == "greedy agreement not measured (h200_decode.py --no-agreement?)"


def test_kernel_classes(dt):
    for name, cls in (("adafuse::attn_partial_kernel", "attention"), ("adafuse::prefill_attn_mma_kernel", "attention"),
                      ("nvjet_sm90_tst_64x32_64x16_2x1_v_bz_splitK_TNT", "linear layers"),
                      ("cublasLt::splitKreduce_kernel", "linear layers"), ("adafuse::gemv1_kernel", "linear layers"),
                      ("adafuse::route_columns_kernel", "linear layers"), ("Memcpy DtoH", "copies"),
                      ("adafuse::rope_kernel", "other"), ("adafuse::logits_kernel", "other")):
        assert dt.kernel_class(name) == cls, name


def test_the_recorded_h100_run(dt, tmp_path, capsys):
    """native_backend.json of the H100 run with the side files of that GPU (recorded with an _h100 suffix) and the
    H200's switch_bound.json: written back under "targets", every figure recomputed here from the rows."""
    for name, recorded in (("native_backend.json", "native_backend.json"), ("switch_bound.json", "switch_bound.json"),
                           ("profile_native.json", "profile_native_h100.json"),
                           ("gemv_sites.json", "gemv_sites_h100.json"), ("fp8_gemv.json", "fp8_gemv_h100.json")):
        shutil.copy(RESULTS / recorded, tmp_path / name)
    dt.main([str(tmp_path)])
    run = json.loads((tmp_path / "native_backend.json").read_text())
    t, rows = run["targets"], {(r["strategy"], r["batch"]): r for r in run["decode"]}
    ms = {k: r["ms_per_step"] for k, r in rows.items()}
    assert t["device"] == run["device"] == GPU
    assert t["b1_r16"]["x_floor"] == pytest.approx(ms[("fused", 1)] / rows[("fused", 1)]["weight_read_floor_ms"])
    assert t["b1_r16"]["x_dense"] == pytest.approx(ms[("fused", 1)] / ms[("dense", 1)])
    assert t["b8_r16"]["x_dense"] == pytest.approx(ms[("fused", 8)] / ms[("dense", 8)])
    for b in (32, 64):
        assert t["b32_b64"]["x_dense"][f"b{b}"] == pytest.approx(ms[("fused", b)] / ms[("dense", b)])
    assert t["fp8_b1"]["x_bf16_dense"] == pytest.approx(ms[("fused-fp8", 1)] / ms[("dense", 1)])
    for key, v in _targets(t).items():
        assert v["reached"] or v["why_not"], key
    # this run (before the r64 row and the agreement existed) misses every target; what it lacks is said so
    assert t["b8_r64"]["why_not"].startswith("not measured: ")
    assert "greedy agreement not measured" in t["fp8_b1"]["why_not"]
    assert "(measured on NVIDIA H200, not this run's GPU)" in t["switch_kernel"]["why_not"]
    assert t["b32_b64"]["profile"]["b32"]["layers"] == 8  # profiled at 32 and 64: the split is there
    assert "b64" not in t["b32_b64"]["profile"]  # 1.216x at 64 is within 1.25x
    out = capsys.readouterr().out
    assert out.startswith(f"issue 23's targets on {GPU}:") and out.count("missed") == 6
