"""adafuse_lora_linear (the routed fused linear) against a float64 reference, on the GPU.

y = x W^T (+ bias) + scale * sum_j gates[:, j] * (x A[e]^T) B[e]^T, e = expert_ids[:, j], over
dtype x shape (odd sizes, the 7B decoder's stacked sites) x rows (the one-row, few-rows and
many-rows paths) x rank x experts x top-k, with bias, a misaligned x and an invalid expert id;
without adapter (the dense baseline); captured in a CUDA graph and replayed on new inputs; and as a
chain of dependent calls (programmatic dependent launches). Outputs and workspaces are poisoned
before each call; the bound is gpu_numerics.error_bound.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from adafuse_export.kernels.binding import GEMV1_SHAPES

from gpu_numerics import DEVICE, DTYPES, Inputs, assert_close, capture, error_bound, poisoned, poisoned_workspace

pytestmark = pytest.mark.gpu

SHAPES = [(1, 1), (7, 37), (37, 7), (4095, 4096), (4096, 4095), (4096, 4096), (11008, 4096)]  # (in, out)
ROWS = [1, 3, 8, 12, 16, 17, 64, 512]  # one row, few rows (<= 16), many rows
RANKS = [1, 3, 16, 64, 128]
EXPERTS = [1, 8, 64]
TOP_K = [1, 2, 3, 4]
SCALE = 1.5


@dataclass(frozen=True)
class Case:
    dtype: str
    in_f: int
    out_f: int
    rows: int
    rank: int = 16
    experts: int = 8
    top_k: int = 2
    bias: bool = True
    misaligned: bool = False
    invalid_id: bool = False
    gemv1: str = "auto"  # the one-row kernel's shape (adafuse_lora_options.gemv1)

    @property
    def id(self) -> str:
        return (f"{self.dtype}-{self.in_f}x{self.out_f}-rows{self.rows}-r{self.rank}-E{self.experts}-k{self.top_k}"
                + "-bias" * self.bias + "-misaligned" * self.misaligned + "-invalid_id" * self.invalid_id
                + (f"-{self.gemv1}" if self.gemv1 != "auto" else ""))


def params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


def sweep_cases():
    """dtype x shape x rows; rank, experts, top-k, bias, a misaligned x and an invalid id cycle along."""
    out = []
    for c, (dtype, (in_f, out_f), rows) in enumerate(itertools.product(DTYPES, SHAPES, ROWS)):
        if dtype == "fp32" and in_f * out_f > 4096 * 4096 and rows == 512:
            continue  # the fp32 SIMT tile at 11008 x 4096 x 512 rows adds minutes, no new path
        out.append(Case(dtype, in_f, out_f, rows, RANKS[c % len(RANKS)], EXPERTS[(c // 2) % len(EXPERTS)],
                        TOP_K[c % len(TOP_K)], bias=c % 3 != 0, misaligned=c % 7 == 3, invalid_id=c % 11 == 5))
    return out


def coverage_cases():
    """Every rank x experts x top-k on odd shapes, at one, few and many rows."""
    return [Case(dtype, 37 if k % 2 else 4095, 129, [1, 8, 64][k % 3], r, e, k)
            for dtype in ("bf16", "fp32") for r in RANKS for e in EXPERTS for k in TOP_K]


def limit_cases():
    """A prefill chunk's rows, and the experts / rank limits (up to E * rank = 1M extra K columns)."""
    return ([Case(dtype, 4096, 4095, 2048, 16, 8, 2, invalid_id=True) for dtype in DTYPES]
            + [Case(dtype, 37, 129, rows, r, e, 8) for dtype in ("bf16", "fp32")
               for (e, r, rows) in [(256, 8, 17), (256, 4096, 17), (2, 4096, 64), (256, 1, 64)]])


def site_cases():
    """The 7B decoder's stacked sites (qkv, gate_up, down) at decode rows, bf16."""
    return [Case("bf16", in_f, out_f, rows, r, 8, 2, bias=False)
            for (in_f, out_f) in [(4096, 12288), (4096, 22016), (11008, 4096)] for rows in (1, 8) for r in (48, 192)]


@dataclass
class Operands:
    x: torch.Tensor
    W: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None
    ids: torch.Tensor
    gates: torch.Tensor


def operands(case: Case, inputs: Inputs) -> Operands:
    """Random operands scaled so that x W^T and the adapter term are both O(1) per element."""
    dt = DTYPES[case.dtype]
    rows, in_f, out_f, r, e = case.rows, case.in_f, case.out_f, case.rank, case.experts
    x = inputs.randn(rows, in_f, dtype=dt)
    if case.misaligned:  # the same values one element into a buffer: x.data_ptr() is not 16-byte aligned
        buf = torch.empty(rows * in_f + 1, dtype=dt, device=x.device)
        buf[1:].copy_(x.reshape(-1))
        x = buf[1:].view(rows, in_f)
    ids, gates = inputs.route(rows, case.top_k, e, invalid=case.invalid_id)
    return Operands(x, inputs.randn(out_f, in_f, dtype=dt, scale=in_f ** -0.5),
                    inputs.randn(e, r, in_f, dtype=dt, scale=in_f ** -0.5), inputs.randn(e, out_f, r, dtype=dt, scale=r ** -0.5),
                    inputs.randn(out_f, dtype=dt) if case.bias else None, ids, gates)


