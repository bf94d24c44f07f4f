"""adafuse_switch (one launch re-merging every site's routed adapter into its weight) on the GPU.

Pristine mode (W = W_base + delta(new), W poisoned first: every element must be rewritten) and in
place (W += delta(new) - delta(old), against the float64 result of the W the kernel found), over
dtype x (experts, rank, top-k) on one table of odd and 7B-sized sites; the same route again
writes nothing (bitwise); update_old copies the route; a site larger than max_out / max_in is left
alone; and the call captured in a CUDA graph (as the GPU decoder's step captures it), replayed on
new routes.
"""
from __future__ import annotations

import pytest
import torch

from gpu_numerics import DTYPES, Inputs, assert_close, capture, error_bound

pytestmark = pytest.mark.gpu

SHAPES = [(37, 7), (1, 1), (129, 257), (4096, 4095), (4096, 4096), (11008, 4096)]  # (out, in)
# terms x rank spans the tensor-core kernel's configurations (2 and 1 block per SM) and its chunked-K fallback
ROUTES = [(8, 16, 2), (8, 3, 4), (64, 64, 1), (1, 128, 3), (8, 64, 2), (4, 1, 2), (16, 32, 4)]  # (experts, rank, top_k)
SCALE = 0.7


def make_sites(inputs: Inputs, dtype: torch.dtype, experts: int, rank: int, shapes=SHAPES) -> list[dict]:
    """W0 ~ 0.02 and delta of the same order (B A summed over the rank at scale 0.7), so that a dropped
    or misplaced term moves W far beyond the bound."""
    sites = []
    for out_f, in_f in shapes:
        W0 = inputs.randn(out_f, in_f, dtype=dtype, scale=0.02)
        sites.append(dict(W=W0.clone(), W0=W0, A=inputs.randn(experts, rank, in_f, dtype=dtype, scale=rank ** -0.5),
                          B=inputs.randn(experts, out_f, rank, dtype=dtype, scale=0.02), scale=SCALE))
    return sites


def delta(site: dict, ids: torch.Tensor, gates: torch.Tensor, square: bool = False) -> torch.Tensor:
    """float64 scale * sum_j gates[j] B[ids[j]] A[ids[j]] (ids < 0 or >= E contribute nothing);
    square: the same sum over squared factors (for the root-sum-square of the products)."""
    A, B = site["A"].double(), site["B"].double()
    out = torch.zeros(B.shape[1], A.shape[2], dtype=torch.float64, device=A.device)
    for e, g in zip(ids.tolist(), gates.tolist()):
        if 0 <= e < A.shape[0]:
            out += (site["scale"] * g) ** 2 * (B[e] ** 2 @ A[e] ** 2) if square else site["scale"] * g * (B[e] @ A[e])
    return out


def expected(site: dict, start: torch.Tensor, new, old, pristine: bool):
    """(float64 W after the switch, root-sum-square of its products, products per element) from the
    W (or W_base) the kernel starts from."""
    start = start.double()
    terms = [new] if pristine else [new, old]
    ref = start + delta(site, *new) - (0.0 if pristine else delta(site, *old))
    rss = (start ** 2 + sum(delta(site, ids, gates, square=True) for ids, gates in terms)).sqrt()
    return ref, rss, 1 + site["A"].shape[1] * sum(len(route[0]) for route in terms)


def check_sites(sites, starts, new, old, pristine, dtype, what, inputs) -> None:
    for k, (site, start) in enumerate(zip(sites, starts)):
        ref, rss, terms = expected(site, start, new, old, pristine)
        limit = error_bound(dtype, [ref], rss, terms)
        if ref.numel() >= 64:  # the check must see the delta: a switch that dropped it must fail
            seen = float(((ref - start.double()).abs() > limit).double().mean())
            assert seen > 0.5, f"{what} site {k}: the delta exceeds the error bound on only {seen:.0%} of W"
        assert_close(site["W"], ref, limit, f"{what} site {k} {tuple(site['W'].shape)}", inputs)


def single_route(inputs: Inputs, top_k: int, experts: int):
    """Gates not normalised: with one expert, two routes summing to 1 would merge the same delta."""
    ids, gates = inputs.route(1, top_k, experts, normalized=False)
    return ids[0].contiguous(), gates[0].contiguous()


