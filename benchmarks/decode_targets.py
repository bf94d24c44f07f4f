"""Issue 12's targets, judged from one `h200_decode.py` run (plus the kernel benchmarks' JSON).

  python3 benchmarks/decode_targets.py benchmarks/results        # reads, prints, writes "targets"

Reads h200_decode.json (the decode rows of one run), switch_bound.json (the switch kernel against
the copy floor) and lora_many_rows.json (the routed linear above 16 rows) from the folder, computes
each target's figures and whether it is reached, and writes them into h200_decode.json under
"targets". Why a target is missed is the `WHY` text below, which cites the measurement behind it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

DENSE, DENSE_GEMV, FUSED = "dense base", "dense base, kernel GEMV", "adafuse fused (graph)"

# Why each missed target is missed, from the run of 2026-11-29 and the files it cites.
WHY: Dict[str, str] = {
    "b1_r16_vs_floor": (
        "Fused 1.39x the floor; 0.97x cuBLAS dense but 1.09x the dense model on the library's own GEMV. "
        "profile_decode_step.json: the fused GEMVs take 3.65 ms against the no-adapter GEMV's 3.29 ms (the B "
        "epilogue and the wait for the shrink, whose 0.40 ms of kernel time is mostly hidden), the rest of the "
        "step ~0.75 ms (attention 0.40, norms 0.17, RoPE/KV, SiLU, LM head). Per site (gemv_sites.json) the "
        "no-adapter GEMV reaches 90/97/86% of copy on qkv/gate_up/down but 78% on the 32 MB o projection; the "
        "fused one 67-93%. 1.3x (4.11 ms) needs the fused GEMVs at the plain GEMV's rate and o near 90%."),
    "b8_vs_dense": (
        "At batch 8 with a route per row nearly every expert is read: A and B add 7.7% (r16) and 30.9% (r64) "
        "to W's bytes as the decoder stacks q/k/v and gate/up (B block-diagonal; 4.8% / 19.4% without the zero "
        "blocks), so r64's 1.15x is below its bytes floor (>= 1.31x). r16: the skinny tensor-core kernel runs at "
        "49-76% of its per-site floor at 8 rows (gemv_sites.json) against cuBLAS's 59-87%; the LoRA epilogue "
        "reads each row's B rows after the W stream instead of overlapping it."),
    "b32_b64_vs_dense": (
        "Above 16 rows the decoder runs cuBLAS for x W^T plus the LoRA term in PyTorch ops (all-expert shrink, "
        "gate mask, one B matmul: extra kernels and an extra pass over the activations per site); the library's "
        "own many-rows GEMM is 1.8-4.5x cuBLAS (lora_many_rows.json), so it is not used there. Closing it needs "
        "the LoRA term in a cuBLAS-class GEMM's K loop or epilogue (TMA, warp specialisation)."),
    "grouped_path_over_16_rows": (
        "Replaced, not removed: the grouped SIMT shrink/expand with fp32 atomics (605 of 772 us at 512 rows in "
        "the shrink) is gone; the LoRA term is extra K columns of one tensor-core GEMM, 3.7-8.3x faster, "
        "1.8-1.9x cuBLAS at 17 rows, 3.9-4.5x at 512-2048. Every variant (wgmma included) runs ~1 us per K "
        "slice per block, bound by cp.async operand loading; cuBLAS uses TMA, producer/consumer warp groups and "
        "cluster multicast (KERNEL_NOTES.md v5). Kept as the TensorRT plugin's prefill path; the decoder uses "
        "cuBLAS + PyTorch ops above 16 rows."),
    "switch_kernel": (
        "Measured bound (switch_bound.json, ncu text under switch_bound_ncu/): the v3 kernel is bound by "
        "instruction issue (7.3k / 11.3k warp instructions per 64x128 tile at r16 / r64; DRAM 48-54% of peak, "
        "tensor pipe 6-16%), and its persistent blocks span all 224 sites so B is re-read from DRAM (+11% / +47% "
        "bytes). cuBLAS addmm_ on the same job reaches 51-60%; a plain Triton tile kernel (one CTA per tile, "
        "wgmma, 1.4k instructions per tile) reaches 99% at K=32, 93% at K=64, 64% at K=128: 80% at r16 takes a "
        "CUDA kernel of that shape; r64 pristine also needs operand reuse and a warp-specialised TMA/wgmma "
        "pipeline."),
    "gemv_one_row_fraction_of_copy": (
        "The no-adapter GEMV reaches 90% (qkv), 97% (gate_up), 86% (down) and 78% (o, 32 MB: too little work to "
        "hide the ramp on 132 SMs); cuBLAS 78/87/78/58%. An 8-layer chain runs at 94% of copy (cuBLAS 85%)."),
}


def _row(rows: List[dict], variant: str, rank: int, batch: int, ctx: int) -> Optional[dict]:
    return next((r for r in rows if r["variant"] == variant and r["rank"] == rank and r["batch"] == batch
                 and r["ctx"] == ctx), None)


def _ratio(rows: List[dict], rank: int, batch: int, ctx: int) -> Optional[float]:
    f, d = _row(rows, FUSED, rank, batch, ctx), _row(rows, DENSE, rank, batch, ctx)
    return None if f is None or d is None else f["ms_per_step"] / d["ms_per_step"]


def judge(decode: Dict[str, Any], switch: Optional[Dict[str, Any]], many: Optional[Dict[str, Any]],
          gemv: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    rows, ctx = decode["decode"], decode["ctx"]
    t: Dict[str, Any] = {}
    f1, d1, g1 = _row(rows, FUSED, 16, 1, ctx), _row(rows, DENSE, 16, 1, ctx), _row(rows, DENSE_GEMV, 16, 1, ctx)
    if f1 and d1:
        # "the dense model in the same runtime": the faster of cuBLAS and the library's own GEMV
        best = min((r for r in (d1, g1) if r), key=lambda r: r["ms_per_step"])
        x_floor = f1["ms_per_step"] / f1["weight_read_floor_ms"]
        x_dense = f1["ms_per_step"] / best["ms_per_step"]
        t["b1_r16_vs_floor"] = {"target": "<= 1.3x weight-read floor and <= 1.05x dense",
                                "fused_ms": f1["ms_per_step"], "dense_cublas_ms": d1["ms_per_step"],
                                "dense_kernel_gemv_ms": g1["ms_per_step"] if g1 else None,
                                "dense_compared": best["variant"], "floor_ms": f1["weight_read_floor_ms"],
                                "x_floor": x_floor, "x_dense": x_dense,
                                "x_dense_cublas": f1["ms_per_step"] / d1["ms_per_step"],
                                "reached": x_floor <= 1.3 and x_dense <= 1.05}
    b8 = {r: _ratio(rows, r, 8, ctx) for r in (16, 64)}
    if all(v is not None for v in b8.values()):
        t["b8_vs_dense"] = {"target": "<= 1.15x dense batch 8, r16 and r64", "r16": b8[16], "r64": b8[64],
                            "reached": all(v <= 1.15 for v in b8.values() if v is not None)}
    big = {f"r{r}_b{b}": _ratio(rows, r, b, ctx) for r in (16, 64) for b in (32, 64)}
    if all(v is not None for v in big.values()):
        t["b32_b64_vs_dense"] = {"target": "<= 1.3x dense at the same batch", **big,
                                 "reached": all(v <= 1.3 for v in big.values() if v is not None)}
    curve = sorted({r["batch"] for r in rows if r["rank"] == 16 and r["ctx"] == ctx and r["variant"] == FUSED})
    t["tokens_per_s_curve"] = {"target": "tokens/s over batch 1-64 (r16)", "batches": curve,
                               "fused": [_row(rows, FUSED, 16, b, ctx)["tokens_per_s"] for b in curve],  # type: ignore[index]
                               "dense": [(_row(rows, DENSE, 16, b, ctx) or {}).get("tokens_per_s") for b in curve],
                               "reached": len(curve) >= 5 and curve[0] == 1 and curve[-1] >= 64}
    if many is not None:
        cases = [{"shape": f"{c['out']}x{c['inp']}", "rank": c["rank"], "rows": c["rows"],
                  "x_dense": c["fused_us"] / c["dense_us"]} for c in many["new"] if c["rows"] > 16]
        worst = max(c["x_dense"] for c in cases)
        t["grouped_path_over_16_rows"] = {"target": "made fast enough to be used, or removed",
                                          "worst_x_dense": worst, "cases": cases, "source": "lora_many_rows.json",
                                          "reached": worst <= 1.5}
    if switch is not None:
        pct = {case: row["switch_pct_of_copy"] / 100 for case, row in switch["rows"].items()}
        main_cases = [pct[c] for c in ("r16 pristine", "r64 pristine") if c in pct]  # the decoder's mode
        t["switch_kernel"] = {"target": ">= 80% of copy bandwidth at r16 and r64, or a measured explanation",
                              "fraction_of_copy": pct, "source": "switch_bound.json",
                              "reached": bool(main_cases) and all(v >= 0.8 for v in main_cases)}
    hf = next((h for h in decode.get("hf", []) if "torch.compile" in h["variant"]), None)
    if hf and f1:
        t["transformers_static_compile"] = {"target": "AdaFuse fused beats transformers with static cache + torch.compile",
                                            "hf_ms": hf["ms_per_token"], "fused_ms": f1["ms_per_step"],
                                            "reached": f1["ms_per_step"] < hf["ms_per_token"]}
    cx = {c: (_row(rows, DENSE, 16, 1, c), _row(rows, FUSED, 16, 1, c)) for c in (2048, 8192)}
    if all(d and f for d, f in cx.values()):
        t["context_rows"] = {"target": "context 2048 and 8192 rows at batch 1", "reached": True,
                             **{f"ctx{c}": {"dense_ms": d["ms_per_step"], "fused_ms": f["ms_per_step"]}  # type: ignore[index]
                                for c, (d, f) in cx.items()}}
    if gemv is not None:  # a lever the issue names (GEMV >= 90% of bandwidth), reported beside the targets
        one = [x for x in gemv["sites"] if x["rows"] == 1]
        plain = [x for x in one if "linear_default_us" in x]  # the no-adapter GEMV is timed once per shape
        t["gemv_one_row_fraction_of_copy"] = {
            "target": "(lever) GEMV >= 90% of bandwidth at the 7B shapes, cuBLAS against the library's",
            "cublas": {x["site"]: x["floor_us"] / x["cublas_us"] for x in plain},
            "kernel_no_adapter": {x["site"]: x["floor_us"] / x["linear_default_us"] for x in plain},
            "kernel_fused": {f"{x['site']} r{x['rank']}": x["floor_fused_us"] / x["fused_default_us"] for x in one},
            "source": "gemv_sites.json", "reached": all(x["floor_us"] / x["linear_default_us"] >= 0.9 for x in plain)}
    for key, why in WHY.items():
        if key in t and not t[key]["reached"]:
            t[key]["why_not"] = why
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="folder with h200_decode.json (and switch_bound.json, lora_many_rows.json)")
    a = ap.parse_args()
    path = a.results / "h200_decode.json"
    decode = json.loads(path.read_text())
    load = lambda name: json.loads((a.results / name).read_text()) if (a.results / name).exists() else None
    decode["targets"] = judge(decode, load("switch_bound.json"), load("lora_many_rows.json"),
                                 load("gemv_sites.json"))
    path.write_text(json.dumps(decode, indent=2) + "\n")
    for key, v in decode["targets"].items():
        figures = {k: (round(x, 3) if isinstance(x, float) else x) for k, x in v.items()
                   if k not in ("target", "reached", "why_not", "cases", "fused", "dense", "cublas",
                                                                   "kernel_no_adapter", "kernel_fused")}
        print(f"{key:<28} {'REACHED' if v['reached'] else 'missed':<8} {figures}")


if __name__ == "__main__":
    main()
