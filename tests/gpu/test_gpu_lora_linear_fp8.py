"""adafuse_lora_linear with FP8 (e4m3) base weights against a float64 reference, on the GPU.

W is drawn in float32, quantized per output channel by adafuse_export.quantize (the writers' one
definition), and the reference uses the DEQUANTIZED weight q * scale in float64: the kernel must
compute (x q^T) * scale + bias + the LoRA term exactly up to float32 accumulation and the output's
rounding, so the bound is test_gpu_lora_linear's (gpu_numerics.error_bound), not a quantization
tolerance. Covered: bf16 and fp16 activations; odd output sizes; the one-row GEMV in every shape
(adafuse_lora_options.gemv1), the r64 sites' one-row SIMT path, the 2-16 rows tensor-core GEMV, the
many-rows GEMM (split over K up to 64 rows, 128 x 128 tiles above; with and without adapter);
graph replay on new inputs; a chain of dependent calls; the refusals. Outputs and workspaces are
poisoned before every call.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from adafuse_export.kernels.binding import GEMV1_SHAPES, AdafuseKernelError
from adafuse_export.quantize import dequantize_fp8, quantize_fp8_per_channel
from gpu_numerics import DEVICE, DTYPES, Inputs, assert_close, capture, poisoned, poisoned_workspace
from test_gpu_lora_linear import Operands, assert_adapter_visible, bound, reference

pytestmark = pytest.mark.gpu

SCALE = 1.5
# (in, out): in % 16 == 0 (FP8's condition), out odd or not; the 7B's stacked sites and o / down
# (24592, 37): x over the one-row GEMV's 47 KB of shared memory, so one row takes the SIMT GEMV
SHAPES = [(16, 7), (48, 129), (4096, 4095), (4096, 4096), (11008, 4096), (4096, 12288), (4096, 22016), (24592, 37)]
ROWS = [1, 3, 8, 12, 16, 17, 64, 130, 512]


@dataclass(frozen=True)
class Fp8Case:
    dtype: str
    in_f: int
    out_f: int
    rows: int
    rank: int = 16
    experts: int = 8
    top_k: int = 2
    bias: bool = True
    gemv1: str = "auto"

    @property
    def id(self) -> str:
        return (f"{self.dtype}-{self.in_f}x{self.out_f}-rows{self.rows}-r{self.rank}-E{self.experts}-k{self.top_k}"
                + "-bias" * self.bias + (f"-{self.gemv1}" if self.gemv1 != "auto" else ""))


def params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


@dataclass
class Fp8Operands:
    op: Operands            # x, A, B, bias, route of the dtype; W: the dequantized weight (float64)
    q: torch.Tensor         # [out, in] float8_e4m3fn
    wscale: torch.Tensor    # [out] float32


def fp8_weight(inputs: Inputs, out_f: int, in_f: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [out, in] float8_e4m3fn, its scales [out] float32): W ~ N(0, scale^2) drawn in float32, its rows
    times factors over two decades (so a wrong channel's scale shows), quantized per output channel."""
    channel = torch.logspace(-1, 1, out_f, device=DEVICE)[inputs.permutation(out_f).to(DEVICE)]
    w = inputs.randn(out_f, in_f, dtype=torch.float32, scale=scale) * channel[:, None]
    return quantize_fp8_per_channel(w, "W")


def fp8_operands(case: Fp8Case, inputs: Inputs) -> Fp8Operands:
    """Operands as test_gpu_lora_linear draws them (x W^T and the adapter term O(1) per element), W
    quantized (fp8_weight)."""
    dt = DTYPES[case.dtype]
    rows, in_f, out_f, r, e = case.rows, case.in_f, case.out_f, case.rank, case.experts
    q, wscale = fp8_weight(inputs, out_f, in_f, in_f ** -0.5)
    ids, gates = inputs.route(rows, case.top_k, e)
    op = Operands(inputs.randn(rows, in_f, dtype=dt), dequantize_fp8(q, wscale),
                  inputs.randn(e, r, in_f, dtype=dt, scale=in_f ** -0.5), inputs.randn(e, out_f, r, dtype=dt, scale=r ** -0.5),
                  inputs.randn(out_f, dtype=dt) if case.bias else None, ids, gates)
    return Fp8Operands(op, q, wscale)


