"""The decode-step kernels (plugins/kernels/src/model_ops.cu) against float64 references on the GPU.

add_rms_norm, rope_kv_write, silu_mul and decode_attention over dtype x odd sizes, strided views of
a fused projection output, GQA groups 1-8 and sliding windows; outputs NaN-poisoned, and for the
caches NaN in every slot the kernel must neither write nor read. Each case is then captured in a
CUDA graph and replayed on new inputs. The kernels round where the PyTorch ops they replace round
(the header says where); each rounding is one term of the bound (gpu_numerics.error_bound).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from adafuse_export.kernels.binding import AdafuseKernelError, decode_attention_supported
from gpu_numerics import DEVICE, DTYPES, Inputs, assert_close, capture, error_bound, poisoned, poisoned_workspace

pytestmark = pytest.mark.gpu

EPS = 1e-5


def replay_on_new_inputs(run, refill, check, replays: int = 2) -> None:
    """Capture run() in a CUDA graph; per replay: refill its inputs in place, replay, check."""
    graph, _ = capture(run)
    for replay in range(replays):
        refill()
        graph.replay()
        torch.cuda.synchronize()
        check(f"graph replay {replay}")


# ---------------------------------------------------------------- add + RMSNorm
def norm_reference(h, delta, w):
    """(h + delta, w * rmsnorm(h + delta)) in float64; the kernel rounds h + delta, the normalised
    value and the output to the dtype: three roundings of about the output's size."""
    hd = h.double() + (delta.double() if delta is not None else 0.0)
    out = w.double() * hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + EPS)
    return hd, out


def norm_bounds(hd, out, dtype, hidden):
    # h + delta: one rounding of two terms; out: 3 roundings, float32 mean of `hidden` squares
    return error_bound(dtype, [hd], hd.abs(), 2), error_bound(dtype, [out, out, out], out.abs(), hidden)


@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "no_add"])
@pytest.mark.parametrize("rows,hidden", [(r, h) for r in (1, 3, 64) for h in (1, 7, 37, 4095, 4096, 5120, 11008)])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_add_rms_norm(kernels, inputs, dtype, rows, hidden, with_delta):
    dt = DTYPES[dtype]
    h = inputs.randn(rows, hidden, dtype=dt)
    delta = inputs.randn(rows, hidden, dtype=dt) if with_delta else None
    w = inputs.randn(hidden, dtype=dt, scale=0.1) + 1
    h0 = h.clone()
    out = poisoned(rows, hidden, dtype=dt)
    kernels.add_rms_norm(h, delta, w, EPS, out=out)
    torch.cuda.synchronize()
    hd, ref = norm_reference(h0, delta, w)
    h_bound, out_bound = norm_bounds(hd, ref, dt, hidden)
    assert_close(out, ref, out_bound, f"add_rms_norm out {dtype} {rows}x{hidden}", inputs)
    if with_delta:
        assert_close(h, hd, h_bound, f"add_rms_norm h += delta {dtype} {rows}x{hidden}", inputs)
    else:
        assert torch.equal(h, h0), "add_rms_norm without delta wrote h"

    state = {}

    def refill():
        state["h"] = inputs.randn(rows, hidden, dtype=dt)
        h.copy_(state["h"])
        out.fill_(float("nan"))

    def check(how):
        hd, ref = norm_reference(state["h"], delta, w)
        assert_close(out, ref, norm_bounds(hd, ref, dt, hidden)[1], f"add_rms_norm {dtype} {rows}x{hidden} {how}", inputs)
    replay_on_new_inputs(lambda: kernels.add_rms_norm(h, delta, w, EPS, out=out), refill, check)


# ---------------------------------------------------------------- RoPE + KV write
def cos_sin(positions, head_dim, dtype):
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=positions.device).double() / head_dim))
    angles = positions.double()[:, None] * inv
    both = torch.cat((angles, angles), -1)
    return both.cos().to(dtype), both.sin().to(dtype)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis: the rotation the kernel must reproduce."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(x, cos, sin, dtype):
    """x [T, heads, D] -> (float64 rope(x), its bound): the kernel rounds both products and their sum."""
    x, c, s = x.double(), cos.double()[:, None], sin.double()[:, None]
    xc, xs = x * c, rotate_half(x) * s
    ref = xc + xs
    return ref, error_bound(dtype, [xc, xs, ref], (xc ** 2 + xs ** 2).sqrt(), 2)


