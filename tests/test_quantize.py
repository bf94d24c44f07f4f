"""adafuse_export.quantize: per-output-channel FP8 (e4m3) quantization, against an independent
enumeration of every finite e4m3 value (round to nearest, ties to even) in float64."""
from __future__ import annotations

import itertools

import pytest
import torch

from adafuse_export.quantize import FP8_E4M3_MAX, QuantizeError, dequantize_fp8, quantize_fp8_per_channel


def _e4m3_values() -> torch.Tensor:
    """Every finite non-negative e4m3 value from the format's definition (bias 7, 3 mantissa bits,
    exponent 15 with mantissa 7 is NaN), ascending, float64."""
    vals = []
    for e, m in itertools.product(range(16), range(8)):
        if e == 15 and m == 7:
            continue
        vals.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(sorted(vals), dtype=torch.float64)


def _round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3 value of each element (float64), ties to the even mantissa."""
    grid = _e4m3_values()
    mag = v.abs().clamp(max=FP8_E4M3_MAX)
    hi = torch.searchsorted(grid, mag).clamp(max=grid.numel() - 1)
    lo = (hi - 1).clamp(min=0)
    dlo, dhi = mag - grid[lo], grid[hi] - mag
    # the even one of two neighbours has the even index (index = 8 * e + m, so parity of m)
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    return torch.where(pick_hi, grid[hi], grid[lo]) * torch.sign(v)


def test_grid_matches_format_limits():
    g = _e4m3_values()
    assert g.numel() == 127 and g[-1] == FP8_E4M3_MAX and g[1] == 2.0 ** -9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_matches_independent_rounding(dtype):
    g = torch.Generator().manual_seed(23)
    # rows of very different magnitudes, a heavy tail and a few tiny values (e4m3 denormals)
    w = torch.randn(37, 301, generator=g, dtype=torch.float64) * torch.logspace(-4, 2, 37, dtype=torch.float64)[:, None]
    w[3, 5] *= 40.0
    w[7, :20] *= 1e-4
    w = w.to(dtype)
    q, scale = quantize_fp8_per_channel(w, "w")
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale.dtype == torch.float32 and scale.shape == (37,)
    wd = w.to(torch.float64)
    absmax = wd.abs().amax(dim=1)
    assert torch.equal(scale, (absmax / FP8_E4M3_MAX).to(torch.float32))
    quotient = (wd / scale.to(torch.float64)[:, None]).to(torch.float32).to(torch.float64)
    assert torch.equal(q.to(torch.float64), _round_e4m3(quotient))
    # every row's largest magnitude lands on (or next to) 448: the row's range is used
    assert bool((q.to(torch.float64).abs().amax(dim=1) >= 416).all())
    # the error bound of e4m3: half an ulp, 2^-4 relative for normals, 2^-10 * scale absolute below 2^-6
    err = (dequantize_fp8(q, scale) - wd).abs()
    bound = torch.maximum(wd.abs() * 2.0 ** -4, scale.to(torch.float64)[:, None] * 2.0 ** -10)
    assert bool((err <= bound * (1 + 1e-12)).all())


def test_ties_round_to_even():
    scale_row = torch.tensor([[448.0, 304.0, 272.0, 2.0 ** -10, 3 * 2.0 ** -10, -304.0]], dtype=torch.float32)
    q, scale = quantize_fp8_per_channel(scale_row)
    assert float(scale[0]) == 1.0
    assert q.to(torch.float64).tolist() == [[448.0, 320.0, 256.0, 0.0, 2.0 ** -8, -320.0]]


def test_zero_row_and_dequantize_dtype():
    w = torch.zeros(2, 16)
    w[1, 3] = -2.0
    q, scale = quantize_fp8_per_channel(w)
    assert scale.tolist() == [1.0, float(torch.tensor(2.0 / 448.0, dtype=torch.float32))]
    assert not bool(q[0].to(torch.float32).any())
    assert dequantize_fp8(q, scale, torch.float32).dtype == torch.float32
    assert float(dequantize_fp8(q, scale)[1, 3]) == pytest.approx(-2.0, rel=1e-7)


@pytest.mark.parametrize("bad, message", [
    (torch.ones(4), "w: FP8 quantization takes a 2-D [out, in] weight, got (4,)"),
    (torch.ones(2, 2, dtype=torch.int32), "w: FP8 quantization takes a float32/float16/bfloat16 weight, got torch.int32"),
    (torch.tensor([[1.0, float("nan")], [float("inf"), 0.0]]), "w: 2 non-finite value(s); FP8 quantization needs finite weights"),
])
def test_bad_weights_name_the_tensor(bad, message):
    with pytest.raises(QuantizeError) as e:
        quantize_fp8_per_channel(bad, "w")
    assert str(e.value) == message
