#!/usr/bin/env python3
"""FP8 (e4m3) base weights against bf16 in the fused GEMV, at the Llama-2-7B decoder's site shapes.

    PYTHONUNBUFFERED=1 python3 benchmarks/fp8_gemv.py --out $OUT

Per site (gemv_sites.SITES: qkv 12288x4096, o 4096x4096, gate_up 22016x4096, down 4096x11008; the
stacked sites' B block-diagonal, rank = members x r) and row count (1, 8), side by side in one run:
  bf16   adafuse_lora_linear, W bfloat16
  fp8    adafuse_lora_linear, W float8_e4m3fn with per-output-channel scales (adafuse_export.quantize)
each fused (E=8, top-2, r per --ranks) and without adapter (the dense projection through the same
kernels). Same inputs for both (W quantized from the bf16 W's values), workspaces kept per weight set
(exclusive, as the GPU decoder's). Timing: CUDA graph of a rotation over weight sets >= 4x L2 (sized
for the bf16 weights, so the FP8 rotation is >= 2x L2), median of 30 replays, each variant timed twice
(the spread). GB/s: the bytes a call must read (W at its storage size, the scales, the touched
experts' A and B, x, y) against a device-to-device copy measured in the same run. A timed output is
checked only to be finite and close to the bf16 result of the same call (tests/gpu judges correctness).
With --shapes, first the one-row kernel shapes side by side (adafuse_lora_options.gemv1), bf16
and FP8, fused and without adapter: the measurement behind the library's AUTO shape.
Writes <out>/fp8_gemv.json and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from adafuse_export.kernels import build_library, load_kernels  # noqa: E402
from adafuse_export.quantize import quantize_fp8_per_channel  # noqa: E402
from gemv_sites import SITES, add_workspaces, make_sets  # noqa: E402
from gpu_kernels import copy_bandwidth, time_graph  # noqa: E402

DEV = "cuda"
E, TOP_K, SCALE = 8, 2, 2.0
LAYERS_7B = 32  # the four sites once per layer: a decode step's projections (no LM head, no attention)


def log(*a):
    print(*a, flush=True)


def call(K, st, weight: str, adapter: bool, gemv1: str = "auto"):
    """One adafuse_lora_linear call of a weight set, with W in bf16 or FP8 (one row: the kernel shape gemv1)."""
    W, ws = (st["Wq"], st["Ws"]) if weight == "fp8" else (st["W"], None)
    if adapter:
        K.lora_linear(st["x"], W, st["A"], st["B"], st["ids"], st["g"], SCALE, out=st["y"], workspace=st["ws"],
                      exclusive_workspace=True, weight_scale=ws, gemv1=gemv1)
    else:
        K.linear(st["x"], W, out=st["y"], workspace=st["ws"], weight_scale=ws, gemv1=gemv1)


def check(K, sets, adapter: bool) -> float:
    """Relative difference of the FP8 call's output from the bf16 call's on the first set (the
    quantization error plus rounding: about 2-4% for e4m3 per-channel on Gaussian weights)."""
    st = sets[0]
    call(K, st, "bf16", adapter)
    ref = st["y"].double().clone()
    st["y"].fill_(float("nan"))
    call(K, st, "fp8", adapter)
    torch.cuda.synchronize()
    got = st["y"].double()
    assert bool(torch.isfinite(got).all()), "an FP8 output holds NaN/inf"
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))


def bench(K, bw, ranks):
    gen = torch.Generator(device=DEV).manual_seed(23)
    L2 = torch.cuda.get_device_properties(0).L2_cache_size
    recs = []
    for name, (outf, inf, members) in SITES.items():
        for r in ranks:
            R = members * r
            for rows in (1, 8):
                nsets = max(2, math.ceil(4 * L2 / (outf * inf * 2)))
                sets = add_workspaces(K, make_sets(outf, inf, R, rows, nsets, gen), E, TOP_K)
                for st in sets:
                    st["Wq"], st["Ws"] = quantize_fp8_per_channel(st["W"], f"{name} W")
                touched = min(E, rows * TOP_K)
                io_bytes = rows * (inf + outf) * 2
                lora_bytes = touched * R * (inf + outf) * 2
                for adapter in (True, False):
                    rec = dict(site=name, out=outf, inp=inf, r=r, rank=R if adapter else 0, rows=rows, nsets=nsets,
                               adapter=adapter, fp8_rel_diff=check(K, sets, adapter))
                    for weight, w_bytes in (("bf16", outf * inf * 2), ("fp8", outf * inf + outf * 4)):
                        def run(weight=weight):
                            for st in sets:
                                call(K, st, weight, adapter)
                        t1, _ = time_graph(run)
                        t2, _ = time_graph(run)
                        nbytes = w_bytes + io_bytes + (lora_bytes if adapter else 0)
                        us = 1e3 * t1 / nsets
                        rec[f"{weight}_us"] = us
                        rec[f"{weight}_repeat_us"] = 1e3 * t2 / nsets  # the same graph again: the spread
                        rec[f"{weight}_bytes"] = nbytes
                        rec[f"{weight}_GBps"] = nbytes / (us * 1e-6) / 1e9
                        rec[f"{weight}_frac_of_copy"] = nbytes / (us * 1e-6) / bw
                        rec[f"{weight}_floor_us"] = 1e6 * nbytes / bw
                    rec["fp8_over_bf16"] = rec["fp8_us"] / rec["bf16_us"]
                    recs.append(rec)
                    log("  %-7s r%-3d rows %d %-7s bf16 %7.2f us (%5.0f GB/s)  fp8 %7.2f us (%5.0f GB/s)  fp8/bf16 %.3f"
                        "  rel diff %.3f" % (name, rec["rank"], rows, "fused" if adapter else "linear", rec["bf16_us"],
                                             rec["bf16_GBps"], rec["fp8_us"], rec["fp8_GBps"], rec["fp8_over_bf16"],
                                             rec["fp8_rel_diff"]))
                del sets
                torch.cuda.empty_cache()
    return recs


def sweep_shapes(K, bw, shapes, r=16):
    """One row, per site: every one-row kernel shape in `shapes`, bf16 and FP8 W, fused (r) and without adapter,
    side by side in one run (the fraction of copy each reaches), for choosing the library's AUTO shape."""
    gen = torch.Generator(device=DEV).manual_seed(29)
    L2 = torch.cuda.get_device_properties(0).L2_cache_size
    recs = []
    for name, (outf, inf, members) in SITES.items():
        nsets = max(2, math.ceil(4 * L2 / (outf * inf * 2)))
        sets = add_workspaces(K, make_sets(outf, inf, members * r, 1, nsets, gen), E, TOP_K)
        for st in sets:
            st["Wq"], st["Ws"] = quantize_fp8_per_channel(st["W"], f"{name} W")
        lora_bytes = TOP_K * members * r * (inf + outf) * 2
        for adapter in (True, False):
            for weight, w_bytes in (("bf16", outf * inf * 2), ("fp8", outf * inf + outf * 4)):
                nbytes = w_bytes + (inf + outf) * 2 + (lora_bytes if adapter else 0)
                row = dict(site=name, weight=weight, adapter=adapter, floor_us=1e6 * nbytes / bw)
                for shape in shapes:
                    def run(shape=shape, weight=weight, adapter=adapter):
                        for st in sets:
                            call(K, st, weight, adapter, shape)
                    us = min(time_graph(run)[0], time_graph(run)[0]) * 1e3 / nsets
                    row[shape] = {"us": us, "frac_of_copy": row["floor_us"] / us}
                recs.append(row)
                log("  %-7s %-4s %-6s " % (name, weight, "fused" if adapter else "linear")
                    + "  ".join(f"{sh} {100 * row[sh]['frac_of_copy']:3.0f}%" for sh in shapes))
        del sets
        torch.cuda.empty_cache()
    return recs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ranks", default="16,64", help="comma list of per-member ranks r (site rank = members x r)")
    ap.add_argument("--shapes", default="",
                    help="also: one row, r16, these one-row kernel shapes side by side (comma list of "
                         "Kernels.lora_linear's gemv1 names, e.g. auto,u4n1,u8n1,u4n2,u4k2)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    maj, mnr = torch.cuda.get_device_capability()
    K = load_kernels(build_library([f"{maj}{mnr}"]))
    bw = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name(0), "copy_GBps": bw / 1e9, "E": E, "top_k": TOP_K}
    log(f"{results['device']}: device-to-device copy {bw / 1e9:.0f} GB/s (read + write)")
    if args.shapes:
        log("one row, r16, fraction of copy per kernel shape:")
        results["one_row_shapes"] = sweep_shapes(K, bw, [sh for sh in args.shapes.split(",") if sh])
    results["sites"] = bench(K, bw, [int(r) for r in args.ranks.split(",") if r])
    # the projections of a 7B decode step: every site once per layer, per (rank, rows, adapter)
    steps = {}
    for r in results["sites"]:
        key = (r["r"], r["rows"], r["adapter"])
        acc = steps.setdefault(key, {"r": key[0], "rows": key[1], "adapter": key[2], "bf16_ms": 0.0, "fp8_ms": 0.0,
                                     "sites": 0})
        acc["bf16_ms"] += LAYERS_7B * r["bf16_us"] / 1e3
        acc["fp8_ms"] += LAYERS_7B * r["fp8_us"] / 1e3
        acc["sites"] += 1
    results["step_projections"] = [dict(v, fp8_over_bf16=v["fp8_ms"] / v["bf16_ms"]) for v in steps.values()
                                   if v["sites"] == len(SITES)]
    (out / "fp8_gemv.json").write_text(json.dumps(results, indent=1))
    log("\n%-7s %4s %4s %-6s | %9s %9s | %7s %7s | %8s %8s | %7s" % (
        "site", "rank", "rows", "kind", "bf16 us", "fp8 us", "bf16 %", "fp8 %", "bf16 flr", "fp8 flr", "fp8/bf16"))
    for r in results["sites"]:
        log("%-7s %4d %4d %-6s | %9.2f %9.2f | %6.0f%% %6.0f%% | %8.2f %8.2f | %7.3f" % (
            r["site"], r["rank"], r["rows"], "fused" if r["adapter"] else "linear", r["bf16_us"], r["fp8_us"],
            100 * r["bf16_frac_of_copy"], 100 * r["fp8_frac_of_copy"], r["bf16_floor_us"], r["fp8_floor_us"],
            r["fp8_over_bf16"]))
    log(f"\n7B decode step, the projections alone ({LAYERS_7B} layers x the four sites, per-site medians summed):")
    for st in results["step_projections"]:
        log("  r%-3d rows %d %-6s bf16 %6.3f ms  fp8 %6.3f ms  fp8/bf16 %.3f" % (
            st["r"], st["rows"], "fused" if st["adapter"] else "linear", st["bf16_ms"], st["fp8_ms"], st["fp8_over_bf16"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
