"""adafuse_switch with FP8 (e4m3) pristine bases against a float64 reference, on the GPU.

Each site's W_base is float8 e4m3 with per-row float32 scales (test_gpu_lora_linear_fp8.fp8_weight: rows
over two decades, so a wrong row's scale shows) and W, the merged weight, has the model's 16-bit dtype:
W = round(W8 * scale + sum_j c_j B A), the reference the DEQUANTIZED base in float64 plus the deltas, so
the bound is test_gpu_switch's (one rounding to the dtype plus float32 accumulation), not a quantization
tolerance. W is poisoned (NaN) before every switch. Covered: bf16 and fp16; odd sizes (the byte-wise
loads) and 7B-sized ones; test_gpu_switch's routes (the resident kernel at 2 and 1 blocks per SM and the
chunked fallback); a second route re-derived from the base (no drift); the unchanged route writing
nothing (bitwise); FP8 and 16-bit bases in one table; a base not 8-byte aligned; sites the library
refuses (adafuse_switch_check_site) skipped on the device; graph replay; the sm_80 conversion.
"""
from __future__ import annotations

import pytest
import torch

from adafuse_export.kernels import binding as kbind
from adafuse_export.quantize import dequantize_fp8
from gpu_numerics import DEVICE, DTYPES, Inputs, capture
from test_gpu_lora_linear_fp8 import fp8_weight, kernels_sm80  # noqa: F401 (a fixture)
from test_gpu_switch import ROUTES, bits, check_sites, make_sites, old_and_new_routes, single_route

pytestmark = pytest.mark.gpu

# (out, in): odd in (byte-wise FP8 loads), in % 8 == 0 (8-byte loads), one element, the 7B's sites
SHAPES = [(37, 7), (1, 1), (129, 257), (48, 136), (4096, 4095), (4096, 4096), (11008, 4096)]
HALF = ["bf16", "fp16"]
W_SCALE = 0.02  # the base's magnitude (times its rows' factors), of the deltas' order (test_gpu_switch.make_sites)


def fp8_sites(inputs: Inputs, dt: torch.dtype, experts: int, rank: int, shapes=SHAPES) -> list[dict]:
    """test_gpu_switch's sites (A, B and W of dt) on FP8 bases; W poisoned; 'start' the float64 dequantized base."""
    sites = make_sites(inputs, dt, experts, rank, shapes)
    for s, (out_f, in_f) in zip(sites, shapes):
        q, scale = fp8_weight(inputs, out_f, in_f, W_SCALE)
        s.update(W_base=q, base_scale=scale, start=dequantize_fp8(q, scale))
        s["W"].fill_(float("nan"))
    return sites


def switch(kernels, dt, sites, table, new, old_ids, old_gates, shapes=SHAPES) -> None:
    for s in sites:
        s["W"].fill_(float("nan"))  # every element must be rewritten from W_base
    kernels.switch(dt, table, len(sites), max(o for o, _ in shapes), max(i for _, i in shapes), *new, old_ids,
                   old_gates, update_old=True)
    torch.cuda.synchronize()


@pytest.mark.parametrize("experts,rank,top_k", ROUTES, ids=[f"E{e}-r{r}-k{k}" for e, r, k in ROUTES])
@pytest.mark.parametrize("dtype", HALF)
def test_fp8_switch(kernels, inputs, dtype, experts, rank, top_k):
    dt = DTYPES[dtype]
    sites = fp8_sites(inputs, dt, experts, rank)
    table = kernels.sites_to_device(sites)
    starts = [s["start"] for s in sites]
    old, new = old_and_new_routes(inputs, top_k, experts)
    old_ids, old_gates = old[0].clone(), old[1].clone()
    switch(kernels, dt, sites, table, new, old_ids, old_gates)
    check_sites(sites, starts, new, old, True, dt, f"FP8-base switch {dtype} E{experts} r{rank} k{top_k}", inputs)
    assert torch.equal(old_ids, new[0]) and torch.equal(old_gates, new[1]), "update_old did not copy the route"

    # the same route again: nothing is written (a poisoned W stays bitwise as it was)
    before = []
    for s in sites:
        s["W"].fill_(float("nan"))
        before.append(bits(s["W"]).clone())
    kernels.switch(dt, table, len(sites), 11008, 4096, *new, old_ids, old_gates, update_old=True)
    torch.cuda.synchronize()
    for k, (s, b) in enumerate(zip(sites, before)):
        assert torch.equal(bits(s["W"]), b), f"site {k}: the no-op switch (route unchanged) wrote W"

    # the old route back: re-derived from the FP8 base, not from the merged W (no drift)
    switch(kernels, dt, sites, table, old, old_ids, old_gates)
    check_sites(sites, starts, old, new, True, dt, f"FP8-base switch {dtype} E{experts} r{rank} k{top_k} back", inputs)