@pytest.mark.parametrize("batch,seq", [(1, 1), (3, 1), (2, 5)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(1, 1, 2), (4, 2, 6), (32, 32, 128), (28, 4, 128), (8, 8, 64)])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rope_kv_write(kernels, inputs, dtype, heads, kv_heads, head_dim, batch, seq):
    dt, H, KV, D = DTYPES[dtype], heads, kv_heads, head_dim
    max_seq, T = 37, batch * seq
    fused = inputs.randn(T, (H + 2 * KV) * D, dtype=dt)  # one fused qkv projection output: q, k, v are strided views
    q, k, v = torch.split(fused, [H * D, KV * D, KV * D], dim=-1)
    pos = torch.stack([inputs.permutation(max_seq)[:seq] for _ in range(batch)]).reshape(-1).to(DEVICE)
    cos, sin = cos_sin(pos, D, dt)
    k_cache = poisoned(batch + 1, KV, max_seq, D, dtype=dt)
    v_cache = poisoned(batch + 1, KV, max_seq, D, dtype=dt)
    q_out = poisoned(T, H * D, dtype=dt)
    rows = torch.arange(T, device=DEVICE) // seq
    written = torch.zeros(k_cache.shape[:3], dtype=torch.bool, device=DEVICE)
    written[rows, :, pos] = True

    def run():
        kernels.rope_kv_write(q, k, v, cos, sin, pos, k_cache, v_cache, seq=seq, num_heads=H, num_kv_heads=KV, out=q_out)

    def check(how):
        what = f"rope_kv_write {dtype} H{H} KV{KV} D{D} b{batch} s{seq} {how}"
        q_ref, q_bound = rope_reference(q.view(T, H, D), cos, sin, dt)
        k_ref, k_bound = rope_reference(k.view(T, KV, D), cos, sin, dt)
        assert_close(q_out.view(T, H, D), q_ref, q_bound, f"{what}: q", inputs)
        assert_close(k_cache[rows, :, pos], k_ref, k_bound, f"{what}: k cache", inputs)
        assert torch.equal(v_cache[rows, :, pos], v.view(T, KV, D)), f"{what}: v cache is not v"
        assert bool(k_cache[~written].isnan().all() and v_cache[~written].isnan().all()), \
            f"{what}: a cache slot outside the tokens' positions was written"

    run()
    torch.cuda.synchronize()
    check("eager")

    def refill():
        fused.copy_(inputs.randn(T, (H + 2 * KV) * D, dtype=dt))
        q_out.fill_(float("nan"))
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
    replay_on_new_inputs(run, refill, check)


# ---------------------------------------------------------------- SiLU * up
# silu(g) = g / (1 + exp(-g)) in float32: exp's few ulp and the division, counted as 16 float32 steps
SILU_FLOAT32_STEPS = 16


@pytest.mark.parametrize("rows,inter", [(r, i) for r in (1, 3, 64) for i in (1, 7, 96, 11008)])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_silu_mul(kernels, inputs, dtype, rows, inter):
    dt = DTYPES[dtype]
    gate_up = inputs.randn(rows, 2 * inter, dtype=dt, scale=3.0)  # a fused gate/up output: strided views
    g, u = torch.split(gate_up, [inter, inter], dim=-1)
    out = poisoned(rows, inter, dtype=dt)

    def check(how):
        gd, ud = g.double(), u.double()
        ref = gd * torch.sigmoid(gd) * ud
        # rounded: silu(g), then the product
        assert_close(out, ref, error_bound(dt, [ref, ref], ref.abs(), SILU_FLOAT32_STEPS),
                     f"silu_mul {dtype} {rows}x{inter} {how}", inputs)

    kernels.silu_mul(g, u, out=out)
    torch.cuda.synchronize()
    check("eager")

    def refill():
        gate_up.copy_(inputs.randn(rows, 2 * inter, dtype=dt, scale=3.0))
        out.fill_(float("nan"))
    replay_on_new_inputs(lambda: kernels.silu_mul(g, u, out=out), refill, check)


# ---------------------------------------------------------------- decode attention
def attention_reference(q, k_cache, v_cache, pos, H, KV, D, window):
    """(float64 output [B, H*D], root-sum-square of its products, products per output) of one query
    token per row at pos[b] over the cache slots [lo, pos[b]]."""
    B, G = q.shape[0], H // KV
    out = torch.empty(B, H, D, dtype=torch.float64, device=q.device)
    rss = torch.empty_like(out)
    qd = q.double().view(B, H, D)
    longest = 0
    for b in range(B):
        p = int(pos[b])
        lo = max(0, p - window + 1) if window > 0 else 0
        k = k_cache[b, :, lo:p + 1].double().repeat_interleave(G, 0)  # [H, n, D]
        v = v_cache[b, :, lo:p + 1].double().repeat_interleave(G, 0)
        probs = torch.softmax(torch.einsum("hd,hnd->hn", qd[b], k) / math.sqrt(D), -1)
        out[b] = torch.einsum("hn,hnd->hd", probs, v)
        # a score's float32 error moves its weight relatively by as much: scale by (1 + the scores' rss)
        score_rss = torch.einsum("hd,hnd->hn", qd[b] ** 2, k ** 2).sqrt() / math.sqrt(D)
        rss[b] = torch.einsum("hn,hnd->hd", probs ** 2, v ** 2).sqrt() * (1 + score_rss.max())
        longest = max(longest, p + 1 - lo)
    return out.reshape(B, H * D), rss.reshape(B, H * D), D + longest


