"""Where the native backend's time goes: GPU time per kernel of a decode step at each batch (and of a prompt's prefill),
from the CUDA profiler (torch.profiler over CUPTI, which sees the runtime library's kernels and the nodes of its CUDA
graphs), on the Llama-2-7B width with h200_decode.py's synthetic adapters (8 experts top-2 r16, bf16).

  ADAFUSE_RUNTIME_LIB=<runtime/tools/build_on_gpu.sh's output> PYTHONPATH=. python3 benchmarks/profile_native.py \
      --out $OUT [--layers 8] [--batches 1,8,32,64] [--ctx 512] [--prefill 512] [--dense]

Per batch: the median step's GPU time, split by kernel name (ms per step and share), so a step's cost can be read
as "attention x%, GEMV y%". Fewer layers than 32 keep the artifact small; per-layer kernels scale with the layer
count, the embedding and lm_head do not. Prints tables and writes OUT/profile_native.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from adafuse_export import native_artifact as native  # noqa: E402
from adafuse_export.runners.cpp_runtime import Engine, open_native  # noqa: E402
from h200_decode import synthetic_checkpoint  # noqa: E402


def log(*a):
    print(*a, flush=True)


def kernel_times(fn) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of every kernel fn() leaves in the CUDA profiler's trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(str(Path(d) / "trace.json"))
        trace = json.loads((Path(d) / "trace.json").read_text())
    return sorted(((e["name"], e["ts"], e.get("dur", 0.0)) for e in trace.get("traceEvents", [])
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                  key=lambda k: k[1])


def short(name: str) -> str:
    """A kernel's name without its template arguments and parameter list."""
    name = name.replace("(anonymous namespace)::", "").split("(")[0]
    depth, out = 0, []
    for ch in name:
        depth += ch == "<"
        if depth == 0:
            out.append(ch)
        depth -= ch == ">"
    return "".join(out).replace("void ", "").strip()


def breakdown(events: list[tuple[str, float, float]], steps: int) -> dict:
    """GPU ms per step by kernel name, from `steps` steps separated by host pauses (one activity cluster each)."""
    clusters: list[list[tuple[str, float, float]]] = []
    for ev in events:
        if clusters and ev[1] - (clusters[-1][-1][1] + clusters[-1][-1][2]) < 1000:  # < 1 ms apart: the same step
            clusters[-1].append(ev)
        else:
            clusters.append([ev])
    clusters = clusters[-steps:]
    spans = sorted((c[-1][1] + c[-1][2] - c[0][1]) / 1e3 for c in clusters)
    per: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for c in clusters:
        for name, _, dur in c:
            per[short(name)] += dur / 1e3 / len(clusters)
            calls[short(name)] += 1
    busy = sum(per.values())
    rows = sorted(({"kernel": k, "ms": v, "share": v / busy, "calls_per_step": calls[k] / len(clusters)}
                   for k, v in per.items()), key=lambda r: -r["ms"])
    return {"span_ms_median": spans[len(spans) // 2], "busy_ms": busy, "steps": len(clusters), "kernels": rows}


def profile_decode(engine: Engine, batch: int, ctx: int, steps: int) -> dict:
    engine.prefill(np.random.default_rng(3).integers(0, engine.vocab, (batch, ctx)))
    out = np.empty((batch, engine.vocab), np.float32)
    gen = np.random.default_rng(4)

    def run(n):
        for _ in range(n):
            time.sleep(0.003)
            engine.decode(gen.integers(0, engine.vocab, batch), out)
    run(3)  # CUDA graph capture of this row count
    return breakdown(kernel_times(lambda: run(steps)), steps)


def profile_prefill(engine: Engine, tokens: int, repeats: int) -> dict:
    prompt = np.random.default_rng(9).integers(0, engine.vocab, tokens).tolist()

    def run(n):
        for _ in range(n):
            time.sleep(0.003)
            engine.step([(0, 0, prompt)])
    run(1)
    return breakdown(kernel_times(lambda: run(repeats)), repeats)


def table(title: str, b: dict, top: int = 14) -> None:
    log(f"\n{title}: GPU span {b['span_ms_median']:.2f} ms/step (kernels busy {b['busy_ms']:.2f} ms)")
    log(f"  {'kernel':<60} {'ms/step':>8} {'share':>6} {'calls':>6}")
    for r in b["kernels"][:top]:
        log(f"  {r['kernel'][:60]:<60} {r['ms']:8.3f} {r['share']:6.1%} {r['calls_per_step']:6.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the 7B shape [8]")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the profiled prefill (0: none)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dense", action="store_true", help="also profile the dense base (no adapters)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",") if b]
    ckpt = synthetic_checkpoint(args.layers)
    work = Path(tempfile.mkdtemp(prefix="adafuse-profile-", dir=args.work))
    results: dict = {"layers": args.layers, "ctx": args.ctx, "decode": {}, "prefill": {}}
    try:
        variants = [("fused", ckpt)] + ([("dense", ckpt.base_only())] if args.dense else [])
        for name, source in variants:
            art = work / f"{name}.native"
            art.mkdir()
            native.write_artifact(source, art, "bfloat16", max_batch=max(batches),
                                  max_seq=max(args.ctx + args.steps + 8, args.prefill))
            with open_native(art, "fused") as engine:
                import torch
                results["device"] = torch.cuda.get_device_name()
                for batch in batches:
                    b = profile_decode(engine, batch, args.ctx, args.steps)
                    results["decode"][f"{name} b{batch}"] = b
                    table(f"decode {name} batch {batch} ctx {args.ctx} ({args.layers} layers)", b)
                if args.prefill and name == "fused":
                    b = profile_prefill(engine, args.prefill, 3)
                    results["prefill"][f"{name} {args.prefill}"] = b
                    table(f"prefill {name} {args.prefill} tokens ({args.layers} layers)", b)
            shutil.rmtree(art)
            (args.out / "profile_native.json").write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