@pytest.mark.parametrize("dtype", HALF)
def test_fp8_and_dtype_bases_in_one_table(kernels, inputs, dtype):
    """One launch over sites of both kinds (an FP8 model's adapted sites beside a 16-bit one's)."""
    dt = DTYPES[dtype]
    shapes = [(129, 257), (4096, 4096), (37, 7), (48, 136)]
    fp8 = fp8_sites(inputs, dt, 8, 16, shapes[:2])
    plain = make_sites(inputs, dt, 8, 16, shapes[2:])
    for s in plain:
        s.update(W_base=s["W0"], start=s["W0"])
    sites = [fp8[0], plain[0], fp8[1], plain[1]]
    table = kernels.sites_to_device(sites)
    new = single_route(inputs, 2, 8)
    old_ids = torch.full((2,), -1, dtype=torch.int32, device=DEVICE)
    old_gates = torch.zeros(2, dtype=torch.float32, device=DEVICE)
    switch(kernels, dt, sites, table, new, old_ids, old_gates, shapes)
    check_sites(sites, [s["start"] for s in sites], new, None, True, dt, f"mixed bases {dtype}", inputs)


@pytest.mark.parametrize("dtype", HALF)
def test_fp8_base_not_8_byte_aligned(kernels, inputs, dtype):
    """in % 8 == 0 but W_base one byte past an 8-byte boundary: the byte-wise loads, same result."""
    dt = DTYPES[dtype]
    shapes = [(129, 256), (64, 4096)]
    sites = fp8_sites(inputs, dt, 8, 16, shapes)
    for s in sites:
        buf = torch.empty(s["W_base"].numel() + 1, dtype=torch.float8_e4m3fn, device=DEVICE)
        moved = buf[1:].view(s["W_base"].shape)
        moved.copy_(s["W_base"])
        assert moved.data_ptr() % 8 == 1
        s["W_base"] = moved
    new = single_route(inputs, 2, 8)
    old_ids = torch.full((2,), -1, dtype=torch.int32, device=DEVICE)
    old_gates = torch.zeros(2, dtype=torch.float32, device=DEVICE)
    switch(kernels, dt, sites, kernels.sites_to_device(sites), new, old_ids, old_gates, shapes)
    check_sites(sites, [s["start"] for s in sites], new, None, True, dt, f"unaligned FP8 base {dtype}", inputs)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_refused_sites_are_skipped_on_the_device(kernels, inputs, dtype):
    """The site table is device memory, so adafuse_switch cannot return an error for a site: one that
    adafuse_switch_check_site refuses (an FP8 base in place, without scales, or in a float32 call) is left
    untouched, bitwise, while a valid site of the same table is switched."""
    dt = DTYPES[dtype]
    shapes = [(129, 257)] * 4
    sites = make_sites(inputs, dt, 8, 16, shapes)
    q, scale = fp8_weight(inputs, 129, 257, W_SCALE)
    records = kbind.SwitchSite * 4
    table_host = records()
    raw = bytes(kbind.Kernels.pack_sites([dict(W=s["W"], W_base=s["W0"], A=s["A"], B=s["B"], scale=s["scale"])
                                          for s in sites]))
    for k in range(4):
        table_host[k] = kbind.SwitchSite.from_buffer_copy(raw, k * kbind.SWITCH_SITE_DTYPE_SIZE)
    FP8 = kbind.WEIGHT_FP8_E4M3
    refused = {1: dict(W_base=None, base_dtype=FP8, base_scale=scale.data_ptr()),  # in place
               2: dict(W_base=q.data_ptr(), base_dtype=FP8, base_scale=None)}      # no scales
    if dt == torch.float32:
        refused[3] = dict(W_base=q.data_ptr(), base_dtype=FP8, base_scale=scale.data_ptr())  # FP8 in a float32 call
    for k, fields in refused.items():
        for name, value in fields.items():
            setattr(table_host[k], name, value)
        with pytest.raises(kbind.AdafuseKernelError, match="adafuse_switch_check_site failed"):
            kernels.check_site(dt, table_host[k])
    table = torch.frombuffer(bytearray(bytes(table_host)), dtype=torch.uint8).to(DEVICE)
    for s in sites:
        s["W"].fill_(float("nan"))
    before = [bits(s["W"]).clone() for s in sites]
    new = single_route(inputs, 2, 8)
    old_ids = torch.full((2,), -1, dtype=torch.int32, device=DEVICE)
    old_gates = torch.zeros(2, dtype=torch.float32, device=DEVICE)
    kernels.switch(dt, table, 4, 129, 257, *new, old_ids, old_gates, update_old=True)
    torch.cuda.synchronize()
    valid = [k for k in range(4) if k not in refused]
    check_sites([sites[k] for k in valid], [sites[k]["W0"] for k in valid], new, None, True, dt,
                f"valid sites beside refused ones {dtype}", inputs)
    for k in refused:
        assert torch.equal(bits(sites[k]["W"]), before[k]), f"site {k} ({refused[k]}) was written"


