#!/usr/bin/env python3
"""Few-rows GEMV at the Llama-2-7B decoder's site shapes: cuBLAS against the library's kernels.

    PYTHONUNBUFFERED=1 python3 benchmarks/gemv_sites.py --out $OUT

The GPU decoder stacks q/k/v and gate/up into one site each, so a decode step runs four GEMVs per
layer: qkv 12288x4096, o 4096x4096, gate_up 22016x4096, down 4096x11008 (B block-diagonal over the
stacked members, rank = members x r). Per shape and row count (1, 8), side by side in one run:
  cublas      torch x @ W.T (what the `dense` strategy runs)
  linear      adafuse_lora_linear without adapter (A = B = NULL), per one-row kernel shape
  fused       adafuse_lora_linear with E=8, top-2 routes (a different route per row at 8 rows)
and a layer chain (qkv -> o -> gate_up -> down, each input a slice of the previous output, as many
layers as fill 4x L2) that shows how consecutive launches overlap (PDL) - cuBLAS, linear, fused.
The fused calls keep a workspace per weight set (exclusive, as the GPU decoder's), so the one-row shrink
launches early as it does there; kernel shapes and PDL are passed as Kernels.lora_linear's options.
Timing: CUDA graph of a rotation over weight sets >= 4x L2, median of 30 replays. GB/s counts the
bytes each call must read (W, the touched experts' A and B, x, y) against a device-to-device copy
measured in the same run. Writes <out>/gemv_sites.json.
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
from gpu_kernels import GEMV1_VARIANTS, copy_bandwidth, time_graph  # noqa: E402

DEV = "cuda"
SITES = {"qkv": (12288, 4096, 3), "o": (4096, 4096, 1), "gate_up": (22016, 4096, 2), "down": (4096, 11008, 1)}


def log(*a):
    print(*a, flush=True)


def make_sets(outf, inf, R, rows, nsets, gen, dt=torch.bfloat16, E=8, k=2):
    sets = []
    for _ in range(nsets):
        W = (torch.randn(outf, inf, device=DEV, generator=gen) / 64).to(dt)
        A = (torch.randn(E, R, inf, device=DEV, generator=gen) / 64).to(dt)
        B = (torch.randn(E, outf, R, device=DEV, generator=gen) / 8).to(dt)
        x = torch.randn(rows, inf, device=DEV, generator=gen).to(dt)
        ids = torch.stack([torch.randperm(E, device=DEV, generator=gen)[:k] for _ in range(rows)]).int()
        g = torch.softmax(torch.randn(rows, k, device=DEV, generator=gen), 1).float()
        sets.append(dict(W=W, A=A, B=B, x=x, ids=ids, g=g, y=torch.empty(rows, outf, device=DEV, dtype=dt)))
    return sets


def add_workspaces(K, sets, E=8, k=2):
    """A workspace per weight set (its own, reused by every call: exclusive)."""
    for st in sets:
        rows, inf = st["x"].shape
        st["ws"] = torch.empty(K.lora_linear_workspace_size(rows, inf, st["W"].shape[0], E, st["A"].shape[1], k),
                               dtype=torch.uint8, device=DEV)
    return sets


def bench_sites(K, bw, rs, variants):
    gen = torch.Generator(device=DEV).manual_seed(11)
    L2 = torch.cuda.get_device_properties(0).L2_cache_size
    recs = []
    for name, (outf, inf, members) in SITES.items():
        for r in rs:
            R = members * r
            for rows in (1, 8):
                E, k = 8, 2
                touched = min(E, rows * k)
                w_bytes = outf * inf * 2
                nsets = max(2, math.ceil(4 * L2 / w_bytes))
                sets = add_workspaces(K, make_sets(outf, inf, R, rows, nsets, gen))
                io = rows * (inf + outf) * 2
                lora_bytes = touched * R * (inf + outf) * 2

                def cublas():
                    for s in sets:
                        torch.matmul(s["x"], s["W"].T, out=s["y"])

                def linear(shape):
                    def run():
                        for s in sets:
                            K.linear(s["x"], s["W"], out=s["y"], gemv1=shape)
                    return run

                def fused(shape):
                    def run():
                        for s in sets:
                            K.lora_linear(s["x"], s["W"], s["A"], s["B"], s["ids"], s["g"], 1.0, out=s["y"],
                                          workspace=s["ws"], exclusive_workspace=True, gemv1=shape)
                    return run

                rec = dict(site=name, out=outf, inp=inf, rank=r, stacked_rank=R, rows=rows, nsets=nsets,
                           floor_us=(w_bytes + io) / bw * 1e6,
                           floor_fused_us=(w_bytes + io + lora_bytes) / bw * 1e6)
                rec["cublas_us"] = time_graph(cublas)[0] * 1e3 / nsets
                for v in (variants if rows == 1 else ["auto"]):
                    tag = "default" if v == "auto" else v
                    if r == rs[0]:  # the no-adapter kernel does not depend on the rank
                        rec[f"linear_{tag}_us"] = time_graph(linear(v))[0] * 1e3 / nsets
                    rec[f"fused_{tag}_us"] = time_graph(fused(v))[0] * 1e3 / nsets
                best_lin = min((v, k_) for k_, v in rec.items() if k_.startswith("linear_")) if r == rs[0] else None
                best_fus = min((v, k_) for k_, v in rec.items() if k_.startswith("fused_"))
                rec["cublas_frac_of_copy"] = rec["floor_us"] / rec["cublas_us"]
                if best_lin:
                    rec["best_linear"] = best_lin[1]
                    rec["best_linear_frac_of_copy"] = rec["floor_us"] / best_lin[0]
                rec["best_fused"] = best_fus[1]
                rec["best_fused_frac_of_copy"] = rec["floor_fused_us"] / best_fus[0]
                rec["best_fused_over_cublas"] = best_fus[0] / rec["cublas_us"]
                recs.append(rec)
                log(f"{name:8s} r{r:<3d} rows {rows}: cublas {rec['cublas_us']:7.2f} us ({100 * rec['cublas_frac_of_copy']:.0f}%)"
                    + (f" | linear best {best_lin[0]:7.2f} ({100 * rec['best_linear_frac_of_copy']:.0f}%, {best_lin[1]})" if best_lin else "")
                    + f" | fused best {best_fus[0]:7.2f} ({100 * rec['best_fused_frac_of_copy']:.0f}% of its floor, {best_fus[1]})")
                log("    " + "  ".join(f"{k_[:-3]}={v:.2f}" for k_, v in rec.items()
                                       if k_.endswith("_us") and (k_.startswith("linear_") or k_.startswith("fused_"))))
                del sets
                torch.cuda.empty_cache()
    return recs


def bench_chain(K, bw, rs):
    """One row through qkv -> o -> gate_up -> down per layer (input = a slice of the previous output)."""
    gen = torch.Generator(device=DEV).manual_seed(12)
    L2 = torch.cuda.get_device_properties(0).L2_cache_size
    layer_bytes = sum(o * i * 2 for o, i, _ in SITES.values())
    nlayers = max(8, math.ceil(4 * L2 / layer_bytes))
    out = {"layers": nlayers, "floor_us": nlayers * layer_bytes / bw * 1e6}
    for r in rs:
        layers = [{name: add_workspaces(K, make_sets(o, i, m * r, 1, 1, gen))[0] for name, (o, i, m) in SITES.items()}
                  for _ in range(nlayers)]
        x0 = torch.randn(1, 4096, device=DEV, generator=gen).to(torch.bfloat16)

        def chain(call, pdl):
            def run():
                h = x0
                for lay in layers:
                    for name, (o, i, _) in SITES.items():
                        s = lay[name]
                        call(h[:, :i], s, pdl)
                        h = s["y"]
            return run

        variants = {
            "cublas": lambda h, s, pdl: torch.matmul(h, s["W"].T, out=s["y"]),
            "linear": lambda h, s, pdl: K.linear(h, s["W"], out=s["y"], pdl=pdl),
            "fused": lambda h, s, pdl: K.lora_linear(h, s["W"], s["A"], s["B"], s["ids"], s["g"], 1.0, out=s["y"],
                                                     workspace=s["ws"], exclusive_workspace=True, pdl=pdl),
        }
        for vname, call in variants.items():
            if vname != "fused" and r != rs[0]:
                continue
            for pdl in ("1", "0") if vname != "cublas" else ("1",):
                us = time_graph(chain(call, pdl == "1"))[0] * 1e3
                key = f"{vname}_r{r}" + ("" if vname == "cublas" else f"_pdl{pdl}")
                out[key + "_us"] = us
                log(f"chain {key}: {us:8.1f} us for {nlayers} layers = {us / nlayers:6.2f} us/layer, "
                    f"{100 * out['floor_us'] / us:.0f}% of copy bandwidth")
        del layers
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--variants", default=",".join(GEMV1_VARIANTS),
                    help="one-row GEMV shapes (Kernels.lora_linear's gemv1; 'auto' = the library's choice)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    K = load_kernels(build_library())
    bw = copy_bandwidth()
    rs = [int(r) for r in args.ranks.split(",")]
    variants = args.variants.split(",")
    log(f"{torch.cuda.get_device_name(0)}: copy {bw / 1e12:.2f} TB/s (read + write)")
    res = {"device": torch.cuda.get_device_name(0), "copy_TBps": bw / 1e12}
    res["sites"] = bench_sites(K, bw, rs, variants)
    (out / "gemv_sites.json").write_text(json.dumps(res, indent=1))
    res["chain"] = bench_chain(K, bw, rs)
    (out / "gemv_sites.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