ATTENTION_SHAPES = [(1, 1, 8), (32, 32, 128), (32, 8, 128), (28, 4, 128), (8, 1, 64), (4, 4, 256), (16, 2, 32)]


def attention_cases():
    for dtype, (H, KV, D), max_seq, batch, window in itertools.product(DTYPES, ATTENTION_SHAPES, (7, 640, 2100, 8300),
                                                                       (1, 3), (0, 100)):
        if not decode_attention_supported(DTYPES[dtype], H, KV, D):
            continue  # the decoder keeps SDPA there (the refusal is tested below)
        if max_seq == 8300 and (batch > 1 or H > 8):
            continue  # the longest context on the small-head shapes only: the float64 reference is slow
        yield pytest.param(dtype, H, KV, D, max_seq, batch, window,
                           id=f"{dtype}-H{H}-KV{KV}-D{D}-ctx{max_seq}-b{batch}-w{window}")


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim,max_seq,batch,window", list(attention_cases()))
def test_decode_attention(kernels, inputs, dtype, heads, kv_heads, head_dim, max_seq, batch, window):
    dt, H, KV, D = DTYPES[dtype], heads, kv_heads, head_dim
    k_cache = inputs.randn(batch + 1, KV, max_seq, D, dtype=dt)
    v_cache = inputs.randn(batch + 1, KV, max_seq, D, dtype=dt)
    pos = torch.tensor([inputs.randint(0, max_seq) for _ in range(batch)], device=DEVICE)
    if batch > 1:  # the first and the last slot
        pos[0], pos[-1] = 0, max_seq - 1
    for b in range(batch):  # slots the kernel must not read: NaN
        p = int(pos[b])
        for cache in (k_cache, v_cache):
            cache[b, :, p + 1:] = float("nan")
            if window > 0 and p - window + 1 > 0:
                cache[b, :, :p - window + 1] = float("nan")
    q = inputs.randn(batch, H * D, dtype=dt)
    out = poisoned(batch, H * D, dtype=dt)
    ws = poisoned_workspace(kernels.decode_attention_workspace_size(batch, H, D, max_seq))
    what = f"decode_attention {dtype} H{H} KV{KV} D{D} ctx{max_seq} b{batch} w{window} positions {pos.tolist()}"

    def run():
        kernels.decode_attention(q, k_cache, v_cache, pos, num_heads=H, window=window, scale=D ** -0.5, out=out,
                                 workspace=ws)

    def check(how):
        ref, rss, terms = attention_reference(q, k_cache, v_cache, pos, H, KV, D, window)
        assert_close(out, ref, error_bound(dt, [ref], rss, terms), f"{what} {how}", inputs)

    run()
    torch.cuda.synchronize()
    check("eager")

    def refill():
        q.copy_(inputs.randn(batch, H * D, dtype=dt))
        out.fill_(float("nan"))
    replay_on_new_inputs(run, refill, check)


@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype", [(36, 4, 128, torch.bfloat16), (32, 32, 96, torch.bfloat16),
                                                           (32, 32, 256, torch.float32)],
                         ids=["group9", "D96", "fp32-D256"])
def test_decode_attention_refuses_unsupported_shapes(kernels, heads, kv_heads, head_dim, dtype):
    """A GQA group over 8, or a head of a size its vectors cannot split: refused (the decoder keeps SDPA)."""
    H, KV, D = heads, kv_heads, head_dim
    assert not decode_attention_supported(dtype, H, KV, D)
    cache = torch.ones(1, KV, 8, D, device=DEVICE, dtype=dtype)
    with pytest.raises(AdafuseKernelError):
        kernels.decode_attention(torch.ones(1, H * D, device=DEVICE, dtype=dtype), cache, cache.clone(),
                                 torch.zeros(1, device=DEVICE, dtype=torch.int64), num_heads=H, scale=1.0)
