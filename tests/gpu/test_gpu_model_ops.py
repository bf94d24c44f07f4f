"""The native backend's model operations (plugins/kernels/src/model_ops.cu) against float64 references.

Each reference is the definition in adafuse_export/families/features.py evaluated in float64 (a
namespace whose "float32" is float64, so the definitions' own casts keep full precision) on the very
inputs the kernel read; every rounding the kernel makes to the storage dtype is one term of the bound
(gpu_numerics.error_bound). Outputs and every cache cell a kernel must neither write nor read are
NaN-poisoned; inputs are fresh random values per test (ADAFUSE_TEST_SEED redraws them).
"""
from __future__ import annotations

import math

import pytest
import torch

from adafuse_export.families import features
from adafuse_export.kernels.binding import AdafuseKernelError
from gpu_numerics import (DEVICE, DTYPES, SUBNORMAL_HALF_STEP, UNIT_ROUNDOFF, Inputs, assert_close, capture, error_bound,
                          poisoned, poisoned_workspace)

pytestmark = pytest.mark.gpu

EPS = 1e-6
U32 = UNIT_ROUNDOFF[torch.float32]


class _Float64(type(features.TORCH)):  # type: ignore[misc]
    """features' torch namespace with float64 where the definitions say float32."""

    @property
    def float32(self):
        return torch.float64


XP64 = _Float64()


def wide(inputs: Inputs, rows: int, cols: int, dt, extra: int, scale: float = 1.0) -> torch.Tensor:
    """A [rows, cols] view with row stride cols + extra (a slice of a wider projection output)."""
    return inputs.randn(rows, cols + extra, dtype=dt, scale=scale)[:, :cols]


# ---------------------------------------------------------------- embedding
@pytest.mark.parametrize("scale", [1.0, 45.254833995939045], ids=["copy", "scaled"])
@pytest.mark.parametrize("tokens,hidden", [(1, 7), (3, 64), (17, 37), (130, 4096)])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_embed(kernels, inputs, dtype, tokens, hidden, scale):
    dt, vocab = DTYPES[dtype], 1000
    table = inputs.randn(vocab, hidden, dtype=dt)
    ids = torch.randint(0, vocab, (tokens,), generator=inputs.cpu).to(DEVICE)
    if tokens > 1:
        ids[1] = vocab  # outside the table: the row stays untouched
    out = poisoned(tokens, hidden, dtype=dt)
    kernels.embed(ids, table, scale=scale, out=out)
    torch.cuda.synchronize()
    valid = ids < vocab
    # the reference multiplies by a tensor of the model dtype: the scale rounded to it first
    ref = table[ids[valid]].double() * torch.tensor(scale, dtype=dt).double()
    assert bool(out[~valid].isnan().all()), "embed wrote the row of an id outside the table"
    if scale == 1.0:
        assert torch.equal(out[valid], table[ids[valid]]), "embed with scale 1 is not a copy"
    assert_close(out[valid], ref, error_bound(dt, [ref], ref.abs(), 1), f"embed {dtype} {tokens}x{hidden}", inputs)


