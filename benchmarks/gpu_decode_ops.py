#!/usr/bin/env python3
"""Time the decode-step kernels and the prefill attention (plugins/kernels/src/model_ops.cu) on one GPU.

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_decode_ops.py --out $OUT [--prefill-only]

add_rms_norm, silu_mul and rope_kv_write + decode_attention, each timed (graph replay, median)
against the PyTorch ops it replaces, at Llama-2-7B decode shapes; the prefill attention (one
prompt of 512 and of 2048 tokens, 32 heads, head_dim 128, bfloat16 and float16) against
torch.nn.functional.scaled_dot_product_attention(is_causal=True) on the same shapes. Their
correctness is tests/gpu/test_gpu_decode_ops.py and test_gpu_model_ops.py (`python3 -m pytest -m gpu
tests/gpu`); a timed result is only checked to be finite here. Writes <out>/gpu_decode_ops.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adafuse_export.kernels import load_kernels  # noqa: E402
from adafuse_export.reference.model import rms_norm  # noqa: E402

DEV = "cuda"


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis (the PyTorch RoPE the kernel replaces)."""
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


def cos_sin(positions, D, dtype):
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=DEV).double() / D))
    f = positions.double()[:, None] * inv
    e = torch.cat((f, f), -1)
    return e.cos().to(dtype), e.sin().to(dtype)


def finite(name, fn):
    """The sanity check of a timed call: its result is finite (correctness is tests/gpu's)."""
    out = fn()
    torch.cuda.synchronize()
    assert bool(torch.isfinite(out).all()), f"{name}: the timed result holds NaN/inf"


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
        finite("add_rms_norm", lambda: K.add_rms_norm(h, d, w, 1e-5))
        rows.append(("add_rms_norm", batch, time_graph(lambda: K.add_rms_norm(h, d, w, 1e-5)),
                     time_graph(lambda: rms_norm(h + d, w, 1e-5))))
        gu = rnd(batch, 2 * inter, dtype=dt, gen=gen)
        g, u = torch.split(gu, [inter, inter], -1)
        finite("silu_mul", lambda: K.silu_mul(g, u))
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
            finite(f"rope_kv_write+decode_attention ctx {ctx}", kern)
            kv_bytes = 2 * batch * H * (ctx + 1) * D * 2
            t_k, t_t = time_graph(kern), time_graph(torch_ops)
            rows.append((f"rope_kv_write+decode_attention ctx {ctx} ({kv_bytes / t_k / 1e3:.0f} GB/s)", batch, t_k, t_t))
    for name, batch, tk, tt in rows:
        log(f"{name:<58} b={batch}: kernel {tk:7.2f} us, torch ops {tt:7.2f} us ({tt / tk:.1f}x)")
        results["timing"].append({"op": name, "batch": batch, "kernel_us": tk, "torch_us": tt})


def bench_prefill(K, results):
    """adafuse_attention over one prompt (max_seq_tokens = its length: the prefill kernel) against
    SDPA's causal attention on the same q, k, v, each given the layout it reads."""
    gen = torch.Generator().manual_seed(5)
    H, D = 32, 128
    for dt in (torch.bfloat16, torch.float16):
        for tokens in (512, 2048):
            q = rnd(tokens, H * D, dtype=dt, gen=gen)
            kc = rnd(1, H, tokens, D, dtype=dt, gen=gen)
            vc = rnd(1, H, tokens, D, dtype=dt, gen=gen)
            starts = torch.tensor([0, tokens], dtype=torch.int32, device=DEV)
            slots = torch.zeros(1, dtype=torch.int32, device=DEV)
            pos = torch.arange(tokens, dtype=torch.int64, device=DEV)
            out = torch.empty_like(q)
            qh = q.view(1, tokens, H, D).transpose(1, 2)

            def kern():
                return K.attention(q, kc, vc, starts, slots, pos, num_heads=H, max_seq_tokens=tokens,
                                   scale=D ** -0.5, out=out)

            def sdpa():
                return torch.nn.functional.scaled_dot_product_attention(qh, kc, vc, is_causal=True)
            finite(f"prefill attention {tokens}", kern)
            t_k, t_t = time_graph(kern, calls=4, reps=11), time_graph(sdpa, calls=4, reps=11)
            flops = 4 * H * D * tokens * (tokens + 1) / 2  # QK^T and PV over the causal half
            name = str(dt).removeprefix("torch.")
            log(f"prefill attention {name:<8} {tokens:5d} tokens H{H} D{D}: kernel {t_k:9.1f} us "
                f"({flops / t_k / 1e6:6.1f} TFLOP/s), SDPA causal {t_t:9.1f} us ({flops / t_t / 1e6:6.1f} TFLOP/s)"
                f" -> {t_t / t_k:.2f}x")
            results["prefill_attention"].append({"dtype": name, "tokens": tokens, "heads": H, "head_dim": D,
                                                 "kernel_us": t_k, "sdpa_causal_us": t_t,
                                                 "kernel_tflops": flops / t_k / 1e6,
                                                 "sdpa_tflops": flops / t_t / 1e6})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--prefill-only", action="store_true", help="time only the prefill attention")
    a = ap.parse_args()
    K = load_kernels(archs=["90"])
    results = {"device": torch.cuda.get_device_name(), "timing": [], "prefill_attention": []}
    if not a.prefill_only:
        bench(K, results)
    bench_prefill(K, results)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_decode_ops.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