def run_and_check(kernels, case: Fp8Case, inputs: Inputs, adapter: bool = True) -> None:
    dt = DTYPES[case.dtype]
    f = fp8_operands(case, inputs)
    op = f.op
    y = poisoned(case.rows, case.out_f, dtype=dt)
    ws = poisoned_workspace(kernels.lora_linear_workspace_size(case.rows, case.in_f, case.out_f, case.experts,
                                                               case.rank, case.top_k))
    if adapter:
        kernels.lora_linear(op.x, f.q, op.A, op.B, op.ids, op.gates, SCALE, bias=op.bias, out=y, workspace=ws,
                            gemv1=case.gemv1, weight_scale=f.wscale)
    else:
        kernels.linear(op.x, f.q, bias=op.bias, out=y, workspace=ws, gemv1=case.gemv1, weight_scale=f.wscale)
    torch.cuda.synchronize()
    ref = reference(op, SCALE, adapter)
    limit = bound(ref, dt)
    what = f"lora_linear FP8 W {case.id}" if adapter else f"linear FP8 W (no adapter) {case.id}"
    if adapter:
        assert_adapter_visible(ref, limit, what)
    assert_close(y, ref.y, limit, what, inputs)


def sweep_cases():
    out = []
    for i, (dtype, (in_f, out_f), rows) in enumerate(
            (d, s, r) for d in ("bf16", "fp16") for s in SHAPES for r in ROWS):
        if in_f * out_f > 4096 * 12288 and rows > 64:
            continue  # the largest sites at prefill rows add time, no new path
        out.append(Fp8Case(dtype, in_f, out_f, rows, rank=(16, 64, 3)[i % 3], experts=(8, 1, 64)[i % 3],
                           top_k=(2, 1, 4)[i % 3], bias=i % 2 == 0))
    return out


@pytest.mark.parametrize("case", params(sweep_cases()))
def test_fp8_lora_linear_sweep(kernels, inputs, case):
    run_and_check(kernels, case, inputs)


@pytest.mark.parametrize("case", params(Fp8Case(dtype, in_f, out_f, 1, rank, 8, 2, bias=False, gemv1=shape)
                                         for dtype in ("bf16", "fp16")
                                         for shape in [s for s in GEMV1_SHAPES if s != "auto"]
                                         for (in_f, out_f, rank) in [(4096, 12288, 16), (11008, 4096, 16),
                                                                     (4096, 4095, 64), (48, 129, 3)]))
def test_fp8_one_row_shapes(kernels, inputs, case):
    """Every one-row kernel shape, at the 7B's r16 sites and with odd sizes."""
    run_and_check(kernels, case, inputs)


@pytest.mark.parametrize("case", params(Fp8Case(dtype, in_f, out_f, rows, bias=rows != 3)
                                         for dtype in ("bf16", "fp16") for (in_f, out_f) in SHAPES[:5] + SHAPES[-1:]
                                         for rows in (1, 3, 16, 17, 64, 512)))
def test_fp8_linear_without_adapter(kernels, inputs, case):
    """A = B = NULL (the dense projections): the scale alone after x q^T, at every path."""
    run_and_check(kernels, case, inputs, adapter=False)


@pytest.mark.parametrize("case", params(Fp8Case(dtype, in_f, out_f, rows, r, e, k)
                                         for dtype in ("bf16", "fp16")
                                         for (rows, in_f, out_f, e, r, k) in [(1, 4096, 4096, 8, 16, 2),
                                                                              (1, 4096, 12288, 8, 64, 2),
                                                                              (8, 4096, 512, 8, 16, 2),
                                                                              (17, 4096, 257, 8, 16, 2),
                                                                              (512, 4096, 1024, 8, 16, 2)]))