# ---------------------------------------------------------------- norms
@pytest.mark.parametrize("layout", ["add", "plain", "in_place", "strided"])
@pytest.mark.parametrize("rows,hidden", [(1, 7), (3, 37), (17, 3072), (130, 4096), (3, 2304)])
@pytest.mark.parametrize("kind", ["rms", "rms_one_plus"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_norm(kernels, inputs, dtype, kind, rows, hidden, layout):
    dt = DTYPES[dtype]
    extra = 8 if layout == "strided" else 0
    h = wide(inputs, rows, hidden, dt, extra)
    delta = wide(inputs, rows, hidden, dt, extra) if layout in ("add", "strided") else None
    w = inputs.randn(hidden, dtype=dt, scale=0.1) + (0 if kind == "rms_one_plus" else 1)
    h0 = h.clone()
    out = h if layout == "in_place" else poisoned(rows, hidden + extra, dtype=dt)[:, :hidden]
    kernels.norm(h, w, EPS, kind=kind, delta=delta, out=out)
    torch.cuda.synchronize()
    hd = h0.double() + (delta.double() if delta is not None else 0.0)
    ref = features.rms_norm(XP64, hd, w.double(), EPS, kind)
    what = f"norm {kind} {dtype} {rows}x{hidden} {layout}"
    # h + delta, the normalised value (rms) and the output: three roundings of about the output's size
    assert_close(out, ref, error_bound(dt, [ref, ref, ref], ref.abs(), hidden), what, inputs)
    if delta is not None:
        assert_close(h, hd, error_bound(dt, [hd], hd.abs(), 2), f"{what}: h += delta", inputs)
    elif layout != "in_place":
        assert torch.equal(h, h0), f"{what}: h written without a delta"


@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(2, 1, 64), (8, 2, 128), (4, 4, 7), (16, 8, 256)])
@pytest.mark.parametrize("kind", ["rms", "rms_one_plus"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_head_norm(kernels, inputs, dtype, kind, heads, kv_heads, head_dim, tokens):
    """q's heads normed in place inside a fused qkv output; k and v (the rest of each row) untouched."""
    dt, H, D = DTYPES[dtype], heads, head_dim
    fused = inputs.randn(tokens, (H + 2 * kv_heads) * D, dtype=dt)
    before = fused.clone()
    q = fused[:, :H * D]
    w = inputs.randn(D, dtype=dt, scale=0.1) + (0 if kind == "rms_one_plus" else 1)
    kernels.head_norm(q, w, EPS, heads=H, kind=kind)
    torch.cuda.synchronize()
    ref = features.rms_norm(XP64, before[:, :H * D].double().view(tokens, H, D), w.double(), EPS, kind)
    assert_close(q.view(tokens, H, D), ref, error_bound(dt, [ref, ref], ref.abs(), D),
                 f"head_norm {kind} {dtype} T{tokens} H{H} D{D}", inputs)
    assert torch.equal(fused[:, H * D:], before[:, H * D:]), "head_norm wrote outside q"


# ---------------------------------------------------------------- activation * up
@pytest.mark.parametrize("rows,inter", [(1, 7), (3, 96), (17, 11008), (130, 257)])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_act_mul(kernels, inputs, dtype, act, rows, inter):
    dt = DTYPES[dtype]
    gate_up = inputs.randn(rows, 2 * inter, dtype=dt, scale=3.0)  # a fused gate/up output: strided views
    g, u = torch.split(gate_up, [inter, inter], dim=-1)
    out = poisoned(rows, inter, dtype=dt)
    kernels.act_mul(g, u, act=act, out=out)
    torch.cuda.synchronize()
    gd, ud = g.double(), u.double()
    a = features.activation(XP64, act, gd)
    ref = a * ud
    # rounded: act(g), whose error reaches the output times |u| (its subnormal half step too: seen on an H100, a
    # tiny silu(g) times |u| ~ 3 passed a bound that counted the step once), then the product. float32: exp /
    # tanh within a few ulp of 1 before the 1 + ... (gelu_tanh near -1 cancels): about |g u| / 2 absolutely,
    # counted as 16 float32 steps
    rss = ref.abs() + 0.5 * (gd * ud).abs()
    act_rounding = 2.0 * (UNIT_ROUNDOFF[dt] * ref.abs() + SUBNORMAL_HALF_STEP[dt] * ud.abs())
    assert_close(out, ref, error_bound(dt, [ref], rss, 16) + act_rounding, f"act_mul {act} {dtype} {rows}x{inter}",
                 inputs)


# ---------------------------------------------------------------- RoPE + cache write
def rope_frequencies(R: int, base: float, inputs: Inputs) -> torch.Tensor:
    inv = 1.0 / (base ** (torch.arange(0, R, 2, dtype=torch.float64) / R))
    return inv.float().to(DEVICE)


@pytest.mark.parametrize("tokens", [1, 3, 17, 130])
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim", [(4, 2, 8, 8), (32, 8, 128, 128), (8, 8, 96, 32),
                                                                (12, 4, 64, 48), (16, 2, 256, 256)])
