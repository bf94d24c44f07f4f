"""Where a Llama-2-7B-shaped decode step spends its GPU time (dense and fused), by kernel.

  PYTHONPATH=. python3 benchmarks/profile_decode_step.py --out $OUT

Runs a few eager decode steps under torch.profiler (kernel durations do not depend on launch
overhead) and prints each kernel family's share, next to the graph-replayed step time; once with
the work between the projections in PyTorch ops ("torch step ops", the decoder before the
decode-step kernels) and once with the kernel library's add_rms_norm / rope_kv_write /
decode_attention / silu_mul ("step kernels").
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from h200_decode import random_7b, time_decoder, tokens_with_changing_routes  # noqa: E402

from adafuse_export.kernels.binding import load_kernels  # noqa: E402
from adafuse_export.runners.torch_cuda import GpuDecoder, KernelOps  # noqa: E402


def profile(dec: GpuDecoder, feed: list[int], steps: int = 4) -> dict:
    dec.prefill(torch.randint(0, dec.m.vocab_size, (1, 512), device="cuda"))
    for tok in feed[:2]:
        dec.decode(torch.tensor([[tok]], device="cuda"), use_graph=False)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for tok in feed[2:2 + steps]:
            dec.decode(torch.tensor([[tok]], device="cuda"), use_graph=False)
        torch.cuda.synchronize()
    by_name = collections.Counter()
    counts = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_name[e.name[:90]] += e.device_time_total / steps
            counts[e.name[:90]] += 1 / steps
    total = sum(by_name.values())
    return {"gpu_us_per_step": total, "kernels_per_step": sum(counts.values()),
            "top": [(n, us, counts[n]) for n, us in by_name.most_common(25)]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    lib = load_kernels(archs=["90"])
    spec, adapter, w, routes, _ = random_7b(16, 8, 2)
    feed = tokens_with_changing_routes(routes, 40)
    out = {}
    configs = [(st, sk, False) for st, sk in itertools.product(("dense", "fused"), (False, True))]
    configs.insert(2, ("dense", True, True))  # the dense model through the library's GEMV instead of cuBLAS
    for strategy, step_kernels, dense_gemv in configs:
        ops = KernelOps(lib, step_kernels=step_kernels, dense_gemv=dense_gemv)
        make = lambda: GpuDecoder(spec, adapter if strategy != "dense" else None, w, routes if strategy != "dense" else None,
                                  strategy=strategy, max_seq=640, ops=ops)
        graph_ms = time_decoder(make(), 1, 512, 20, feed, True)
        prof = profile(make(), feed)
        prof["graph_ms_per_step"] = graph_ms
        key = f"{strategy}, {'step kernels' if step_kernels else 'torch step ops'}" + (", kernel GEMV" if dense_gemv else "")
        out[key] = prof
        print(f"\n== {key}: graph replay {graph_ms:.2f} ms/step; GPU kernel time {prof['gpu_us_per_step'] / 1e3:.2f} ms/step "
              f"in {prof['kernels_per_step']:.0f} kernels")
        for name, us, n in prof["top"][:12]:
            print(f"{us / 1e3:8.3f} ms  x{n:5.0f}  {name}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "profile_decode_step.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
