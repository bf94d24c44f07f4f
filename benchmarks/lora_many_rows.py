#!/usr/bin/env python3
"""Where the time of adafuse_lora_linear's many-rows path goes, on one GPU (issue 12).

    PYTHONUNBUFFERED=1 python3 benchmarks/lora_many_rows.py --out $OUT [--baseline-src DIR]

For the Llama-2-7B projection shapes (4096x4096, 11008x4096, 4096x11008; bf16, 8 experts,
rank 16, top-2) at 17, 64, 512 and 2048 rows:
1. per-kernel device time (torch.profiler / CUPTI) of this checkout's library and, with
   --baseline-src (the top folder of another checkout), of that library too;
2. CUDA-graph replay time (median over replays of a rotation over input sets > 4x L2) of the
   fused call next to torch's dense x W^T (cuBLAS) on the same inputs (twice: the spread); the
   timed outputs are checked to be finite (correctness: tests/gpu/test_gpu_lora_linear.py).
Writes <out>/lora_many_rows.json and <out>/lora_many_rows.log.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from adafuse_export.kernels import build_library, load_kernels  # noqa: E402
from gpu_kernels import assert_finite, lora_bench_fns, lora_bench_sets, time_graph  # noqa: E402

LOG = io.StringIO()
DEV = "cuda"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")


def kernel_breakdown(fn, n=5):
    """Per-kernel device microseconds per call of fn (CUPTI through torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0.0)
        if not t:
            continue
        name = re.sub(r"^(void )?(adafuse::)?(\(anonymous namespace\)::)?", "", ev.key)
        name = re.sub(r"_GLOBAL__N__\w+::", "", name)[:90]
        out[name] = out.get(name, 0.0) + t / n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def bench(K, label, results, rows_list, gen):
    E, r, k, scale = 8, 16, 2, 2.0
    recs = []
    for (outf, inf) in SHAPES:
        for rows in rows_list:
            sets = lora_bench_sets(K, rows, outf, inf, E, r, k, gen)
            fused, dense = lora_bench_fns(K, sets, scale)

            rec = dict(lib=label, out=outf, inp=inf, rows=rows, E=E, rank=r, top_k=k, nsets=len(sets))
            x, W, A, B, ids, g, y, ws = sets[0]
            rec["dense_us"] = 1e3 * time_graph(dense)[0] / len(sets)
            rec["fused_us"] = 1e3 * time_graph(fused)[0] / len(sets)
            assert_finite(f"lora_linear {outf}x{inf} rows {rows}", sets)
            rec["fused_repeat_us"] = 1e3 * time_graph(fused)[0] / len(sets)
            rec["kernels_us"] = kernel_breakdown(lambda: K.lora_linear(x, W, A, B, ids, g, scale, out=y, workspace=ws))
            rec["fused_over_dense"] = rec["fused_us"] / rec["dense_us"]
            log("  %-8s %5dx%-5d rows %-5d dense %8.2f us  fused %8.2f us (repeat %8.2f)  %.2fx" % (
                label, outf, inf, rows, rec["dense_us"], rec["fused_us"], rec["fused_repeat_us"],
                rec["fused_over_dense"]))
            log("      per kernel (us/call; a programmatic dependent launch counts from its early start): "
                + ", ".join("%s %.1f" % (n[:60], t) for n, t in rec["kernels_us"].items()))
            recs.append(rec)
            del sets, fused, dense, x, W, A, B, ids, g, y, ws
            torch.cuda.empty_cache()
    results[label] = recs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--baseline-src", default=None, help="the top folder of a baseline checkout")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    gen = torch.Generator(device=DEV).manual_seed(5)
    rows_list = [17, 64, 512, 2048]
    if args.baseline_src:
        os.environ["ADAFUSE_SOURCE_DIR"] = args.baseline_src
        base = load_kernels(build_library())
        os.environ.pop("ADAFUSE_SOURCE_DIR")
        log(f"baseline library from {args.baseline_src}")
        bench(base, "baseline", results, [512], gen)
    K = load_kernels(build_library())
    bench(K, "new", results, rows_list, gen)
    (out / "lora_many_rows.json").write_text(json.dumps(results, indent=1))
    log("\n==== many-rows lora_linear, bf16 E8 r16 top-2: fused / cuBLAS dense ====")
    for rec in results["new"]:
        b = [x for x in results.get("baseline", []) if (x["out"], x["inp"], x["rows"]) == (rec["out"], rec["inp"], rec["rows"])]
        log("%5dx%-5d rows %-5d dense %7.2f us  fused %7.2f us (%.2fx)%s" % (
            rec["out"], rec["inp"], rec["rows"], rec["dense_us"], rec["fused_us"], rec["fused_over_dense"],
            ("  baseline %.2f us (%.1fx)" % (b[0]["fused_us"], b[0]["fused_over_dense"])) if b else ""))
    (out / "lora_many_rows.log").write_text(LOG.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
