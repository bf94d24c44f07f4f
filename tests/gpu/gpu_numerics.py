"""What every GPU check shares: fresh random inputs, NaN poison, and the error bound a result must meet.

A kernel result is compared with a float64 reference computed from the very inputs the kernel read
(already rounded to the dtype), element by element, so that a wrong row, column or tile edge
cannot hide in a norm. The bound of element i follows from the dtype and the magnitudes involved:

    |out_i - ref_i| <= 2 u(dtype) sum_v |v_i|  +  8 u(dtype) sum_w w_i  +  8 sqrt(K) u(float32) rss_i

  - v: each value of about the output's size rounded to the dtype on the way (the output itself,
    intermediates the kernel stores in the dtype), given as its float64 contribution to the output:
    one rounding is off by at most the unit roundoff u relative (2^-24 float32, 2^-11 float16,
    2^-8 bfloat16), plus half the smallest subnormal absolutely; 2x for second-order terms;
  - w: many independent roundings that reach the output through a sum (e.g. z = x A^T stored in the
    dtype, then B z), given as the root-sum-square of their contributions: the rounding errors add
    like a random walk, and 8x their standard deviation is beyond reach (Hoeffding: < 1e-13);
  - float32 accumulation of K products: the same random walk over the partial sums, about
    sqrt(K) u(float32) times rss_i, the root-sum-square of the products behind the output (the same
    float64 formula on squared inputs); a sum that cancels (a tiny output from large terms) keeps a
    large rss, so a near-zero reference cannot fail a right kernel.
For a plain bfloat16 output that is 2 * 2^-8 = 0.8% of each element; a wrong index, a dropped term
or an unwritten element is off by far more. NaN never passes. The failure message also gives
the relative error ||out - ref|| / ||ref|| of /work/.library/device/METHOD.md.
"""
from __future__ import annotations

import math
import os
import secrets
import zlib
from typing import Sequence

import torch

from adafuse_export.kernels.binding import capture_graph

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# half the smallest subnormal: a rounding into the subnormal range is off by up to this, absolutely
SUBNORMAL_HALF_STEP = {torch.float32: 2.0 ** -150, torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}
DEVICE = "cuda"

# One seed per session, printed with every failure so that the failing inputs can be drawn again.
SEED_ENV = "ADAFUSE_TEST_SEED"
SESSION_SEED = int(os.environ.get(SEED_ENV) or secrets.randbits(31))


class Inputs:
    """Fresh random inputs for one test: this session's seed mixed with the test's id."""

    def __init__(self, test_id: str, device: str = DEVICE):
        seed = SESSION_SEED * 2 ** 32 + zlib.crc32(test_id.encode())
        self.device = device
        self.cpu = torch.Generator().manual_seed(seed)
        self.on_device = torch.Generator(device=device).manual_seed(seed)
        self.rerun = f"{SEED_ENV}={SESSION_SEED}"

    def randn(self, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        """Normal values times `scale`, drawn in float32 on the device, stored in `dtype`."""
        return (torch.randn(*shape, generator=self.on_device, device=self.device) * scale).to(dtype)

    def route(self, rows: int, top_k: int, experts: int, invalid: bool = False, normalized: bool = True):
        """Per row top_k expert ids (distinct while top_k <= experts) and positive gates (summing to 1
        when `normalized`); `invalid`: row 0's last id is -1, which must contribute nothing."""
        if top_k <= experts:
            ids = torch.stack([torch.randperm(experts, generator=self.cpu)[:top_k] for _ in range(rows)])
        else:
            ids = torch.randint(0, experts, (rows, top_k), generator=self.cpu)
        if invalid and rows > 0:
            ids[0, -1] = -1
        gates = torch.rand(rows, top_k, generator=self.cpu) + 0.1
        if normalized:
            gates = gates / gates.sum(1, keepdim=True)
        return ids.to(torch.int32).to(self.device), gates.float().to(self.device)

    def randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.cpu))

    def permutation(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.cpu)


def poisoned(*shape: int, dtype: torch.dtype, device: str = DEVICE) -> torch.Tensor:
    """An output buffer full of NaN: an element the kernel does not write stays NaN and fails."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def poisoned_workspace(nbytes: int) -> torch.Tensor:
    """Workspace bytes 0xFF: NaN as float32, -1 as int32, so a read before a write shows."""
    return torch.full((nbytes,), 255, dtype=torch.uint8, device=DEVICE)


def norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double()))


def error_bound(dtype: torch.dtype, rounded: Sequence[torch.Tensor], rss: torch.Tensor, terms: int,
                spread: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The bound of the module docstring, per element: `rounded` the values rounded to `dtype` on the
    way (float64 contributions to the output), `spread` the root-sum-squares of many roundings summed
    into it, `rss` the root-sum-square of the products behind each output, `terms` their number (K)."""
    u, u32 = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[torch.float32]
    bound = 8.0 * math.sqrt(terms) * u32 * rss.double().abs()
    for v in rounded:
        bound = bound + 2.0 * (u * v.double().abs() + SUBNORMAL_HALF_STEP[dtype])
    for w in spread:
        bound = bound + 8.0 * u * w.double().abs()
    return bound


def assert_close(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str, inputs: Inputs) -> None:
    """out (any dtype) against the float64 reference, every element within its bound; NaN fails."""
    got = out.detach().double().to(ref.device)
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    unwritten = int((~torch.isfinite(got)).sum())
    assert unwritten == 0, (f"{what}: {unwritten} of {got.numel()} elements are NaN/inf (not written, or "
                            f"read from poison); inputs {inputs.rerun}")
    err = (got - ref).abs()
    over = err > bound.expand_as(err)
    if bool(over.any()):
        flat = int(torch.argmax(torch.where(over, err / bound.expand_as(err), 0.0)))
        at = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
        raise AssertionError(
            f"{what}: {int(over.sum())} of {err.numel()} elements exceed their error bound; worst at {at}: "
            f"out {got[at]:.6g}, reference {ref[at]:.6g}, |diff| {err[at]:.3e} > bound {bound.expand_as(err)[at]:.3e} "
            f"(||out - ref|| / ||ref|| = {norm(got - ref) / max(norm(ref), 1e-300):.2e}); inputs {inputs.rerun}")


def capture(fn):
    """fn() warmed up twice, then captured in a CUDA graph: (graph, what the captured call returned)."""
    return capture_graph(fn, warmups=2)