def old_and_new_routes(inputs: Inputs, top_k: int, experts: int):
    """Two routes whose deltas differ: with one expert only the gates tell them apart, so there the
    old route is the new one at half the gates."""
    new = single_route(inputs, top_k, experts)
    old = (new[0].clone(), new[1] / 2) if experts == 1 else single_route(inputs, top_k, experts)
    return old, new


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("mode", ["pristine", "in_place"])
@pytest.mark.parametrize("experts,rank,top_k", ROUTES, ids=[f"E{e}-r{r}-k{k}" for e, r, k in ROUTES])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_switch(kernels, inputs, dtype, experts, rank, top_k, mode):
    dt, pristine = DTYPES[dtype], mode == "pristine"
    sites = make_sites(inputs, dt, experts, rank)
    old, new = old_and_new_routes(inputs, top_k, experts)
    for s in sites:
        if pristine:
            s["W_base"] = s["W0"]
            s["W"].fill_(float("nan"))  # every element must be rewritten from W_base
        else:  # the state after merging `old`, as stored
            s["W"].copy_((s["W0"].double() + delta(s, *old)).to(dt))
    table = kernels.sites_to_device(sites)
    max_out, max_in = max(o for o, _ in SHAPES), max(i for _, i in SHAPES)
    starts = [s["W_base"] if pristine else s["W"].clone() for s in sites]
    old_ids, old_gates = old[0].clone(), old[1].clone()
    kernels.switch(dt, table, len(sites), max_out, max_in, *new, old_ids, old_gates, update_old=True)
    torch.cuda.synchronize()
    check_sites(sites, starts, new, old, pristine, dt, f"switch {dtype} E{experts} r{rank} k{top_k} {mode}", inputs)
    assert torch.equal(old_ids, new[0]) and torch.equal(old_gates, new[1]), "update_old did not copy the route"

    # the same route again: nothing is written (a poisoned W stays bitwise as it was)
    for s in sites:
        s["W"].fill_(float("nan"))
    before = [bits(s["W"]).clone() for s in sites]
    kernels.switch(dt, table, len(sites), max_out, max_in, *new, old_ids, old_gates, update_old=True)
    torch.cuda.synchronize()
    for k, (s, b) in enumerate(zip(sites, before)):
        assert torch.equal(bits(s["W"]), b), f"site {k}: the no-op switch (route unchanged) wrote W"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_switch_leaves_sites_beyond_the_limits_alone(kernels, inputs, dtype):
    """A site with out > max_out or in > max_in is skipped; the others are switched."""
    dt = DTYPES[dtype]
    sites = make_sites(inputs, dt, 8, 16, shapes=[(129, 257), (300, 257), (129, 300)])
    for s in sites:
        s["W_base"] = s["W0"]
    untouched = [s["W"].clone() for s in sites]
    new = single_route(inputs, 2, 8)
    old_ids = torch.full((2,), -1, dtype=torch.int32, device=new[0].device)
    old_gates = torch.zeros(2, dtype=torch.float32, device=new[0].device)
    kernels.switch(dt, kernels.sites_to_device(sites), 3, 129, 257, *new, old_ids, old_gates, update_old=True)
    torch.cuda.synchronize()
    check_sites(sites[:1], [sites[0]["W0"]], new, None, True, dt, f"switch {dtype} within the limits", inputs)
    for k in (1, 2):
        assert torch.equal(bits(sites[k]["W"]), bits(untouched[k])), f"site {k} {tuple(sites[k]['W'].shape)} beyond the limits was written"


@pytest.mark.parametrize("mode", ["pristine", "in_place"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_switch_graph_replay(kernels, inputs, dtype, mode):
    """Captured once (the decoder's step graph holds it), replayed after new routes are copied into
    the captured buffers; update_old keeps the old route on the device from replay to replay."""
    dt, pristine = DTYPES[dtype], mode == "pristine"
    experts, top_k = 8, 2
    sites = make_sites(inputs, dt, experts, 16, shapes=[(129, 257), (4096, 4096), (37, 7)])
    for s in sites:
        if pristine:
            s["W_base"] = s["W0"]
    table = kernels.sites_to_device(sites)
    new_ids, new_gates = single_route(inputs, top_k, experts)
    old_ids = torch.full((top_k,), -1, dtype=torch.int32, device=new_ids.device)
    old_gates = torch.zeros(top_k, dtype=torch.float32, device=new_ids.device)
    call = lambda: kernels.switch(dt, table, len(sites), 4096, 4096, new_ids, new_gates, old_ids, old_gates,  # noqa: E731
                                  update_old=True)
    call()  # the first call on a device caches its launch plan: outside capture
    torch.cuda.synchronize()
    graph, _ = capture(call)  # its warm-up calls repeat the route: no-ops
    for replay in range(3):
        old = (old_ids.clone(), old_gates.clone())
        new = single_route(inputs, top_k, experts)
        new_ids.copy_(new[0])
        new_gates.copy_(new[1])
        starts = [s["W0"] if pristine else s["W"].clone() for s in sites]
        if pristine:
            for s in sites:
                s["W"].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_sites(sites, starts, new, old, pristine, dt, f"switch {dtype} {mode} graph replay {replay}", inputs)
        assert torch.equal(old_ids, new[0]) and torch.equal(old_gates, new[1]), "update_old did not copy the route"