def test_fp8_graph_replay(kernels, inputs, case):
    """Captured once, replayed on new x and routes: every replay rewrites every (poisoned) output."""
    dt = DTYPES[case.dtype]
    f = fp8_operands(case, inputs)
    op = f.op
    y = torch.empty(case.rows, case.out_f, dtype=dt, device=DEVICE)
    ws = torch.empty(kernels.lora_linear_workspace_size(case.rows, case.in_f, case.out_f, case.experts, case.rank,
                                                        case.top_k), dtype=torch.uint8, device=DEVICE)
    graph, _ = capture(lambda: kernels.lora_linear(op.x, f.q, op.A, op.B, op.ids, op.gates, 0.75, bias=op.bias,
                                                   out=y, workspace=ws, weight_scale=f.wscale))
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
        assert_close(y, ref.y, bound(ref, dt), f"lora_linear FP8 W {case.id}, graph replay {replay}", inputs)


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_fp8_chain(kernels, inputs, dtype, rows):
    """Three dependent FP8 calls back to back (programmatic dependent launches), each link checked
    against the float64 result of its own input: a link that read its input early fails."""
    dt, d, rank, experts, top_k = DTYPES[dtype], 4096, 16, 8, 2
    links = []
    for i in range(3):
        q, s = quantize_fp8_per_channel(inputs.randn(d, d, dtype=torch.float32, scale=d ** -0.5), f"W{i}")
        links.append((q, s, inputs.randn(experts, rank, d, dtype=dt, scale=d ** -0.5),
                      inputs.randn(experts, d, rank, dtype=dt, scale=rank ** -0.5)))
    x = inputs.randn(rows, d, dtype=dt)
    ids, gates = inputs.route(rows, top_k, experts)
    outs, h = [], x
    for q, s, A, B in links:
        h = kernels.lora_linear(h, q, A, B, ids, gates, 0.5, weight_scale=s)
        outs.append(h)
    torch.cuda.synchronize()
    h = x
    for i, ((q, s, A, B), out) in enumerate(zip(links, outs)):
        ref = reference(Operands(h, dequantize_fp8(q, s), A, B, None, ids, gates), 0.5)
        assert_close(out, ref.y, bound(ref, dt), f"FP8 chain link {i}", inputs)
        h = out


def test_fp8_refusals(kernels, inputs):
    """FP8 W is refused with one clear message where the kernels do not take it."""
    q, s = quantize_fp8_per_channel(inputs.randn(8, 32, dtype=torch.float32), "W")
    x = inputs.randn(2, 32, dtype=torch.bfloat16)
    with pytest.raises(AdafuseKernelError, match=r"FP8 W \[8, 32\] needs weight_scale \[8\] float32"):
        kernels.linear(x, q)
    with pytest.raises(AdafuseKernelError, match=r"FP8 W needs x of float16 or bfloat16 and in % 16 == 0, got x torch.float32"):
        kernels.linear(x.float(), q, weight_scale=s)
    q24, s24 = quantize_fp8_per_channel(inputs.randn(8, 24, dtype=torch.float32), "W")
    with pytest.raises(AdafuseKernelError, match=r"in % 16 == 0, got x torch.bfloat16 with in=24"):
        kernels.linear(inputs.randn(2, 24, dtype=torch.bfloat16), q24, weight_scale=s24)
    with pytest.raises(AdafuseKernelError, match=r"weight_scale is for FP8 W"):
        kernels.linear(x, q.to(torch.bfloat16), weight_scale=s)
    # a misaligned x passes the binding's checks; the library refuses it (invalid argument)
    buf = torch.empty(2 * 32 + 1, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(AdafuseKernelError) as e:
        kernels.linear(buf[1:].view(2, 32), q, weight_scale=s)
    assert e.value.status == 1


@pytest.fixture(scope="module")
def kernels_sm80():
    """The library built for sm_80 alone (machine code plus compute_80 PTX): on a Hopper GPU the driver compiles its
    PTX, so the kernels run their pre-sm_89 FP8 conversion (integer arithmetic in place of cvt.e4m3x2)."""
    from adafuse_export.kernels import build_library, load_kernels

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.fail("needs an sm_80+ GPU")
    return load_kernels(build_library(["80"]))


@pytest.mark.parametrize("case", params(Fp8Case(dtype, in_f, out_f, rows)
                                         for dtype in ("bf16", "fp16") for (in_f, out_f) in [(4096, 4095), (48, 129)]
                                         for rows in (1, 8, 64, 512)))
def test_fp8_sm80_conversion(kernels_sm80, inputs, case):
    """The sm_80 fallback of the e4m3 conversion, on every path, against the same float64 reference."""
    run_and_check(kernels_sm80, case, inputs)
