#!/usr/bin/env python3
"""Build and time the AdaFuse fused adapter kernels on one GPU.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_kernels.py --out $OUT

1. builds libadafuse_kernels.so for this GPU (nvcc, via adafuse_export.kernels.build);
2. times (CUDA graphs of a rotation over input sets larger than L2, CUDA
   events, median of >= 20 replays) the fused linear vs torch dense W x vs torch
   unmerged LoRA for Llama-2-7B-shaped layers, and the switch over the 224
   sites of a 7B model vs a measured device-to-device copy;
3. measures the drift of 10,000 in-place bf16 switches vs pristine mode.
The kernels' correctness is tests/gpu (`python3 -m pytest -m gpu tests/gpu`); a timed result is
only checked to be finite here. What stays checked here are the non-default variants the kernel
options choose (adafuse_lora_options.gemv1's one-row shapes, PDL off and the exclusive-workspace
chain) and the switch's kernel sequences of the -DADAFUSE_DIAGNOSTICS benchmark build.
Writes <out>/gpu_kernels.json and <out>/gpu_kernels.log.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adafuse_export.kernels import build_library, load_kernels  # noqa: E402
from adafuse_export.kernels.binding import DIAGNOSTICS_FLAG, GEMV1_SHAPES  # noqa: E402
from adafuse_export.kernels.binding import capture_graph as capture_cuda_graph  # noqa: E402

LOG = io.StringIO()


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")


DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-2}
DEV = "cuda"


def rel_err(out, ref):
    out = out.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-300)).item()


def rand_route(rows, top_k, E, gen, allow_invalid=False):
    if top_k <= E:
        ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(rows)])
    else:
        ids = torch.randint(0, E, (rows, top_k), generator=gen)
    if allow_invalid and rows > 0:
        ids[0, -1] = -1
    g = torch.rand(rows, top_k, generator=gen) + 0.1
    g = g / g.sum(1, keepdim=True)
    return ids.to(torch.int32).to(DEV), g.float().to(DEV)


def lora_ref(x, W, bias, A, B, ids, g, scale):
    xd, Wd = x.double(), W.double()
    y = xd @ Wd.T
    if bias is not None:
        y += bias.double()
    Ad, Bd = A.double(), B.double()
    ids_c, g_c = ids.long(), g.double()
    for j in range(ids.shape[1]):
        for e in torch.unique(ids_c[:, j]).tolist():
            if e < 0 or e >= A.shape[0]:
                continue
            n = (ids_c[:, j] == e).nonzero().squeeze(1)
            t = xd[n] @ Ad[e].T
            y[n] += scale * g_c[n, j, None] * (t @ Bd[e].T)
    return y


# ---------------------------------------------------------------------------
def check_lora(K, results):
    """The one-row kernel shapes chosen by the gemv1 option (A/B variants; the default shape is tests/gpu's),
    on every one-row case of the sweep below."""
    gen = torch.Generator().manual_seed(1234)
    gg = torch.Generator(device=DEV).manual_seed(4321)
    shapes = [(1, 1), (7, 37), (37, 7), (4095, 4096), (4096, 4095), (4096, 4096), (11008, 4096)]
    rows_list = [1, 3, 8, 12, 16, 17, 64, 512]
    # the 7B decoder's stacked sites (qkv, gate_up, down: in, out) at decode row counts
    site_cases = [dict(dtype="bf16", in_f=i, out_f=o, rows=n, rank=r, E=8, top_k=2, bias=False, misalign=False,
                       invalid=False) for (i, o) in [(4096, 12288), (4096, 22016), (11008, 4096)]
                  for n in (1, 8) for r in (48, 192)]
    ranks = [1, 3, 16, 64, 128]
    experts = [1, 8, 64]
    cases = []
    c = 0
    for dname in ["fp32", "bf16", "fp16"]:
        for (inf, outf) in shapes:
            for rows in rows_list:
                r = ranks[c % len(ranks)]
                E = experts[(c // 2) % len(experts)]
                k = 1 + (c % 4)
                if inf * outf > 4096 * 4096 and rows == 512 and dname == "fp32":
                    c += 1
                    continue
                cases.append(dict(dtype=dname, in_f=inf, out_f=outf, rows=rows, rank=r, E=E,
                                  top_k=k, bias=(c % 3 != 0), misalign=(c % 7 == 3),
                                  invalid=(c % 11 == 5)))
                c += 1
    # full coverage of the rank / experts / top_k lists on a mid-size odd shape
    for dname in ["bf16", "fp32"]:
        for r in ranks:
            for E in experts:
                for k in range(1, 5):
                    cases.append(dict(dtype=dname, in_f=37 if k % 2 else 4095, out_f=129, rows=[1, 8, 64][k % 3],
                                      rank=r, E=E, top_k=k, bias=True, misalign=False, invalid=False))
    # many rows at a prefill chunk's size, and the E / rank limits (E*rank up to 1M extra K columns)
    for dname in ["bf16", "fp16", "fp32"]:
        cases.append(dict(dtype=dname, in_f=4096, out_f=4095, rows=2048, rank=16, E=8, top_k=2,
                          bias=True, misalign=False, invalid=True))
    for dname in ["bf16", "fp32"]:
        for (E, r, rows) in [(256, 8, 17), (256, 4096, 17), (2, 4096, 64), (256, 1, 64)]:
            cases.append(dict(dtype=dname, in_f=37, out_f=129, rows=rows, rank=r, E=E, top_k=8,
                              bias=True, misalign=False, invalid=False))
    cases += site_cases
    for i, cs in enumerate(cases):  # every 5th few-rows case without adapter (A = B = None: y = x W^T + bias)
        cs["adapter"] = i % 5 != 2 or cs["rows"] > 16
    # the one-row kernel's shapes (adafuse_lora_options.gemv1), each on every one-row case
    cases = [dict(cs, gemv1=v) for cs in list(cases) if cs["rows"] == 1 for v in GEMV1_VARIANTS[1:]]
    n_fail = 0
    for cs in cases:
        dt = DT[cs["dtype"]]
        rows, inf, outf, r, E, k = cs["rows"], cs["in_f"], cs["out_f"], cs["rank"], cs["E"], cs["top_k"]
        x = torch.randn(rows * inf + (1 if cs["misalign"] else 0), generator=gen)
        x = x[1:] if cs["misalign"] else x
        x = x.view(rows, inf).to(DEV, dt)
        if cs["misalign"]:  # keep a misaligned view: copy into an offset buffer
            buf = torch.empty(rows * inf + 1, dtype=dt, device=DEV)
            buf[1:].copy_(x.reshape(-1))
            x = buf[1:].view(rows, inf)
        W = (torch.randn(outf, inf, generator=gg, device=DEV) / math.sqrt(inf)).to(dt)
        A = (torch.randn(E, r, inf, generator=gg, device=DEV) / math.sqrt(inf)).to(dt)
        B = (torch.randn(E, outf, r, generator=gg, device=DEV) / math.sqrt(r)).to(dt)
        bias = torch.randn(outf, generator=gg, device=DEV).to(dt) if cs["bias"] else None
        ids, g = rand_route(rows, k, E, gen, allow_invalid=cs["invalid"])
        scale = 1.5
        y = torch.full((rows, outf), float("nan"), dtype=dt, device=DEV)
        ws_n = K.lora_linear_workspace_size(rows, inf, outf, E, r, k)
        ws = torch.full((ws_n,), 255, dtype=torch.uint8, device=DEV)  # NaN-poisoned floats
        shape = cs.get("gemv1", GEMV1_VARIANTS[0])
        try:
            if cs["adapter"]:
                K.lora_linear(x, W, A, B, ids, g, scale, bias=bias, out=y, workspace=ws, gemv1=shape)
            else:
                K.linear(x, W, bias=bias, out=y, workspace=ws, gemv1=shape)
            torch.cuda.synchronize()
            err = rel_err(y, lora_ref(x, W, bias, A, B, ids, g, scale if cs["adapter"] else 0.0))
        except Exception as exc:  # report, keep going
            err = float("nan")
            cs["error"] = repr(exc)
        ok = (err == err) and err < TOL[cs["dtype"]]
        cs.update(rel_err=err, ok=ok)
        n_fail += 0 if ok else 1
        if not ok:
            log("  LORA FAIL", cs)
        del x, W, A, B, y, ws
    results["lora_correctness"] = cases
    worst = {}
    for cs in cases:
        d = cs["dtype"]
        e = cs["rel_err"] if cs["rel_err"] == cs["rel_err"] else float("inf")
        worst[d] = max(worst.get(d, 0.0), e)
    log(f"lora_linear gemv1 variants correctness: {len(cases)} cases, {n_fail} failures; worst rel err {worst}")
    return n_fail


GEMV1_VARIANTS = tuple(GEMV1_SHAPES)  # Kernels.lora_linear(gemv1=...): "auto" first


def check_lora_chain(K, results):
    """y1 = f(x), y2 = f(y1), y3 = f(y2) back to back, with PDL and a workspace per layer (exclusive: the
    one-row shrink launches early too) and without PDL (the launch GPUs before sm_90 get), eager and as a
    CUDA graph replayed on new inputs; against float64 references of the chain. The PDL chain with the
    binding's per-call workspaces is tests/gpu's."""
    gen = torch.Generator(device=DEV).manual_seed(77)
    cpu_gen = torch.Generator().manual_seed(78)
    n_fail, recs = 0, []
    for dname in ("bf16", "fp32"):
        dt = DT[dname]
        for (d, rows, r, adapter) in [(4096, 1, 16, True), (4096, 8, 64, True), (129, 1, 3, True), (4096, 1, 16, False),
                                      (136, 3, 16, True)]:
            Ws = [(torch.randn(d, d, generator=gen, device=DEV) / math.sqrt(d)).to(dt) for _ in range(3)]
            As = [(torch.randn(8, r, d, generator=gen, device=DEV) / math.sqrt(d)).to(dt) for _ in range(3)]
            Bs = [(torch.randn(8, d, r, generator=gen, device=DEV) / math.sqrt(r)).to(dt) for _ in range(3)]
            x = torch.empty(rows, d, device=DEV, dtype=dt)
            ids = torch.empty(rows, 2, device=DEV, dtype=torch.int32)
            g = torch.empty(rows, 2, device=DEV, dtype=torch.float32)
            wss = [torch.empty(K.lora_linear_workspace_size(rows, d, d, 8, r, 2), dtype=torch.uint8, device=DEV)
                   for _ in range(3)]
            mode = {}

            def chain():
                h = x
                for W, A, B, ws in zip(Ws, As, Bs, wss):
                    if not adapter:
                        h = K.linear(h, W, pdl=mode["pdl"])
                    elif mode["exclusive"]:
                        h = K.lora_linear(h, W, A, B, ids, g, 0.5, workspace=ws, exclusive_workspace=True)
                    else:
                        h = K.lora_linear(h, W, A, B, ids, g, 0.5, pdl=mode["pdl"])
                return h

            def ref():
                h = x
                for W, A, B in zip(Ws, As, Bs):
                    h = lora_ref(h, W, None, A, B, ids, g, 0.5 if adapter else 0.0).to(dt)
                return h

            def fresh():
                x.copy_(torch.randn(rows, d, generator=gen, device=DEV).to(dt))
                i2, g2 = rand_route(rows, 2, 8, cpu_gen)
                ids.copy_(i2)
                g.copy_(g2)

            for pdl, exclusive in (("1", True), ("0", False)):
                mode.update(pdl=pdl == "1", exclusive=exclusive)
                errs = []
                try:
                    fresh()
                    errs.append(rel_err(chain(), ref().double()))
                    graph, out = capture_graph(chain)
                    for _ in range(3):
                        fresh()
                        out.fill_(float("nan"))
                        graph.replay()
                        torch.cuda.synchronize()
                        errs.append(rel_err(out, ref().double()))
                except Exception as exc:  # report, keep going
                    errs.append(float("nan"))
                    log("  CHAIN ERROR", repr(exc))
                worst = max(e if e == e else float("inf") for e in errs)
                ok = worst < 3 * TOL[dname]
                n_fail += 0 if ok else 1
                recs.append(dict(dtype=dname, d=d, rows=rows, rank=r, adapter=adapter, pdl=pdl == "1", rel_err=worst, ok=ok))
                if not ok:
                    log("  CHAIN FAIL", recs[-1])
    results["lora_chain_correctness"] = recs
    log(f"lora_linear chain with PDL + exclusive workspaces and without PDL (eager and graph replay) correctness: {len(recs)} cases, {n_fail} failures")
    return n_fail


# ---------------------------------------------------------------------------
def delta_ref(A, B, ids, gates, scale):
    d = None
    for e, gv in zip(ids.tolist(), gates.tolist()):
        if e < 0 or e >= A.shape[0]:
            continue
        t = scale * gv * (B[e].double() @ A[e].double())
        d = t if d is None else d + t
    return d


_GG = {}


def make_sites(shapes, dt, E, r, gen, pristine):
    if "g" not in _GG:
        _GG["g"] = torch.Generator(device=DEV).manual_seed(777)
    gen = _GG["g"]
    sites = []
    for (outf, inf) in shapes:
        W0 = (torch.randn(outf, inf, generator=gen, device=DEV) * 0.02).to(dt)
        A = (torch.randn(E, r, inf, generator=gen, device=DEV) / math.sqrt(r)).to(dt)
        B = (torch.randn(E, outf, r, generator=gen, device=DEV) * 0.02).to(dt)
        s = dict(W=W0.clone(), A=A, B=B, scale=0.7, W0=W0)
        if pristine:
            s["W_base"] = W0
        sites.append(s)
    return sites


class SwitchVariant:
    """A loaded benchmark build whose switch() runs one kernel sequence (Kernels.switch's variant)."""

    def __init__(self, K, variant: str):
        self.K, self.variant = K, variant

    def switch(self, *args, **kw):
        return self.K.switch(*args, variant=self.variant, **kw)

    def __getattr__(self, name):
        return getattr(self.K, name)


def check_switch(K, results, tag=""):
    """Run under each --switch-impls variant (the diagnostics build's kernel sequences); the default is tests/gpu's."""
    gen = torch.Generator().manual_seed(99)
    out = []
    shapes = [(37, 7), (1, 1), (129, 257), (4096, 4095), (4096, 4096), (11008, 4096)]
    n_fail = 0
    for dname in ["fp32", "bf16", "fp16"]:
        dt = DT[dname]
        # K = terms x rank16 spans both v3 configurations (2 and 1 block/SM) and the v2 fallback
        for (E, r, k) in [(8, 16, 2), (8, 3, 4), (64, 64, 1), (1, 128, 3), (8, 64, 2), (4, 1, 2), (16, 32, 4)]:
            for pristine in (True, False):
                sites = make_sites(shapes, dt, E, r, gen, pristine)
                sd = K.sites_to_device(sites)
                maxo = max(s[0] for s in shapes); maxi = max(s[1] for s in shapes)
                ids1, g1 = rand_route(1, k, E, gen)
                ids2, g2 = rand_route(1, k, E, gen)
                ids1, g1, ids2, g2 = ids1[0].contiguous(), g1[0].contiguous(), ids2[0].contiguous(), g2[0].contiguous()
                # state: W = W0 + delta(route1) (rounded), old = route1
                for s in sites:
                    d1 = delta_ref(s["A"], s["B"], ids1, g1, s["scale"])
                    s["W"].copy_((s["W0"].double() + d1).to(dt))
                    if pristine:
                        s["W"].fill_(float("nan"))  # pristine mode must overwrite everything
                old_ids, old_g = ids1.clone(), g1.clone()
                K.switch(dt, sd, len(sites), maxo, maxi, ids2, g2, old_ids, old_g, update_old=True)
                torch.cuda.synchronize()
                errs = []
                for s in sites:
                    ref = s["W0"].double() + delta_ref(s["A"], s["B"], ids2, g2, s["scale"])
                    errs.append(rel_err(s["W"], ref))
                upd_ok = torch.equal(old_ids, ids2) and torch.equal(old_g, g2)
                # no-op: same route again -> nothing written (poison W, must stay bitwise)
                snaps = []
                for s in sites:
                    s["W"].fill_(float("nan")) if pristine else None
                    snaps.append(s["W"].clone())
                K.switch(dt, sd, len(sites), maxo, maxi, ids2, g2, old_ids, old_g, update_old=True)
                torch.cuda.synchronize()
                noop_ok = all(torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a.view(torch.int32),
                                          s["W"].view(torch.uint8) if a.dtype != torch.float32 else s["W"].view(torch.int32))
                              for a, s in zip(snaps, sites))
                worst = max(e if e == e else float("inf") for e in errs)
                ok = worst < TOL[dname] and upd_ok and noop_ok
                n_fail += 0 if ok else 1
                rec = dict(dtype=dname, E=E, rank=r, top_k=k, mode="pristine" if pristine else "in_place",
                           worst_rel_err=worst, update_old_ok=upd_ok, noop_writes_nothing=noop_ok, ok=ok)
                out.append(rec)
                if not ok:
                    log("  SWITCH FAIL", rec, errs)
                del sites, sd
    results["switch_correctness" + tag] = out
    log(f"switch{tag} correctness: {len(out)} cases, {n_fail} failures; worst per dtype "
        + str({d: max(o['worst_rel_err'] for o in out if o['dtype'] == d) for d in DT}))
    return n_fail


def drift_test(K, results, n_switch=10000):
    gen = torch.Generator().manual_seed(7)
    dt = torch.bfloat16
    E, r, k = 8, 16, 2
    shapes = [(4096, 4096)]
    s_in = make_sites(shapes, dt, E, r, gen, pristine=False)
    s_pr = [dict(W=torch.empty_like(s["W"]), W_base=s["W0"], A=s["A"], B=s["B"], scale=s["scale"]) for s in s_in]
    sd_in, sd_pr = K.sites_to_device(s_in), K.sites_to_device(s_pr)
    old_ids = torch.full((k,), -1, dtype=torch.int32, device=DEV)
    old_g = torch.zeros(k, dtype=torch.float32, device=DEV)
    routes = [rand_route(1, k, E, gen) for _ in range(64)]
    routes = [(a[0].contiguous(), b[0].contiguous()) for a, b in routes]
    t0 = time.time()
    for i in range(n_switch):
        ids, g = routes[i % 64] if i % 64 else routes[(i // 64) % 64]
        ids, g = routes[(i * 37 + i // 64) % 64]
        K.switch(dt, sd_in, 1, 4096, 4096, ids, g, old_ids, old_g, update_old=True)
    torch.cuda.synchronize()
    t_loop = time.time() - t0
    # pristine mode for the final route
    po_ids = torch.full((k,), -1, dtype=torch.int32, device=DEV)
    po_g = torch.zeros(k, dtype=torch.float32, device=DEV)
    K.switch(dt, sd_pr, 1, 4096, 4096, old_ids, old_g, po_ids, po_g, update_old=True)
    torch.cuda.synchronize()
    s = s_in[0]
    ref = s["W0"].double() + delta_ref(s["A"], s["B"], old_ids, old_g, s["scale"])
    W_in, W_pr = s["W"].double(), s_pr[0]["W"].double()
    rec = dict(n_switches=n_switch, shape=[4096, 4096], E=E, rank=r, top_k=k,
               inplace_vs_exact_rel=rel_err(s["W"], ref), pristine_vs_exact_rel=rel_err(s_pr[0]["W"], ref),
               inplace_vs_pristine_rel=(torch.linalg.vector_norm(W_in - W_pr) / torch.linalg.vector_norm(W_pr)).item(),
               inplace_vs_pristine_maxabs=(W_in - W_pr).abs().max().item(),
               W_rms=W_pr.pow(2).mean().sqrt().item(),
               delta_rms=(ref - s["W0"].double()).pow(2).mean().sqrt().item(),
               host_loop_s=t_loop)
    results["drift_bf16"] = rec
    log("drift after %d in-place bf16 switches: in-place vs exact %.3e, pristine vs exact %.3e, "
        "in-place vs pristine %.3e (max abs %.3e; W rms %.3e, delta rms %.3e)" % (
            n_switch, rec["inplace_vs_exact_rel"], rec["pristine_vs_exact_rel"],
            rec["inplace_vs_pristine_rel"], rec["inplace_vs_pristine_maxabs"], rec["W_rms"], rec["delta_rms"]))


# ---------------------------------------------------------------------------
def capture_graph(fn):
    """fn() warmed up twice, then captured: (graph, fn's result)."""
    return capture_cuda_graph(fn, warmups=2)


def time_graph(fn, reps=30, warm=3):
    """Capture fn() in a CUDA graph; return median ms per replay over reps replays."""
    g, _ = capture_graph(fn)
    for _ in range(warm):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2], ts


def time_eager(fn, reps=20, warm=3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2], ts


def copy_bandwidth():
    n = 2 * 1024 ** 3
    a = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    ms, _ = time_eager(lambda: b.copy_(a), reps=20)
    del a, b
    return 2 * n / (ms * 1e-3)


def assert_finite(what, sets):
    """The sanity check of a timed result: every output of the timed sets was written (finite).
    Correctness against a reference is tests/gpu's."""
    torch.cuda.synchronize()
    for s in sets:
        y = s[6] if isinstance(s, tuple) else s["y"]
        assert bool(torch.isfinite(y).all()), f"{what}: a timed output holds NaN/inf"


def lora_bench_sets(K, rows, outf, inf, E, r, k, gen, dt=torch.bfloat16):
    """Input sets (x, W, A, B, ids, gates, y, workspace) for timing, together more than 4x L2."""
    L2 = torch.cuda.get_device_properties(0).L2_cache_size
    per = (outf * inf + E * r * (inf + outf)) * 2
    sets = []
    for _ in range(max(2, math.ceil(4 * L2 / per))):
        x = torch.randn(rows, inf, device=DEV, generator=gen).to(dt)
        W = (torch.randn(outf, inf, device=DEV, generator=gen) / 64).to(dt)
        A = (torch.randn(E, r, inf, device=DEV, generator=gen) / 64).to(dt)
        B = (torch.randn(E, outf, r, device=DEV, generator=gen) / 8).to(dt)
        ids = torch.stack([torch.randperm(E, device=DEV, generator=gen)[:k] for _ in range(rows)]).int()
        g = torch.softmax(torch.randn(rows, k, device=DEV, generator=gen), 1).float()
        y = torch.full((rows, outf), float("nan"), device=DEV, dtype=dt)  # assert_finite: every output written
        ws = torch.empty(K.lora_linear_workspace_size(rows, inf, outf, E, r, k), dtype=torch.uint8, device=DEV)
        sets.append((x, W, A, B, ids, g, y, ws))
    return sets


def lora_bench_fns(K, sets, scale, pdl=True):
    """fused(): adafuse_lora_linear over every set (each its own workspace: exclusive, so the one-row shrink may
    launch early as in the GPU decoder); dense(): torch's x W^T (cuBLAS) over every set."""
    def fused():
        for (x, W, A, B, ids, g, y, ws) in sets:
            K.lora_linear(x, W, A, B, ids, g, scale, out=y, workspace=ws, pdl=pdl, exclusive_workspace=True)

    def dense():
        for (x, W, *_rest) in sets:
            torch.nn.functional.linear(x, W)
    return fused, dense


def bench_lora(K, results, copy_bw):
    gen = torch.Generator(device=DEV).manual_seed(5)
    dt = torch.bfloat16
    rows_out = []
    for (outf, inf) in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        for r in (16, 64):
            for rows in (1, 8, 17, 64, 512, 2048):
                if r == 64 and rows not in (1, 8, 512):
                    continue
                E, k, scale = 8, 2, 2.0
                sets = lora_bench_sets(K, rows, outf, inf, E, r, k, gen)
                nsets = len(sets)
                fused, dense_only = lora_bench_fns(K, sets, scale)

                def unmerged():
                    for (x, W, A, B, ids, g, y, ws) in sets:
                        base = torch.nn.functional.linear(x, W)
                        il = ids.long()
                        t = torch.einsum("nkri,ni->nkr", A[il], x)  # [rows, k, r]
                        t = t * (scale * g).to(dt)[..., None]
                        base = base + torch.einsum("nkor,nkr->no", B[il], t)
                        y.copy_(base)

                t_f, _ = time_graph(fused)
                assert_finite("lora_linear", sets)
                t_d, _ = time_graph(dense_only)
                t_u, _ = time_graph(unmerged)
                t_f2, _ = time_graph(fused)  # repeat: spread
                t_np, _ = time_graph(lora_bench_fns(K, sets, scale, pdl=False)[0])
                bytes_min = (outf * inf + rows * (inf + outf) + k * rows * r * (inf + outf)) * 2
                if rows > 1:  # experts read: at most min(E, rows*k) distinct
                    bytes_min = (outf * inf + rows * (inf + outf) + min(E, rows * k) * r * (inf + outf)) * 2
                flops = 2 * rows * outf * inf + 2 * rows * k * r * (inf + outf)
                rec = dict(out=outf, inp=inf, rank=r, rows=rows, E=E, top_k=k, nsets=nsets,
                           fused_us=1e3 * t_f / nsets, fused_repeat_us=1e3 * t_f2 / nsets, fused_nopdl_us=1e3 * t_np / nsets,
                           dense_us=1e3 * t_d / nsets, unmerged_us=1e3 * t_u / nsets,
                           bytes_floor_us=1e6 * bytes_min / copy_bw, flop_floor_us=1e6 * flops / 790e12)
                rec["fused_over_dense"] = rec["fused_us"] / rec["dense_us"]
                rec["fused_bw_TBps"] = bytes_min / (rec["fused_us"] * 1e-6) / 1e12
                rows_out.append(rec)
                log("  lora %5dx%-5d r%-3d rows %-3d fused %8.2f us (rep %8.2f, no PDL %8.2f) dense %8.2f unmerged %8.2f floor %7.2f  f/d %.3f  %.2f TB/s" % (
                    outf, inf, r, rows, rec["fused_us"], rec["fused_repeat_us"], rec["fused_nopdl_us"], rec["dense_us"], rec["unmerged_us"],
                    rec["bytes_floor_us"], rec["fused_over_dense"], rec["fused_bw_TBps"]))
                del sets, fused, dense_only, unmerged
                torch.cuda.empty_cache()
    results["lora_timing"] = rows_out


def bench_switch(K, results, copy_bw, r=16, tag=""):
    dt = torch.bfloat16
    gen = torch.Generator(device=DEV).manual_seed(11)
    E, k = 8, 2
    shapes = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]
    sites_in, sites_pr = [], []
    total_bytes = 0
    for layer in range(32):
        for (outf, inf) in shapes:
            W = (torch.randn(outf, inf, device=DEV, generator=gen) * 0.02).to(dt)
            Wb = W.clone()
            A = (torch.randn(E, r, inf, device=DEV, generator=gen) / 4).to(dt)
            B = (torch.randn(E, outf, r, device=DEV, generator=gen) * 0.01).to(dt)
            sites_in.append(dict(W=W, A=A, B=B, scale=2.0))
            sites_pr.append(dict(W=W, W_base=Wb, A=A, B=B, scale=2.0))
            total_bytes += outf * inf * 2
    sd_in, sd_pr = K.sites_to_device(sites_in), K.sites_to_device(sites_pr)
    n = len(sites_in)
    routes = []
    for _ in range(2):
        ids = torch.randperm(E, device=DEV, generator=gen)[:k].int().contiguous()
        g = torch.softmax(torch.randn(k, device=DEV, generator=gen), 0).float().contiguous()
        routes.append((ids, g))
    old_ids = torch.full((k,), -1, dtype=torch.int32, device=DEV)
    old_g = torch.zeros(k, dtype=torch.float32, device=DEV)
    state = {"i": 0}

    def sw_inplace():
        ids, g = routes[state["i"] % 2]
        state["i"] += 1
        K.switch(dt, sd_in, n, 11008, 11008, ids, g, old_ids, old_g, update_old=True)

    def sw_pristine():
        ids, g = routes[state["i"] % 2]
        state["i"] += 1
        K.switch(dt, sd_pr, n, 11008, 11008, ids, g, old_ids, old_g, update_old=True)

    def sw_noop():
        ids, g = routes[0]
        K.switch(dt, sd_in, n, 11008, 11008, old_ids, old_g, old_ids, old_g, update_old=False)

    t_in, ts_in = time_eager(sw_inplace, reps=20)
    t_pr, ts_pr = time_eager(sw_pristine, reps=20)
    t_in2, _ = time_eager(sw_inplace, reps=20)
    t_noop, _ = time_eager(sw_noop, reps=20)
    torch.cuda.synchronize()
    assert all(bool(torch.isfinite(s["W"]).all()) for s in sites_in + sites_pr), "switch: a timed W holds NaN/inf"
    # copy of the same bytes for reference (one flat buffer)
    flat = torch.empty(total_bytes // 2, dtype=dt, device=DEV)
    flat2 = torch.empty_like(flat)
    t_copy, _ = time_eager(lambda: flat2.copy_(flat), reps=20)
    del flat, flat2
    moved = 2 * total_bytes
    rec = dict(sites=n, weight_bytes=total_bytes, E=E, rank=r, top_k=k,
               inplace_ms=t_in, inplace_repeat_ms=t_in2, pristine_ms=t_pr, noop_ms=t_noop,
               same_bytes_copy_ms=t_copy,
               inplace_TBps=moved / (t_in * 1e-3) / 1e12, pristine_TBps=moved / (t_pr * 1e-3) / 1e12,
               copy_TBps_same_bytes=moved / (t_copy * 1e-3) / 1e12, copy_TBps_2GB=copy_bw / 1e12,
               floor_ms=1e3 * moved / copy_bw,
               flops=2.0 * sum(o * i for o, i in shapes) * 32 * (2 * k * r))
    rec["inplace_frac_of_copy"] = rec["inplace_TBps"] / rec["copy_TBps_2GB"]
    rec["pristine_frac_of_copy"] = rec["pristine_TBps"] / rec["copy_TBps_2GB"]
    results[("switch_timing" if r == 16 else f"switch_timing_r{r}") + tag] = rec
    log(f"switch{tag} 224 sites bf16 E8 r{r} top2: in-place %.3f ms (%.2f TB/s, %.0f%% of copy; repeat %.3f ms), "
        "pristine %.3f ms (%.2f TB/s, %.0f%%), no-op %.4f ms, same-bytes copy %.3f ms (%.2f TB/s)" % (
            t_in, rec["inplace_TBps"], 100 * rec["inplace_frac_of_copy"], t_in2, t_pr, rec["pristine_TBps"],
            100 * rec["pristine_frac_of_copy"], t_noop, t_copy, rec["copy_TBps_same_bytes"]))
    del sites_in, sites_pr
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--arch", default=None)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: gemv1,pdl,drift,tlora,tswitch "
                    "(gemv1 and pdl check the non-default gemv1 shapes and the PDL-off / exclusive-workspace chains)")
    ap.add_argument("--switch-impls", default="", help="comma list of switch kernel sequences to A/B "
                    "(chunked, resident_2pb; Kernels.switch variants of a -DADAFUSE_DIAGNOSTICS build): "
                    "correctness and timing of the switch again under each")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    maj, mnr = torch.cuda.get_device_capability()
    arch = args.arch or f"{maj}{mnr}"
    t0 = time.time()
    lib = build_library([arch], verbose=True)
    results["build_s"] = time.time() - t0
    log(f"built {lib} for sm_{arch} in {results['build_s']:.1f} s on {results['device']}")
    K = load_kernels(lib)
    fails = 0

    def section(name, fn, *a):
        nonlocal fails
        if name in skip:
            return
        t = time.time()
        try:
            r = fn(*a)
            if isinstance(r, int):
                fails += r
        except Exception:
            fails += 1
            log(f"SECTION {name} CRASHED:\n{traceback.format_exc()}")
            results[f"{name}_crash"] = traceback.format_exc()
        log(f"[{name}: {time.time() - t:.1f} s]")
        (out / "gpu_kernels.json").write_text(json.dumps(results, indent=1, default=str))

    bw = copy_bandwidth()
    results["copy_TBps"] = bw / 1e12
    log(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)")
    section("gemv1", check_lora, K, results)
    section("pdl", check_lora_chain, K, results)
    section("drift", drift_test, K, results)
    section("tlora", bench_lora, K, results, bw)
    section("tswitch", bench_switch, K, results, bw, 16)
    section("tswitch", bench_switch, K, results, bw, 64)
    # same-run A/B of the switch's kernel sequences (a benchmark build: the shipped one has only the default)
    impls = [m for m in args.switch_impls.split(",") if m]
    if impls:
        Kd = load_kernels(build_library([arch], extra_flags=[DIAGNOSTICS_FLAG]))
    for impl in impls:
        Kv = SwitchVariant(Kd, impl)
        section("switch_ab", check_switch, Kv, results, "_" + impl)
        section("switch_ab", bench_switch, Kv, results, bw, 16, "_" + impl)
        section("switch_ab", bench_switch, Kv, results, bw, 64, "_" + impl)
    results["failures"] = fails

    log("\n==== summary ====")
    log(f"device {results['device']}, copy {bw / 1e12:.2f} TB/s, variant check failures: {fails}")
    if "lora_timing" in results:
        log("%-11s %4s %4s | %9s %9s %9s %9s | %6s %6s" % ("W out x in", "r", "rows", "fused us", "dense us",
                                                          "unmrg us", "floor us", "f/d", "TB/s"))
        for r in results["lora_timing"]:
            log("%5dx%-5d %4d %4d | %9.2f %9.2f %9.2f %9.2f | %6.3f %6.2f" % (
                r["out"], r["inp"], r["rank"], r["rows"], r["fused_us"], r["dense_us"], r["unmerged_us"],
                max(r["bytes_floor_us"], r["flop_floor_us"]), r["fused_over_dense"], r["fused_bw_TBps"]))
    for key in [k for k in results if k.startswith("switch_timing")]:
        if key not in results:
            continue
        s = results[key]
        log(f"{key} r{s['rank']}: in-place %.3f ms, pristine %.3f ms, no-op %.4f ms, floor %.3f ms; "
            "%.0f%% / %.0f%% of copy bandwidth" % (s["inplace_ms"], s["pristine_ms"], s["noop_ms"], s["floor_ms"],
                                                  100 * s["inplace_frac_of_copy"], 100 * s["pristine_frac_of_copy"]))
    if "drift_bf16" in results:
        d = results["drift_bf16"]
        log("drift (10k in-place bf16 switches) in-place vs pristine rel %.3e" % d["inplace_vs_pristine_rel"])
    (out / "gpu_kernels.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_kernels.log").write_text(LOG.getvalue())
    return 0 if fails == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