@dataclass
class Reference:
    y: torch.Tensor          # float64 result
    adapter: torch.Tensor    # its adapter term alone
    rss: torch.Tensor        # root-sum-square of the products behind each output
    z_rss: torch.Tensor      # root-sum-square of B[e][o, q] * z[q]: z = scale * gate * A x, stored in the dtype
    terms: int               # products accumulated per output


def reference(op: Operands, scale: float, adapter: bool = True) -> Reference:
    """The float64 result on the GPU (upcast operands), row groups per expert and top-k slot."""
    x, W, A, B = op.x.double(), op.W.double(), op.A.double(), op.B.double()
    base = x @ W.T + (op.bias.double() if op.bias is not None else 0.0)
    base_sq = (x * x) @ (W * W).T + (op.bias.double() ** 2 if op.bias is not None else 0.0)
    lora, lora_sq, z_sq = (torch.zeros_like(base) for _ in range(3))
    ids, gates = op.ids.long(), op.gates.double()
    if adapter:
        for j in range(ids.shape[1]):
            for e in torch.unique(ids[:, j]).tolist():
                if not 0 <= e < A.shape[0]:
                    continue  # an invalid id contributes nothing
                n = (ids[:, j] == e).nonzero().squeeze(1)
                c = scale * gates[n, j, None]
                z = c * (x[n] @ A[e].T)
                lora[n] += z @ B[e].T
                lora_sq[n] += (c * c) * ((x[n] * x[n]) @ (A[e] * A[e]).T) @ (B[e] * B[e]).T
                z_sq[n] += (z * z) @ (B[e] * B[e]).T
    terms = x.shape[1] + (ids.shape[1] * A.shape[1] if adapter else 0)
    return Reference(base + lora, lora, (base_sq + lora_sq).sqrt(), z_sq.sqrt(), terms)


def bound(ref: Reference, dtype: torch.dtype) -> torch.Tensor:
    # rounded to the dtype: the output; and z (the many-rows path's extra K columns), summed through B
    return error_bound(dtype, [ref.y], ref.rss, ref.terms, spread=[ref.z_rss])


def assert_adapter_visible(ref: Reference, limit: torch.Tensor, what: str) -> None:
    """The adapter term must exceed the bound on most elements, or a kernel that dropped it could pass."""
    if ref.y.numel() >= 64:  # a few elements may all be small by chance
        seen = float((ref.adapter.abs() > limit).double().mean())
        assert seen > 0.5, f"{what}: the adapter term exceeds the error bound on only {seen:.0%} of the elements"


def run_and_check(kernels, case: Case, inputs: Inputs, adapter: bool = True) -> None:
    dt = DTYPES[case.dtype]
    op = operands(case, inputs)
    y = poisoned(case.rows, case.out_f, dtype=dt)
    ws = poisoned_workspace(kernels.lora_linear_workspace_size(case.rows, case.in_f, case.out_f, case.experts,
                                                               case.rank, case.top_k))
    if adapter:
        kernels.lora_linear(op.x, op.W, op.A, op.B, op.ids, op.gates, SCALE, bias=op.bias, out=y, workspace=ws,
                            gemv1=case.gemv1)
    else:
        kernels.linear(op.x, op.W, bias=op.bias, out=y, workspace=ws, gemv1=case.gemv1)
    torch.cuda.synchronize()
    ref = reference(op, SCALE, adapter)
    limit = bound(ref, dt)
    what = f"lora_linear {case.id}" if adapter else f"linear (no adapter) {case.id}"
    # one row, top-1, its only id invalid: no adapter term at all (the case checks that it is skipped)
    if adapter and bool((op.ids >= 0).any()):
        assert_adapter_visible(ref, limit, what)
    assert_close(y, ref.y, limit, what, inputs)


@pytest.mark.parametrize("case", params(sweep_cases()))
def test_lora_linear_sweep(kernels, inputs, case):
    run_and_check(kernels, case, inputs)


@pytest.mark.parametrize("case", params(coverage_cases()))
def test_lora_linear_ranks_experts_top_k(kernels, inputs, case):
    run_and_check(kernels, case, inputs)


@pytest.mark.parametrize("case", params(limit_cases()))
def test_lora_linear_prefill_and_limits(kernels, inputs, case):
    run_and_check(kernels, case, inputs)


@pytest.mark.parametrize("case", params(site_cases()))
def test_lora_linear_7b_sites(kernels, inputs, case):
    run_and_check(kernels, case, inputs)


ONE_ROW_SHAPES = [s for s in GEMV1_SHAPES if s != "auto"]


@pytest.mark.parametrize("adapter", [True, False], ids=["lora", "dense"])
@pytest.mark.parametrize("case", params(Case(dtype, in_f, out_f, 1, rank, 8, 2, bias=(in_f + rank) % 2 == 1,
                                             misaligned=in_f == 37, gemv1=shape)
                                        for dtype in ("bf16", "fp16") for shape in ONE_ROW_SHAPES
                                        for (in_f, out_f, rank) in [(4096, 12288, 16), (11008, 4096, 16),
                                                                    (4096, 4095, 64), (48, 129, 3), (37, 7, 16)]))