@pytest.mark.parametrize("variant", ["plain", "longrope"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rope_cache_write(kernels, inputs, dtype, variant, heads, kv_heads, head_dim, rotary_dim, tokens):
    dt, H, KV, D, R = DTYPES[dtype], heads, kv_heads, head_dim, rotary_dim
    rows, max_seq = 5, 160
    fused = inputs.randn(tokens, (H + 2 * KV) * D, dtype=dt)
    q, k, v = torch.split(fused, [H * D, KV * D, KV * D], dim=-1)
    # distinct (slot, position) cells; the last token of a call with several has slot -1 (writes nothing)
    cells = inputs.permutation(rows * max_seq)[:tokens]
    slots = (cells // max_seq).to(torch.int32).to(DEVICE)
    pos = (cells % max_seq).to(torch.int64).to(DEVICE)
    if tokens > 1:
        slots[-1] = -1
    if tokens > 2:
        pos[-2] = max_seq  # outside the cache: writes nothing
    inv = rope_frequencies(R, 10000.0, inputs)
    long_inv = use_long = None
    factor = 1.0
    if variant == "longrope":
        long_inv = (inv / torch.linspace(1.0, 8.0, R // 2, device=DEVICE)).float()
        use_long = (torch.rand(tokens, generator=inputs.cpu) < 0.5).to(torch.uint8).to(DEVICE)
        factor = 1.1902380714238083
    k_cache = poisoned(rows, KV, max_seq, D, dtype=dt)
    v_cache = poisoned(rows, KV, max_seq, D, dtype=dt)
    q_out = poisoned(tokens, H * D, dtype=dt)
    kernels.rope_cache_write(q, k, v, inv, pos, slots, k_cache, v_cache, num_heads=H, rotary_dim=R,
                             long_inv_freq=long_inv, use_long=use_long, attention_factor=factor, out=q_out)
    torch.cuda.synchronize()
    # features.rope_cos_sin: the angle float32(pos) * inv_freq in float32, cos / sin of it, times the factor
    f = inv[None, :].expand(tokens, -1)
    if use_long is not None:
        f = torch.where(use_long.bool()[:, None], long_inv[None, :], f)
    angle = (pos.float()[:, None] * f).double()
    emb = torch.cat([angle, angle], -1)[:, None, :]  # [T, 1, R]
    cos, sin = emb.cos() * factor, emb.sin() * factor

    def reference(x):
        """float64 rope of x [T, heads, D] and its bound: the kernel rounds cos and sin, both products
        and their sum to the dtype."""
        xd = x.double()
        ref = features.apply_rope(XP64, xd, cos, sin, R, D)
        xc = features.apply_rope(XP64, xd, cos, torch.zeros_like(sin), R, D)  # the x * cos part (and the tail)
        xs = ref - xc
        return ref, error_bound(dt, [xc, xs, xc, xs, ref], (xc ** 2 + xs ** 2).sqrt(), 2)

    what = f"rope_cache_write {dtype} {variant} H{H} KV{KV} D{D} R{R} T{tokens}"
    q_ref, q_bound = reference(q.view(tokens, H, D))
    assert_close(q_out.view(tokens, H, D), q_ref, q_bound, f"{what}: q", inputs)
    wrote = (slots >= 0) & (pos < max_seq)
    k_ref, k_bound = reference(k.view(tokens, KV, D))
    s, p = slots[wrote].long(), pos[wrote]
    assert_close(k_cache[s, :, p], k_ref[wrote], k_bound[wrote], f"{what}: k cache", inputs)
    assert torch.equal(v_cache[s, :, p], v.reshape(tokens, KV, D)[wrote]), f"{what}: v cache is not v"
    written = torch.zeros(rows, max_seq, dtype=torch.bool, device=DEVICE)
    written[s, p] = True
    for name, cache in (("k", k_cache), ("v", v_cache)):
        assert bool(cache.permute(0, 2, 1, 3)[~written].isnan().all()), f"{what}: {name} cache written elsewhere"


# ---------------------------------------------------------------- attention
def attention_reference(q, k_cache, v_cache, starts, slots, pos, H, KV, D, window, scale, softcap,
                        rounded_probs: torch.dtype | None = None):
    """(float64 out [T, H*D], root-sum-square of its products, products per output, spread) per
    sequence: query t at position p attends to keys (p - window, p] of its cache row (features.softcap
    on the scores). `rounded_probs`: the kernel rounds each (unnormalised) probability to that dtype
    before P V (the tensor-core prefill kernel, as reference/model.py rounds softmax(...).to(q.dtype)):
    spread is then [sqrt(sum_j ((p_j + h/u) v_j)^2)], the root-sum-square of those roundings' reach
    (each off by at most u p'_j + h, p'_j = p_j l with l >= 1, u the unit roundoff, h half the smallest
    subnormal), else []."""
    T, G = q.shape[0], H // KV
    out = torch.full((T, H, D), float("nan"), dtype=torch.float64, device=q.device)
    rss = torch.zeros_like(out)
    pv = torch.zeros_like(out)
    floor = SUBNORMAL_HALF_STEP[rounded_probs] / UNIT_ROUNDOFF[rounded_probs] if rounded_probs is not None else 0.0
    qd = q.double().view(T, H, D)
    longest = 0
    for i in range(len(slots)):
        a, b = int(starts[i]), int(starts[i + 1])
        if a == b:
            continue
        p = pos[a:b]
        hi = int(p.max()) + 1
        k = k_cache[int(slots[i]), :, :hi].double().repeat_interleave(G, 0)  # [H, L, D]
        v = v_cache[int(slots[i]), :, :hi].double().repeat_interleave(G, 0)
        keys = torch.arange(hi, device=q.device)
        allowed = keys[None, :] <= p[:, None]
        if window > 0:
            allowed &= keys[None, :] > p[:, None] - window
        raw = torch.einsum("thd,hld->htl", qd[a:b], torch.nan_to_num(k, nan=0.0)) * scale
        scores = features.softcap(XP64, raw, softcap if softcap > 0 else None).masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, -1)  # [H, t, L]
        vz = torch.nan_to_num(v, nan=0.0)  # NaN only in cells no query here may see (weight 0)
        out[a:b] = torch.einsum("htl,hld->thd", probs, vz)
        score_rss = torch.einsum("thd,hld->htl", qd[a:b] ** 2, torch.nan_to_num(k, nan=0.0) ** 2).sqrt() * scale
        score_rss = score_rss.masked_fill(~allowed, 0.0)
        rss[a:b] = torch.einsum("htl,hld->thd", probs ** 2, vz ** 2).sqrt() * (1 + score_rss.amax((0, 2)))[:, None, None]
        pv[a:b] = torch.einsum("htl,hld->thd", ((probs + floor) * allowed) ** 2, vz ** 2).sqrt()
        longest = max(longest, int(allowed.sum(-1).max()))
    spread = [pv.reshape(T, H * D)] if rounded_probs is not None else []
    return out.reshape(T, H * D), rss.reshape(T, H * D), D + longest, spread


def prefill_rounds_probabilities(dt: torch.dtype, D: int, most: int) -> torch.dtype | None:
    """The dtype the kernel rounds the probabilities to: the tensor-core prefill kernel's (bfloat16,
    float16 with head_dim % 16 == 0, more than one query per sequence), None for the float32
    (SIMT) prefill kernel and the split-K decode path."""
    return dt if most > 1 and dt != torch.float32 and D % 16 == 0 else None


def attention_case(inputs: Inputs, dt, H, KV, D, lengths, max_seq, window):
    """Sequences (cached, new) in distinct random cache rows: q for the new tokens; caches random up to
    each sequence's last position and NaN elsewhere (also below the window of its first query)."""
    rows, device = len(lengths) + 2, inputs.device
    slot_of = inputs.permutation(rows)[:len(lengths)].to(torch.int32)
    k_cache = poisoned(rows, KV, max_seq, D, dtype=dt, device=device)
    v_cache = poisoned(rows, KV, max_seq, D, dtype=dt, device=device)
    starts, pos = [0], []
    for (cached, new), slot in zip(lengths, slot_of.tolist()):
        pos += list(range(cached, cached + new))
        starts.append(starts[-1] + new)
        lo = max(0, cached - window + 1) if window > 0 else 0
        hi = cached + new
        if new:
            k_cache[slot, :, lo:hi] = inputs.randn(KV, hi - lo, D, dtype=dt)
            v_cache[slot, :, lo:hi] = inputs.randn(KV, hi - lo, D, dtype=dt)
    T = starts[-1]
    return (inputs.randn(T, H * D, dtype=dt), k_cache, v_cache, torch.tensor(starts, dtype=torch.int32, device=device),
            slot_of.to(device), torch.tensor(pos, dtype=torch.int64, device=device))


# groups 1-8; head_dim 16-256 on the tensor-core prefill kernel (16-bit dtypes), 8 on the SIMT one
ATTN_SHAPES = [(4, 4, 64), (8, 4, 128), (16, 4, 128), (32, 4, 128), (8, 1, 256), (2, 2, 8), (4, 1, 32), (4, 2, 16)]
PREFILL = {"one": [(0, 17)], "varlen": [(0, 130), (0, 3), (0, 0), (0, 1), (0, 40)],
           "chunked": [(45, 33), (0, 70), (100, 1), (7, 64)]}
DECODE = {"decode": [(0, 1), (300, 1), (37, 1), (0, 0), (129, 1)]}


def attention_params():
    for dtype in DTYPES:
        for H, KV, D in ATTN_SHAPES:
            if dtype == "fp32" and D > 128:
                continue  # D * 4 bytes beyond 512: refused (tested below)
            for case in list(PREFILL) + list(DECODE):
                for window, softcap in ((0, 0.0), (24, 0.0), (0, 2.0), (16, 30.0)):
                    yield pytest.param(dtype, H, KV, D, case, window, softcap,
                                       id=f"{dtype}-H{H}-KV{KV}-D{D}-{case}-w{window}-cap{softcap:g}")


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim,case,window,softcap", list(attention_params()))
def test_attention(kernels, inputs, dtype, heads, kv_heads, head_dim, case, window, softcap):
    dt, H, KV, D = DTYPES[dtype], heads, kv_heads, head_dim
    lengths = {**PREFILL, **DECODE}[case]
    max_seq = 320
    q, k_cache, v_cache, starts, slots, pos = attention_case(inputs, dt, H, KV, D, lengths, max_seq, window)
    q = q * 2 if softcap else q  # scores large enough for the cap to matter
    most = max(n for _, n in lengths)
    out = poisoned(q.shape[0], H * D, dtype=dt)
    ws = poisoned_workspace(kernels.attention_workspace_size(q.shape[0], len(lengths), H, D, max_seq)) \
        if most == 1 else None
    scale = D ** -0.5
    kernels.attention(q, k_cache, v_cache, starts, slots, pos, num_heads=H, max_seq_tokens=most, scale=scale,
                      window=window, softcap=softcap, out=out, workspace=ws)
    torch.cuda.synchronize()
    ref, rss, terms, spread = attention_reference(q, k_cache, v_cache, starts, slots, pos, H, KV, D, window, scale,
                                                  softcap, prefill_rounds_probabilities(dt, D, most))
    assert_close(out, ref, error_bound(dt, [ref], rss, terms, spread),
                 f"attention {dtype} H{H} KV{KV} D{D} {case} w{window} cap{softcap} lengths {lengths}", inputs)


@pytest.mark.parametrize("head_dim", [64, 8], ids=["D64", "D8"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_prefill_attention_positions_with_gaps(kernels, inputs, dtype, head_dim):
    """Queries whose positions jump by more than the window: the keys between their windows lie inside
    the block's key range but no query may see them; their cache slots hold NaN and must add nothing
    (the tensor-core kernel zeroes their V rows, the SIMT kernel skips probability 0)."""
    dt, H, KV, D, max_seq, window = DTYPES[dtype], 8, 2, head_dim, 400, 16
    seq_pos = [list(range(0, 10)) + list(range(40, 60)) + list(range(150, 153)),
               [300] + list(range(330, 370))]
    slots = [2, 0]
    k_cache = poisoned(3, KV, max_seq, D, dtype=dt)
    v_cache = poisoned(3, KV, max_seq, D, dtype=dt)
    keys = torch.arange(max_seq, device=DEVICE)
    for slot, ps in zip(slots, seq_pos):
        p = torch.tensor(ps, device=DEVICE)
        seen = ((keys[None, :] <= p[:, None]) & (keys[None, :] > p[:, None] - window)).any(0)
        for cache in (k_cache, v_cache):
            cache[slot, :, seen] = inputs.randn(KV, int(seen.sum()), D, dtype=dt)
    starts = torch.tensor([0, len(seq_pos[0]), len(seq_pos[0]) + len(seq_pos[1])], dtype=torch.int32, device=DEVICE)
    pos = torch.tensor(seq_pos[0] + seq_pos[1], dtype=torch.int64, device=DEVICE)
    slot_t = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    q = inputs.randn(int(starts[-1]), H * D, dtype=dt)
    most = max(len(ps) for ps in seq_pos)
    out = poisoned(q.shape[0], H * D, dtype=dt)
    kernels.attention(q, k_cache, v_cache, starts, slot_t, pos, num_heads=H, max_seq_tokens=most, scale=D ** -0.5,
                      window=window, softcap=0.0, out=out)
    torch.cuda.synchronize()
    ref, rss, terms, spread = attention_reference(q, k_cache, v_cache, starts, slot_t, pos, H, KV, D, window,
                                                  D ** -0.5, 0.0, prefill_rounds_probabilities(dt, D, most))
    assert_close(out, ref, error_bound(dt, [ref], rss, terms, spread),
                 f"prefill attention {dtype} D{D} positions with gaps {seq_pos}", inputs)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_decode_attention_graph_replayed_with_new_positions(kernels, inputs, dtype):
    """The split-K path captured once, replayed as the sequences grow: positions, caches and q refilled
    in place, the output poisoned before each replay."""
    dt, H, KV, D, max_seq = DTYPES[dtype], 16, 4, 64, 700
    lengths = [(5, 1), (0, 1), (300, 1), (64, 1)]
    q, k_cache, v_cache, starts, slots, pos = attention_case(inputs, dt, H, KV, D, lengths, max_seq, 0)
    out = poisoned(len(lengths), H * D, dtype=dt)
    ws = poisoned_workspace(kernels.attention_workspace_size(len(lengths), len(lengths), H, D, max_seq))

    def run():
        kernels.attention(q, k_cache, v_cache, starts, slots, pos, num_heads=H, max_seq_tokens=1, scale=D ** -0.5,
                          window=0, softcap=0.0, out=out, workspace=ws)

    graph, _ = capture(run)
    for replay in range(3):
        step = 1 + replay * 97
        pos.copy_(torch.tensor([c + step for c, _ in lengths], device=DEVICE))
        for i, slot in enumerate(slots.tolist()):
            p = int(pos[i])
            for cache in (k_cache, v_cache):
                cache[slot, :, :p + 1] = inputs.randn(KV, p + 1, D, dtype=dt)
                cache[slot, :, p + 1:] = float("nan")
        q.copy_(inputs.randn(len(lengths), H * D, dtype=dt))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref, rss, terms, _ = attention_reference(q, k_cache, v_cache, starts, slots, pos, H, KV, D, 0, D ** -0.5, 0.0)
        assert_close(out, ref, error_bound(dt, [ref], rss, terms),
                     f"attention decode {dtype} graph replay {replay} positions {pos.tolist()}", inputs)


@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype", [(36, 4, 128, torch.bfloat16), (32, 32, 96, torch.bfloat16),
                                                           (32, 32, 256, torch.float32)],
                         ids=["group9", "D96", "fp32-D256"])
@pytest.mark.parametrize("most", [1, 8])
def test_attention_refuses_unsupported_shapes(kernels, heads, kv_heads, head_dim, dtype, most):
    H, KV, D = heads, kv_heads, head_dim
    cache = torch.ones(2, KV, 16, D, device=DEVICE, dtype=dtype)
    starts = torch.tensor([0, most], dtype=torch.int32, device=DEVICE)
    with pytest.raises(AdafuseKernelError, match="adafuse_attention failed: .*status 1"):
        kernels.attention(torch.ones(most, H * D, device=DEVICE, dtype=dtype), cache, cache.clone(), starts,
                          torch.zeros(1, dtype=torch.int32, device=DEVICE),
                          torch.arange(most, device=DEVICE, dtype=torch.int64), num_heads=H, max_seq_tokens=most,
                          scale=1.0)


# ---------------------------------------------------------------- gather, logits, router
@pytest.mark.parametrize("rows,cols", [(1, 7), (4, 4096), (17, 37)])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gather_rows(kernels, inputs, dtype, rows, cols):
    dt = DTYPES[dtype]
    src = wide(inputs, 40, cols, dt, 3)
    index = torch.randint(0, 40, (rows,), generator=inputs.cpu).to(torch.int32).to(DEVICE)
    if rows > 1:
        index[0] = -1  # left untouched
    out = poisoned(rows, cols, dtype=dt)
    kernels.gather_rows(src, index, out=out)
    torch.cuda.synchronize()
    ok = index >= 0
    assert torch.equal(out[ok], src[index[ok].long()]), f"gather_rows {dtype} {rows}x{cols}"
    assert bool(out[~ok].isnan().all()), "gather_rows wrote the row of a negative index"


@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("rows,vocab", [(1, 7), (3, 32000), (17, 1001)])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_logits_to_float(kernels, inputs, dtype, rows, vocab, softcap):
    dt = DTYPES[dtype]
    x = wide(inputs, rows, vocab, dt, 5, scale=20.0)
    out = torch.full((rows, vocab), float("nan"), dtype=torch.float32, device=DEVICE)
    kernels.logits_to_float(x, softcap=softcap, out=out)
    torch.cuda.synchronize()
    if softcap == 0.0:
        assert torch.equal(out, x.float()), "logits_to_float without a cap is not float(x)"
        return
    ref = features.softcap(XP64, x.double(), softcap)
    # float32: the division, tanhf (a few ulp) and the product: 16 float32 steps of the output
    assert_close(out, ref, error_bound(torch.float32, [ref], ref.abs() + softcap * U32, 16),
                 f"logits_to_float {dtype} {rows}x{vocab} cap {softcap}", inputs)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("experts,top_k", [(8, 2), (8, 8), (64, 4), (256, 8), (3, 1)])
@pytest.mark.parametrize("rows,in_features", [(1, 64), (17, 4096), (130, 37)])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_route_topk(kernels, inputs, dtype, rows, in_features, experts, top_k, with_bias, normalize):
    dt = DTYPES[dtype]
    x = wide(inputs, rows, in_features, dt, 4)
    weight = inputs.randn(experts, in_features, dtype=torch.float32, scale=in_features ** -0.5)
    bias = inputs.randn(experts, dtype=torch.float32, scale=0.1) if with_bias else None
    if rows > 1:
        x[-1] = 0  # all logits equal without a bias: ties, which go to the lower expert id
    ids, gates = kernels.route_topk(x, weight, bias, top_k=top_k, normalize=normalize)
    torch.cuda.synchronize()
    xd = x.double()
    logits = xd @ weight.double().T + (bias.double() if bias is not None else 0.0)
    probs = torch.softmax(logits, -1)
    best, _ = torch.sort(probs, dim=-1, descending=True, stable=True)
    best = best[:, :top_k]
    # float32 logits: a random walk over `in` products, then exp and the division (relative to p)
    logit_err = 8 * math.sqrt(in_features) * U32 * ((xd ** 2) @ (weight.double() ** 2).T).sqrt().amax(-1) + 16 * U32
    rel = (4 * logit_err + 32 * U32)[:, None]
    what = f"route_topk {dtype} {rows}x{in_features} E{experts} k{top_k} bias={with_bias} normalize={normalize}"
    assert ids.shape == (rows, top_k) and bool(((ids >= 0) & (ids < experts)).all()), f"{what}: ids {ids.tolist()}"
    for r in range(rows):
        assert len(set(ids[r].tolist())) == top_k, f"{what}: row {r} repeats an expert: {ids[r].tolist()}"
    chosen = probs.gather(1, ids.long())
    # each chosen expert is the j-th largest up to float32 error (exact ids where no near-tie)
    assert bool(((chosen - best).abs() <= rel * best).all()), f"{what}: ids {ids.tolist()} are not the top-k"
    ref = best / best.sum(-1, keepdim=True) if normalize else best
    assert_close(gates, ref, 2 * rel * ref, f"{what}: gates", inputs)
    if rows > 1 and bias is None:
        assert ids[-1].tolist() == list(range(top_k)), f"{what}: ties must go to the lower id, got {ids[-1].tolist()}"


# ---------------------------------------------------------------- refusals through the binding
def test_model_ops_refuse_bad_arguments(kernels):
    bf = torch.bfloat16
    x = torch.ones(3, 64, device=DEVICE, dtype=bf)
    with pytest.raises(AdafuseKernelError, match="kind='layer': expected one of 'rms', 'rms_one_plus'"):
        kernels.norm(x, torch.ones(64, device=DEVICE, dtype=bf), EPS, kind="layer")
    with pytest.raises(AdafuseKernelError, match="act='relu': expected one of 'silu', 'gelu_tanh'"):
        kernels.act_mul(x, x, act="relu")
    with pytest.raises(AdafuseKernelError, match="weight must have shape"):
        kernels.norm(x, torch.ones(63, device=DEVICE, dtype=bf), EPS)
    with pytest.raises(AdafuseKernelError, match="not a multiple of heads=5"):
        kernels.head_norm(x, torch.ones(8, device=DEVICE, dtype=bf), EPS, heads=5)
    with pytest.raises(AdafuseKernelError, match="adafuse_route_topk failed: .*status 1"):  # top_k above experts
        kernels.route_topk(x, torch.ones(2, 64, device=DEVICE), None, top_k=3, normalize=True)
    cache = torch.zeros(2, 2, 16, 8, device=DEVICE, dtype=bf)
    qkv = torch.ones(3, 32, device=DEVICE, dtype=bf)
    with pytest.raises(AdafuseKernelError, match="adafuse_rope_cache_write failed: .*status 1"):  # odd rotary dims
        kernels.rope_cache_write(qkv, qkv[:, :16], qkv[:, 16:], torch.ones(1, device=DEVICE), torch.zeros(
            3, dtype=torch.int64, device=DEVICE), torch.zeros(3, dtype=torch.int32, device=DEVICE), cache,
            cache.clone(), num_heads=4, rotary_dim=3)
