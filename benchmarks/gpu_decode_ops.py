#!/usr/bin/env python3
"""Check and time the decode-step kernels (plugins/kernels/src/decode_ops.cu) on one GPU.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_decode_ops.py --out $OUT

Each of add_rms_norm, rope_kv_write, silu_mul and decode_attention is compared with a float64
reference on fresh random inputs (odd sizes, float32/float16/bfloat16, strided views of a fused
projection output, GQA groups 1-8, sliding windows), with NaN-poisoned outputs and, for the
caches, NaN in every slot the kernel must neither write nor read. Every case is also captured in
a CUDA graph and replayed on new inputs. Then each is timed (graph replay, median) against the
PyTorch ops it replaces, at Llama-2-7B decode shapes. Writes <out>/gpu_decode_ops.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from adafuse_export.kernels import load_kernels  # noqa: E402
from adafuse_export.kernels.binding import AdafuseKernelError, decode_attention_supported  # noqa: E402
from adafuse_export.reference.model import rms_norm  # noqa: E402
from gpu_kernels import DT, TOL, rel_err  # noqa: E402

DEV = "cuda"



def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis: the rotation the RoPE kernel must reproduce."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

def log(*a):
    print(*a, flush=True)


_CUDA_GEN: list = []


def rnd(*shape, dtype, gen, scale=1.0):
    """Random normal tensor drawn on the GPU (the CPU generator `gen` seeds the GPU one once)."""
    if not _CUDA_GEN:
        _CUDA_GEN.append(torch.Generator(device=DEV).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen))))
    return (torch.randn(*shape, generator=_CUDA_GEN[0], device=DEV, dtype=torch.float32) * scale).to(dtype)


def replay_check(run, refill, reference, dtype_name) -> float:
    """Capture run() in a CUDA graph, refill the inputs in place, replay, return the worst error."""
    run()  # warm-up outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    worst = 0.0
    for _ in range(2):
        refill()
        g.replay()
        torch.cuda.synchronize()
        outs = out if isinstance(out, tuple) else (out,)
        refs = reference()
        refs = refs if isinstance(refs, tuple) else (refs,)
        for o, r in zip(outs, refs):
            worst = max(worst, rel_err(o, r))
    return worst


# ---------------------------------------------------------------- add + RMSNorm
def norm_ref(h, delta, w, eps):
    hd = h.double() + (delta.double() if delta is not None else 0)
    return hd, w.double() * hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps)


def check_norm(K, gen, cases):
    for dn, dt in DT.items():
        for rows in (1, 3, 64):
            for hidden in (1, 7, 37, 4095, 4096, 5120, 11008):
                for with_delta in (True, False):
                    if rows == 64 and hidden > 4096 and dn != "bf16":
                        continue
                    h = rnd(rows, hidden, dtype=dt, gen=gen)
                    d = rnd(rows, hidden, dtype=dt, gen=gen) if with_delta else None
                    w = rnd(hidden, dtype=dt, gen=gen, scale=0.1) + 1
                    h0 = h.clone()
                    out = torch.full_like(h, float("nan"))
                    href, oref = norm_ref(h0, d, w, 1e-5)
                    K.add_rms_norm(h, d, w, 1e-5, out=out)
                    torch.cuda.synchronize()
                    err = max(rel_err(out, oref), rel_err(h, href))
                    ok = err < TOL[dn] and (with_delta or torch.equal(h, h0))
                    # graph replay on new inputs
                    hs, ds = h0.clone(), (d.clone() if d is not None else None)
                    outs = torch.full_like(h, float("nan"))
                    state = {}

                    def refill():
                        state["h"] = rnd(rows, hidden, dtype=dt, gen=gen)
                        hs.copy_(state["h"])
                    rerr = replay_check(lambda: K.add_rms_norm(hs, ds, w, 1e-5, out=outs), refill,
                                        lambda: norm_ref(state["h"], ds, w, 1e-5)[1], dn)
                    ok = ok and rerr < TOL[dn]
                    cases.append({"op": "add_rms_norm", "dtype": dn, "rows": rows, "hidden": hidden,
                                  "delta": with_delta, "rel_err": err, "graph_rel_err": rerr, "pass": bool(ok)})


# ---------------------------------------------------------------- RoPE + KV write
def cos_sin(positions, D, dtype):
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=DEV).double() / D))
    f = positions.double()[:, None] * inv
    e = torch.cat((f, f), -1)
    return e.cos().to(dtype), e.sin().to(dtype)


def rope_ref(x, cos, sin):  # x [T, n, D] float64
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def check_rope(K, gen, cases):
    for dn, dt in DT.items():
        for (H, KV, D) in ((1, 1, 2), (4, 2, 6), (32, 32, 128), (28, 4, 128), (8, 8, 64)):
            for batch, seq in ((1, 1), (3, 1), (2, 5)):
                max_seq = 37
                T = batch * seq
                fused = rnd(T, (H + 2 * KV) * D, dtype=dt, gen=gen)
                q, k, v = torch.split(fused, [H * D, KV * D, KV * D], dim=-1)
                pos = torch.stack([torch.randperm(max_seq, generator=gen)[:seq] for _ in range(batch)]).reshape(-1).to(DEV)
                cos, sin = cos_sin(pos, D, dt)
                kc = torch.full((batch + 1, KV, max_seq, D), float("nan"), device=DEV, dtype=dt)
                vc = torch.full_like(kc, float("nan"))
                qo = torch.full((T, H * D), float("nan"), device=DEV, dtype=dt)
                K.rope_kv_write(q, k, v, cos, sin, pos, kc, vc, seq=seq, num_heads=H, num_kv_heads=KV, out=qo)
                torch.cuda.synchronize()
                qref = rope_ref(q.double().view(T, H, D), cos.double(), sin.double()).reshape(T, H * D)
                kref = rope_ref(k.double().view(T, KV, D), cos.double(), sin.double())
                b_idx = torch.arange(T, device=DEV) // seq
                got_k = kc[b_idx, :, pos]  # [T, KV, D]
                got_v = vc[b_idx, :, pos]
                written = torch.zeros(kc.shape[:3], dtype=torch.bool, device=DEV)
                written[b_idx, :, pos] = True
                untouched = bool(kc[~written].isnan().all() and vc[~written].isnan().all())
                err = max(rel_err(qo, qref), rel_err(got_k, kref), rel_err(got_v, v.double().view(T, KV, D)))
                ok = err < TOL[dn] and untouched and torch.equal(got_v, v.view(T, KV, D))
                state = {}

                def refill():
                    state["f"] = rnd(T, (H + 2 * KV) * D, dtype=dt, gen=gen)
                    fused.copy_(state["f"])

                def ref():
                    fq, fk, fv = torch.split(state["f"].double(), [H * D, KV * D, KV * D], dim=-1)
                    return (rope_ref(fq.view(T, H, D), cos.double(), sin.double()).reshape(T, H * D),
                            rope_ref(fk.reshape(T, KV, D), cos.double(), sin.double()), fv.reshape(T, KV, D))
                rerr = replay_check(
                    lambda: (K.rope_kv_write(q, k, v, cos, sin, pos, kc, vc, seq=seq, num_heads=H, num_kv_heads=KV,
                                             out=qo), kc[b_idx, :, pos], vc[b_idx, :, pos]), refill, ref, dn)
                ok = ok and rerr < TOL[dn]
                cases.append({"op": "rope_kv_write", "dtype": dn, "H": H, "KV": KV, "D": D, "batch": batch, "seq": seq,
                              "rel_err": err, "graph_rel_err": rerr, "untouched_slots_nan": untouched, "pass": bool(ok)})


# ---------------------------------------------------------------- SiLU * up
def check_silu(K, gen, cases):
    for dn, dt in DT.items():
        for rows in (1, 3, 64):
            for inter in (1, 7, 96, 11008):
                gu = rnd(rows, 2 * inter, dtype=dt, gen=gen, scale=3.0)
                g, u = torch.split(gu, [inter, inter], dim=-1)
                out = torch.full((rows, inter), float("nan"), device=DEV, dtype=dt)
                K.silu_mul(g, u, out=out)
                torch.cuda.synchronize()

                def ref():
                    gd, ud = g.double(), u.double()
                    return gd * torch.sigmoid(gd) * ud
                err = rel_err(out, ref())

                def refill():
                    gu.copy_(rnd(rows, 2 * inter, dtype=dt, gen=gen, scale=3.0))
                rerr = replay_check(lambda: K.silu_mul(g, u, out=out), refill, ref, dn)
                cases.append({"op": "silu_mul", "dtype": dn, "rows": rows, "inter": inter, "rel_err": err,
                              "graph_rel_err": rerr, "pass": bool(err < TOL[dn] and rerr < TOL[dn])})


# ---------------------------------------------------------------- decode attention
def attn_ref(q, kc, vc, pos, H, KV, D, window):
    B = q.shape[0]
    G = H // KV
    out = torch.empty(B, H, D, dtype=torch.float64, device=DEV)
    qd = q.double().view(B, H, D)
    for b in range(B):
        p = int(pos[b])
        lo = max(0, p - window + 1) if window > 0 else 0
        k = kc[b, :, lo:p + 1].double()  # [KV, n, D]
        v = vc[b, :, lo:p + 1].double()
        k, v = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
        s = torch.einsum("hd,hnd->hn", qd[b], k) / math.sqrt(D)
        out[b] = torch.einsum("hn,hnd->hd", torch.softmax(s, -1), v)
    return out.reshape(B, H * D)


def check_attention(K, gen, cases):
    shapes = [(1, 1, 8), (32, 32, 128), (32, 8, 128), (28, 4, 128), (8, 1, 64), (4, 4, 256), (16, 2, 32)]
    for dn, dt in DT.items():
        for (H, KV, D) in shapes:
            if not decode_attention_supported(dt, H, KV, D):
                continue
            for max_seq in (7, 640, 2100, 8300):
                for batch in (1, 3):
                    for window in (0, 100):
                        if max_seq == 8300 and (batch > 1 or H > 8):
                            continue
                        kc = rnd(batch + 1, KV, max_seq, D, dtype=dt, gen=gen)
                        vc = rnd(batch + 1, KV, max_seq, D, dtype=dt, gen=gen)
                        pos = torch.tensor([int(torch.randint(0, max_seq, (1,), generator=gen)) for _ in range(batch)],
                                           device=DEV)
                        if batch > 1:
                            pos[0], pos[-1] = 0, max_seq - 1
                        for b in range(batch):  # slots the kernel must not read: NaN
                            p = int(pos[b])
                            kc[b, :, p + 1:] = float("nan")
                            vc[b, :, p + 1:] = float("nan")
                            if window > 0 and p - window + 1 > 0:
                                kc[b, :, :p - window + 1] = float("nan")
                                vc[b, :, :p - window + 1] = float("nan")
                        q = rnd(batch, H * D, dtype=dt, gen=gen)
                        out = torch.full_like(q, float("nan"))
                        ws = torch.full((K.decode_attention_workspace_size(batch, H, D, max_seq),), 255,
                                        dtype=torch.uint8, device=DEV)  # NaN-filled float workspace

                        def run():
                            return K.decode_attention(q, kc, vc, pos, num_heads=H, window=window, scale=D ** -0.5,
                                                      out=out, workspace=ws)
                        run()
                        torch.cuda.synchronize()
                        err = rel_err(out, attn_ref(q, kc, vc, pos, H, KV, D, window))

                        def refill():
                            q.copy_(rnd(batch, H * D, dtype=dt, gen=gen))
                        rerr = replay_check(run, refill, lambda: attn_ref(q, kc, vc, pos, H, KV, D, window), dn)
                        cases.append({"op": "decode_attention", "dtype": dn, "H": H, "KV": KV, "D": D,
                                      "max_seq": max_seq, "batch": batch, "window": window, "positions": pos.tolist(),
                                      "rel_err": err, "graph_rel_err": rerr,
                                      "pass": bool(err < TOL[dn] and rerr < TOL[dn])})
    # shapes it must refuse (the decoder then keeps SDPA)
    for (H, KV, D, dt) in ((36, 4, 128, torch.bfloat16), (32, 32, 96, torch.bfloat16), (32, 32, 256, torch.float32)):
        refused = not decode_attention_supported(dt, H, KV, D)
        try:
            K.decode_attention(torch.zeros(1, H * D, device=DEV, dtype=dt),
                               torch.zeros(1, KV, 8, D, device=DEV, dtype=dt),
                               torch.zeros(1, KV, 8, D, device=DEV, dtype=dt),
                               torch.zeros(1, device=DEV, dtype=torch.int64), num_heads=H, scale=1.0)
            raised = False
        except AdafuseKernelError:
            raised = True
        cases.append({"op": "decode_attention refuses", "H": H, "KV": KV, "D": D, "dtype": str(dt),
                      "pass": refused and raised})


# ---------------------------------------------------------------- timing at 7B decode shapes
def time_graph(fn, calls=32, reps=20) -> float:
    """us per call: `calls` back-to-back calls captured in one CUDA graph (as in a decode step),
    median over reps replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(ts)[reps // 2]


def bench(K, results):
    dt = torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    rows = []
    for batch in (1, 8):
        hidden, inter, H, D = 4096, 11008, 32, 128
        h, d = rnd(batch, hidden, dtype=dt, gen=gen), rnd(batch, hidden, dtype=dt, gen=gen)
        w = rnd(hidden, dtype=dt, gen=gen) + 1
        rows.append(("add_rms_norm", batch, time_graph(lambda: K.add_rms_norm(h, d, w, 1e-5)),
                     time_graph(lambda: rms_norm(h + d, w, 1e-5))))
        gu = rnd(batch, 2 * inter, dtype=dt, gen=gen)
        g, u = torch.split(gu, [inter, inter], -1)
        rows.append(("silu_mul", batch, time_graph(lambda: K.silu_mul(g, u)),
                     time_graph(lambda: torch.nn.functional.silu(g) * u)))
        for ctx in (512, 2048, 8192):
            max_seq = ctx + 128
            kc = rnd(batch, H, max_seq, D, dtype=dt, gen=gen)
            vc = rnd(batch, H, max_seq, D, dtype=dt, gen=gen)
            qkv = rnd(batch, 3 * H * D, dtype=dt, gen=gen)
            q, k, v = torch.split(qkv, [H * D] * 3, -1)
            pos = torch.full((batch,), ctx, device=DEV, dtype=torch.int64)
            cos, sin = cos_sin(pos, D, dt)
            mask = torch.zeros(batch, 1, 1, max_seq, device=DEV, dtype=dt)
            mask[..., ctx + 1:] = float("-inf")
            cos4, sin4 = cos[:, None, None], sin[:, None, None]

            def kern():
                qr = K.rope_kv_write(q, k, v, cos, sin, pos, kc, vc, seq=1, num_heads=H, num_kv_heads=H)
                return K.decode_attention(qr, kc, vc, pos, num_heads=H, scale=D ** -0.5)

            def torch_ops():
                qh = q.reshape(batch, 1, H, D).transpose(1, 2)
                kh = k.reshape(batch, 1, H, D).transpose(1, 2)
                vh = v.reshape(batch, 1, H, D).transpose(1, 2)
                qh, kh = qh * cos4 + rotate_half(qh) * sin4, kh * cos4 + rotate_half(kh) * sin4
                kc.index_copy_(2, pos[:1], kh)
                vc.index_copy_(2, pos[:1], vh)
                a = torch.nn.functional.scaled_dot_product_attention(qh, kc, vc, attn_mask=mask)
                return a.transpose(1, 2).reshape(batch, H * D)
            kv_bytes = 2 * batch * H * (ctx + 1) * D * 2
            t_k, t_t = time_graph(kern), time_graph(torch_ops)
            rows.append((f"rope_kv_write+decode_attention ctx {ctx} ({kv_bytes / t_k / 1e3:.0f} GB/s)", batch, t_k, t_t))
    for name, batch, tk, tt in rows:
        log(f"{name:<58} b={batch}: kernel {tk:7.2f} us, torch ops {tt:7.2f} us ({tt / tk:.1f}x)")
        results["timing"].append({"op": name, "batch": batch, "kernel_us": tk, "torch_us": tt})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    K = load_kernels(archs=["90"])
    gen = torch.Generator().manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "cases": [], "timing": []}
    ok = True
    for fn in (check_norm, check_rope, check_silu, check_attention):
        try:
            fn(K, gen, results["cases"])
        except Exception:
            ok = False
            log(traceback.format_exc())
    by_op: dict = {}
    for c in results["cases"]:
        s = by_op.setdefault(c["op"], {"cases": 0, "failures": 0, "worst": {}})
        s["cases"] += 1
        s["failures"] += 0 if c["pass"] else 1
        if "rel_err" in c:
            s["worst"][c["dtype"]] = max(s["worst"].get(c["dtype"], 0.0), c["rel_err"], c["graph_rel_err"])
        if not c["pass"]:
            log("FAIL", c)
    for op, s in by_op.items():
        log(f"{op}: {s['cases']} cases, {s['failures']} failures, worst rel err "
            + ", ".join(f"{k} {v:.1e}" for k, v in s["worst"].items()))
        ok = ok and s["failures"] == 0
    results["summary"] = by_op
    try:
        bench(K, results)
    except Exception:
        ok = False
        log(traceback.format_exc())
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_decode_ops.json").write_text(json.dumps(results, indent=1))
    log("decode ops correctness: " + ("PASS" if ok else "FAIL"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