def test_one_row_shapes(kernels, inputs, case, adapter):
    """Every one-row kernel shape, with and without adapter, at the 7B's r16
    sites and odd sizes (a misaligned x takes the fallback)."""
    run_and_check(kernels, case, inputs, adapter=adapter)


@pytest.mark.parametrize("case", params(Case(dtype, in_f, out_f, rows, bias=rows != 3)
                                         for dtype in DTYPES for (in_f, out_f) in SHAPES
                                         for rows in (1, 3, 8, 16, 17, 64, 130, 512)))
def test_linear_without_adapter(kernels, inputs, case):
    """A = B = NULL: y = x W^T (+ bias): the few-rows kernels up to 16 rows, the many-rows GEMM with
    K = in alone above (split over K up to 64 rows)."""
    run_and_check(kernels, case, inputs, adapter=False)


@pytest.mark.parametrize("case", params(Case(dtype, in_f, out_f, rows, r, e, k)
                                         for dtype in DTYPES
                                         for (rows, in_f, out_f, e, r, k) in [(17, 4095, 257, 8, 16, 2),
                                                                              (512, 4096, 1024, 8, 16, 2),
                                                                              (64, 256, 129, 64, 3, 4),
                                                                              (8, 4096, 512, 8, 16, 2),
                                                                              (1, 4096, 4096, 8, 16, 2)]))
def test_lora_linear_graph_replay(kernels, inputs, case):
    """Captured once, replayed on new x and routes copied into the captured buffers: every replay
    rewrites every output (poisoned before each) with the new result."""
    dt = DTYPES[case.dtype]
    op = operands(case, inputs)
    y = torch.empty(case.rows, case.out_f, dtype=dt, device=DEVICE)
    ws = torch.empty(kernels.lora_linear_workspace_size(case.rows, case.in_f, case.out_f, case.experts, case.rank,
                                                        case.top_k), dtype=torch.uint8, device=DEVICE)
    graph, _ = capture(lambda: kernels.lora_linear(op.x, op.W, op.A, op.B, op.ids, op.gates, 0.75, bias=op.bias,
                                                   out=y, workspace=ws))
    for replay in range(2):
        op.x.copy_(inputs.randn(case.rows, case.in_f, dtype=dt))
        ids, gates = inputs.route(case.rows, case.top_k, case.experts)
        op.ids.copy_(ids)
        op.gates.copy_(gates)
        y.fill_(float("nan"))
        ws.fill_(255)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference(op, 0.75)
        assert_close(y, ref.y, bound(ref, dt), f"lora_linear {case.id}, graph replay {replay}", inputs)


@pytest.mark.parametrize("adapter", [True, False], ids=["adapter", "no_adapter"])
@pytest.mark.parametrize("d,rows,rank", [(4096, 1, 16), (4096, 8, 64), (129, 1, 3), (136, 3, 16)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_lora_linear_chain(kernels, inputs, dtype, d, rows, rank, adapter):
    """Three dependent calls back to back (each a programmatic dependent launch of the one before:
    its shrink may start early but must read the previous output only once it is complete), eager
    and as a CUDA graph replayed on new inputs with every intermediate output poisoned. Each link is
    checked against the float64 result of its own input, so a link that read its input early fails."""
    dt = DTYPES[dtype]
    experts, top_k = 8, 2
    links = [(inputs.randn(d, d, dtype=dt, scale=d ** -0.5), inputs.randn(experts, rank, d, dtype=dt, scale=d ** -0.5),
              inputs.randn(experts, d, rank, dtype=dt, scale=rank ** -0.5)) for _ in range(3)]
    x = torch.empty(rows, d, dtype=dt, device=DEVICE)
    ids = torch.empty(rows, top_k, dtype=torch.int32, device=DEVICE)
    gates = torch.empty(rows, top_k, dtype=torch.float32, device=DEVICE)

    def chain() -> list[torch.Tensor]:
        h, outs = x, []
        for W, A, B in links:
            h = kernels.lora_linear(h, W, A, B, ids, gates, 0.5) if adapter else kernels.linear(h, W)
            outs.append(h)
        return outs

    def fresh() -> None:
        x.copy_(inputs.randn(rows, d, dtype=dt))
        new_ids, new_gates = inputs.route(rows, top_k, experts)
        ids.copy_(new_ids)
        gates.copy_(new_gates)

    def check(outs: list[torch.Tensor], how: str) -> None:
        h = x
        for i, ((W, A, B), out) in enumerate(zip(links, outs)):
            ref = reference(Operands(h, W, A, B, None, ids, gates), 0.5, adapter)
            assert_close(out, ref.y, bound(ref, dt), f"chain link {i} ({how})", inputs)
            h = out

    fresh()
    eager = chain()
    torch.cuda.synchronize()
    check(eager, "eager")
    graph, outs = capture(chain)
    for replay in range(3):
        fresh()
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(outs, f"graph replay {replay}")
