"""The error bounds of the gpu tests (tests/gpu/gpu_numerics.error_bound), checked on the CPU.

A float32 emulation of each kernel, rounding where its header says the kernel rounds, must pass
the bound its gpu test applies, on that test's random cases; the same emulation with one term
wrong (a dropped expert, a missing subtraction, an unrotated half, a wrong scale) must fail it. So
the bounds are neither tighter than float32 arithmetic allows nor loose enough to hide a bug, and
this holds on the CPU machine where the gpu tests cannot run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
import gpu_numerics as gn  # noqa: E402
import test_gpu_decode_ops as ops_t  # noqa: E402
import test_gpu_lora_linear as lora_t  # noqa: E402
import test_gpu_model_ops as model_t  # noqa: E402
import test_gpu_switch as switch_t  # noqa: E402

F32 = torch.float32


@pytest.fixture
def inputs(request) -> gn.Inputs:
    return gn.Inputs(request.node.nodeid, device="cpu")


def fails(check) -> bool:
    try:
        check()
    except AssertionError:
        return True
    return False


# ---------------------------------------------------------------- routed fused linear
def lora_emulation(op: lora_t.Operands, scale: float, dtype, wrong_expert: bool = False, drop_slot: bool = False):
    """The many-rows path (the one that rounds the most): z = T(scale * gate * x A^T) stored in the
    dtype, then y = T([x | z] [W | B_cat]^T + bias) accumulated in float32."""
    x = op.x.to(F32)
    y = x @ op.W.to(F32).T + (op.bias.to(F32) if op.bias is not None else 0.0)
    ids, E = op.ids.long(), op.A.shape[0]
    for n in range(x.shape[0]):
        for j in range(ids.shape[1] - (1 if drop_slot else 0)):
            e = int(ids[n, j])
            if not 0 <= e < E:
                continue
            if wrong_expert and n == 0 and j == 0:
                e = (e + 1) % E
            z = (scale * float(op.gates[n, j]) * (op.A[e].to(F32) @ x[n])).to(dtype).to(F32)
            y[n] += op.B[e].to(F32) @ z
    return y.to(dtype)


LORA_CASES = [lora_t.Case("bf16", 4096, 4096, 17, 16, 8, 2), lora_t.Case("fp16", 4095, 129, 3, 64, 8, 4, invalid_id=True),
              lora_t.Case("fp32", 11008, 256, 2, 16, 8, 2), lora_t.Case("bf16", 37, 129, 17, 4096, 2, 8),
              lora_t.Case("fp32", 37, 129, 17, 128, 64, 3), lora_t.Case("bf16", 7, 37, 8, 3, 1, 4, bias=False)]


@pytest.mark.parametrize("case", lora_t.params(LORA_CASES))
def test_lora_linear_bound(inputs, case):
    dt = gn.DTYPES[case.dtype]
    op = lora_t.operands(case, inputs)
    ref = lora_t.reference(op, lora_t.SCALE)
    limit = lora_t.bound(ref, dt)
    gn.assert_close(lora_emulation(op, lora_t.SCALE, dt), ref.y, limit, case.id, inputs)
    lora_t.assert_adapter_visible(ref, limit, case.id)
    assert fails(lambda: gn.assert_close(lora_emulation(op, lora_t.SCALE, dt, drop_slot=True), ref.y, limit, "", inputs))
    if case.experts > 1:
        assert fails(lambda: gn.assert_close(lora_emulation(op, lora_t.SCALE, dt, wrong_expert=True), ref.y, limit, "",
                                             inputs))
    unwritten = lora_emulation(op, lora_t.SCALE, dt)
    unwritten[-1, -1] = float("nan")
    assert fails(lambda: gn.assert_close(unwritten, ref.y, limit, "", inputs))


# ---------------------------------------------------------------- switch
def switch_emulation(site: dict, start, new, old, pristine: bool, dtype, keep_old: bool = False):
    """W = T(start + sum_j (c_j B) A - [in place] sum_j (c'_j B) A), float32, c_j B rounded to float32."""
    acc = start.to(F32).clone()
    A, B = site["A"].to(F32), site["B"].to(F32)
    for sign, (ids, gates) in ([(1.0, new)] if pristine or keep_old else [(1.0, new), (-1.0, old)]):
        for e, g in zip(ids.tolist(), gates.tolist()):
            if 0 <= e < A.shape[0]:
                acc += (sign * site["scale"] * g * B[e]) @ A[e]
    return acc.to(dtype)


@pytest.mark.parametrize("mode", ["pristine", "in_place"])
@pytest.mark.parametrize("experts,rank,top_k", [(8, 16, 2), (1, 128, 3), (4, 1, 2)])
@pytest.mark.parametrize("dtype", list(gn.DTYPES))
def test_switch_bound(inputs, dtype, experts, rank, top_k, mode):
    dt, pristine = gn.DTYPES[dtype], mode == "pristine"
    sites = switch_t.make_sites(inputs, dt, experts, rank, shapes=[(37, 7), (1, 1), (129, 257), (256, 1024)])
    old, new = switch_t.old_and_new_routes(inputs, top_k, experts)
    for s in sites:
        start = s["W0"] if pristine else (s["W0"].double() + switch_t.delta(s, *old)).to(dt)
        s["W"] = switch_emulation(s, start, new, old, pristine, dt)
        switch_t.check_sites([s], [start], new, old, pristine, dt, f"switch {dtype} {mode}", inputs)
        ref, rss, terms = switch_t.expected(s, start, new, old, pristine)
        limit = gn.error_bound(dt, [ref], rss, terms)
        if ref.numel() >= 64:
            wrong = switch_emulation(s, start, new, old, pristine, dt, keep_old=True) if not pristine else \
                switch_emulation(s, start, old, None, True, dt)
            assert fails(lambda: gn.assert_close(wrong, ref, limit, "", inputs))


# ---------------------------------------------------------------- decode-step operations
@pytest.mark.parametrize("rows,hidden", [(1, 1), (3, 37), (2, 4096), (1, 11008)])
@pytest.mark.parametrize("dtype", list(gn.DTYPES))
def test_add_rms_norm_bound(inputs, dtype, rows, hidden):
    dt = gn.DTYPES[dtype]
    h, d = inputs.randn(rows, hidden, dtype=dt), inputs.randn(rows, hidden, dtype=dt)
    w = inputs.randn(hidden, dtype=dt, scale=0.1) + 1

    def emulate(add: bool = True):  # h = T(h + d); out = T(w * T(h * rsqrt(mean(h^2) + eps)))
        hn = (h.to(F32) + d.to(F32)).to(dt) if add else h
        n = (hn.to(F32) * torch.rsqrt(hn.to(F32).pow(2).mean(-1, keepdim=True) + ops_t.EPS)).to(dt)
        return hn, (w.to(F32) * n.to(F32)).to(dt)

    hd, ref = ops_t.norm_reference(h, d, w)
    h_bound, out_bound = ops_t.norm_bounds(hd, ref, dt, hidden)
    hn, out = emulate()
    gn.assert_close(hn, hd, h_bound, "h + delta", inputs)
    gn.assert_close(out, ref, out_bound, "out", inputs)
    if hidden > 1:  # one element normalises to +-w whatever was added
        assert fails(lambda: gn.assert_close(emulate(add=False)[1], ref, out_bound, "", inputs))


@pytest.mark.parametrize("heads,head_dim", [(1, 2), (4, 6), (8, 128)])
@pytest.mark.parametrize("dtype", list(gn.DTYPES))
def test_rope_bound(inputs, dtype, heads, head_dim):
    dt, T = gn.DTYPES[dtype], 5
    x = inputs.randn(T, heads, head_dim, dtype=dt)
    cos, sin = ops_t.cos_sin(inputs.permutation(37)[:T], head_dim, dt)
    c, s = cos.to(F32)[:, None], sin.to(F32)[:, None]

    def emulate(sign: float = -1.0):  # T(T(x c) + T(-x' s)) per half
        half = head_dim // 2
        rot = torch.cat((sign * x[..., half:].to(F32), x[..., :half].to(F32)), -1)
        return ((x.to(F32) * c).to(dt).to(F32) + (rot * s).to(dt).to(F32)).to(dt)

    ref, limit = ops_t.rope_reference(x, cos, sin, dt)
    gn.assert_close(emulate(), ref, limit, "rope", inputs)
    assert fails(lambda: gn.assert_close(emulate(sign=1.0), ref, limit, "", inputs))


@pytest.mark.parametrize("rows,inter", [(1, 1), (3, 96), (2, 11008)])
@pytest.mark.parametrize("dtype", list(gn.DTYPES))
def test_silu_mul_bound(inputs, dtype, rows, inter):
    dt = gn.DTYPES[dtype]
    g, u = inputs.randn(rows, inter, dtype=dt, scale=3.0), inputs.randn(rows, inter, dtype=dt, scale=3.0)
    gd, ud = g.double(), u.double()
    ref = gd * torch.sigmoid(gd) * ud
    limit = gn.error_bound(dt, [ref, ref], ref.abs(), ops_t.SILU_FLOAT32_STEPS)
    g32 = g.to(F32)
    gn.assert_close(((g32 / (1 + torch.exp(-g32))).to(dt).to(F32) * u.to(F32)).to(dt), ref, limit, "silu", inputs)
    assert fails(lambda: gn.assert_close((torch.sigmoid(g32).to(dt).to(F32) * u.to(F32)).to(dt), ref, limit, "", inputs))


@pytest.mark.parametrize("heads,kv_heads,head_dim,max_seq,window", [(8, 1, 64, 640, 0), (4, 4, 32, 2100, 100),
                                                                    (1, 1, 8, 7, 0), (32, 8, 128, 300, 0)])
@pytest.mark.parametrize("dtype", list(gn.DTYPES))
def test_decode_attention_bound(inputs, dtype, heads, kv_heads, head_dim, max_seq, window):
    dt, H, KV, D, batch = gn.DTYPES[dtype], heads, kv_heads, head_dim, 2
    k_cache, v_cache = (inputs.randn(batch, KV, max_seq, D, dtype=dt) for _ in range(2))
    pos = torch.tensor([max_seq - 1, inputs.randint(0, max_seq)])
    q = inputs.randn(batch, H * D, dtype=dt)

    def emulate(scale: float):  # float32 scores, softmax and weighted sum, one rounding
        out = torch.empty(batch, H, D)
        for b in range(batch):
            p = int(pos[b])
            lo = max(0, p - window + 1) if window > 0 else 0
            k = k_cache[b, :, lo:p + 1].to(F32).repeat_interleave(H // KV, 0)
            v = v_cache[b, :, lo:p + 1].to(F32).repeat_interleave(H // KV, 0)
            probs = torch.softmax(torch.einsum("hd,hnd->hn", q[b].to(F32).view(H, D), k) * scale, -1)
            out[b] = torch.einsum("hn,hnd->hd", probs, v)
        return out.reshape(batch, H * D).to(dt)

    ref, rss, terms = ops_t.attention_reference(q, k_cache, v_cache, pos, H, KV, D, window)
    limit = gn.error_bound(dt, [ref], rss, terms)
    gn.assert_close(emulate(D ** -0.5), ref, limit, "decode attention", inputs)
    assert fails(lambda: gn.assert_close(emulate(1.0 / D), ref, limit, "", inputs))


def test_bound_terms():
    ref = torch.tensor([1.0, -4.0], dtype=torch.float64)
    assert torch.equal(gn.error_bound(torch.bfloat16, [ref], torch.zeros(2), 1), 2 * (2 ** -8 * ref.abs() + 2 ** -134))
    assert torch.allclose(gn.error_bound(torch.float32, [], ref, 100), 8 * 10 * 2 ** -24 * ref.abs())
    assert torch.equal(gn.error_bound(torch.float16, [], torch.zeros(2), 1, spread=[ref]), 8 * 2 ** -11 * ref.abs())


# ---------------------------------------------------------------- prefill attention (tensor cores)
def tc_prefill_emulation(q, k_cache, v_cache, starts, slots, pos, H, KV, D, window, scale, softcap, dt,
                         rescale: bool = True):
    """model_ops.cu prefill_attn_mma_kernel in float32: query tiles of 64, key tiles of 64 (32 for
    D > 128) from the block's lo, online softmax, probabilities rounded to dt before P V, one rounding
    at the end. `rescale` False drops the e^(m_old - m) correction of O and l (a wrong kernel)."""
    T, G, max_seq = q.shape[0], H // KV, k_cache.shape[2]
    bk = 64 if D <= 128 else 32
    out = torch.full((T, H, D), float("nan"))
    qf = q.to(F32).view(T, H, D)
    for i in range(len(slots)):
        a, b = int(starts[i]), int(starts[i + 1])
        for q0 in range(a, b, 64):
            q1 = min(b, q0 + 64)
            p = pos[q0:q1]
            lo = max(0, int(p.min()) - window + 1) if window > 0 else 0
            hi = min(int(p.max()) + 1, max_seq)
            m = torch.full((H, q1 - q0), float("-inf"))
            l = torch.zeros(H, q1 - q0)
            acc = torch.zeros(H, q1 - q0, D)
            for k0 in range(lo, hi, bk):
                kp = torch.arange(k0, min(k0 + bk, hi))
                allowed = (kp[None, :] <= p[:, None]) & ((kp[None, :] > p[:, None] - window) if window > 0 else True)
                k = k_cache[int(slots[i]), :, kp].to(F32).repeat_interleave(G, 0)
                v = v_cache[int(slots[i]), :, kp].to(F32).repeat_interleave(G, 0)
                v = torch.where(allowed.any(0)[None, :, None], v, 0.0)  # keys no query sees: zeroed V rows
                s = torch.einsum("thd,hkd->htk", qf[q0:q1], k) * scale
                if softcap > 0:
                    s = torch.tanh(s / softcap) * softcap
                s = s.masked_fill(~allowed[None], float("-inf"))
                m_new = torch.maximum(m, s.amax(-1))
                corr = torch.where(m_new == float("-inf"), 1.0, torch.exp(m - m_new)) if rescale else torch.ones_like(m)
                e = torch.where(s == float("-inf"), 0.0, torch.exp(s - m_new[..., None]))
                l = l * corr + e.sum(-1)
                acc = acc * corr[..., None] + torch.einsum("htk,hkd->htd", e.to(dt).to(F32), v)
                m = m_new
            out[q0:q1] = (acc / l[..., None]).transpose(0, 1)
    return out.reshape(T, H * D).to(dt)


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (24, 0.0), (16, 30.0)])
@pytest.mark.parametrize("case", ["varlen", "chunked"])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 4, 128), (8, 1, 256), (4, 2, 16)])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_tc_prefill_attention_bound(inputs, dtype, heads, kv_heads, head_dim, case, window, softcap):
    """The tensor-core prefill kernel's arithmetic (probabilities rounded to the dtype) within the bound
    of tests/gpu/test_gpu_model_ops.py::test_attention; without the online-softmax rescale, outside it."""
    dt, H, KV, D = gn.DTYPES[dtype], heads, kv_heads, head_dim
    lengths = model_t.PREFILL[case]
    q, k_cache, v_cache, starts, slots, pos = model_t.attention_case(inputs, dt, H, KV, D, lengths, 320, window)
    q = q * 2 if softcap else q
    most = max(n for _, n in lengths)
    scale = D ** -0.5
    rounds = model_t.prefill_rounds_probabilities(dt, D, most)
    assert rounds == dt
    ref, rss, terms, spread = model_t.attention_reference(q, k_cache, v_cache, starts, slots, pos, H, KV, D, window,
                                                          scale, softcap, rounds)
    limit = gn.error_bound(dt, [ref], rss, terms, spread)
    args = (q, k_cache, v_cache, starts, slots, pos, H, KV, D, window, scale, softcap, dt)
    gn.assert_close(tc_prefill_emulation(*args), ref, limit, "tensor-core prefill attention", inputs)
    if window == 0:  # many key tiles per query tile: the running max changes
        assert fails(lambda: gn.assert_close(tc_prefill_emulation(*args, rescale=False), ref, limit, "", inputs))