def test_fp8_switch_graph_replay(kernels, inputs):
    """Captured once, replayed on new routes copied into the captured buffers (the native backend's decode step)."""
    dt = torch.bfloat16
    shapes = [(129, 257), (4096, 4096), (37, 7)]
    sites = fp8_sites(inputs, dt, 8, 16, shapes)
    table = kernels.sites_to_device(sites)
    new_ids, new_gates = single_route(inputs, 2, 8)
    old_ids = torch.full((2,), -1, dtype=torch.int32, device=DEVICE)
    old_gates = torch.zeros(2, dtype=torch.float32, device=DEVICE)
    call = lambda: kernels.switch(dt, table, len(sites), 4096, 4096, new_ids, new_gates, old_ids, old_gates,  # noqa: E731
                                  update_old=True)
    call()  # the first call on a device caches its launch plan: outside capture
    torch.cuda.synchronize()
    graph, _ = capture(call)
    for replay in range(3):
        new = single_route(inputs, 2, 8)
        new_ids.copy_(new[0])
        new_gates.copy_(new[1])
        for s in sites:
            s["W"].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_sites(sites, [s["start"] for s in sites], new, None, True, dt, f"FP8-base graph replay {replay}", inputs)


@pytest.mark.parametrize("experts,rank,top_k", [(8, 16, 2), (16, 32, 4)], ids=["E8-r16-k2", "E16-r32-k4"])
@pytest.mark.parametrize("dtype", HALF)
def test_fp8_switch_sm80_conversion(kernels_sm80, inputs, dtype, experts, rank, top_k):  # noqa: F811
    """The sm_80 build's e4m3 conversion (integer arithmetic, not cvt) in both switch kernels."""
    dt = DTYPES[dtype]
    shapes = [(129, 257), (4096, 4096)]
    sites = fp8_sites(inputs, dt, experts, rank, shapes)
    new = single_route(inputs, top_k, experts)
    old_ids = torch.full((top_k,), -1, dtype=torch.int32, device=DEVICE)
    old_gates = torch.zeros(top_k, dtype=torch.float32, device=DEVICE)
    switch(kernels_sm80, dt, sites, kernels_sm80.sites_to_device(sites), new, old_ids, old_gates, shapes)
    check_sites(sites, [s["start"] for s in sites], new, None, True, dt, f"FP8-base switch sm_80 {dtype}", inputs)
