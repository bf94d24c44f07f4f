"""FP8 (e4m3) base weights: per-output-channel quantization on the host.

One definition for the kernels' tests, the benchmarks and the writers: W [out, in] becomes
q [out, in] float8_e4m3fn and scale [out] float32 with

    scale[o] = max_i |W[o, i]| / 448        (448: e4m3's largest finite value; 1 for an all-zero row)
    q[o, i]  = e4m3(W[o, i] / scale[o])     (round to nearest, ties to even; |q| <= 448)

so W ~ q * scale[:, None] (dequantize). The quotient is W / scale in float64 (from the float32
scale), rounded to float32 and then to e4m3 (torch's own cast, round to nearest even). The kernels
(adafuse_lora_linear with ADAFUSE_WEIGHT_FP8_E4M3) compute (x q^T) * scale in float32.
"""
from __future__ import annotations

from typing import Tuple

import torch

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn


class QuantizeError(ValueError):
    """A weight that cannot be quantized (shape, dtype or non-finite values); the message names it."""


def quantize_fp8_per_channel(weight: torch.Tensor, name: str = "weight") -> Tuple[torch.Tensor, torch.Tensor]:
    """(q [out, in] torch.float8_e4m3fn, scale [out] torch.float32) of a 2-D floating weight, on its device."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise QuantizeError(f"{name}: FP8 quantization takes a 2-D [out, in] weight, got {shape}")
    if not weight.is_floating_point() or weight.dtype == torch.float8_e4m3fn:
        raise QuantizeError(f"{name}: FP8 quantization takes a float32/float16/bfloat16 weight, got {weight.dtype}")
    w = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise QuantizeError(f"{name}: {bad} non-finite value(s); FP8 quantization needs finite weights")
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / FP8_E4M3_MAX, torch.ones_like(absmax)).to(torch.float32)
    quotient = (w / scale.to(torch.float64)[:, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return quotient.to(torch.float32).to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """q * scale[:, None] in dtype (float64 by default: the reference the kernels are judged against)."""
    if q.dtype != torch.float8_e4m3fn or q.dim() != 2 or scale.shape != (q.shape[0],):
        raise QuantizeError(f"dequantize_fp8 takes q [out, in] float8_e4m3fn and scale [out], got q {q.dtype} "
                            f"{tuple(q.shape)} and scale {tuple(scale.shape)}")
    return q.to(dtype) * scale.to(dtype)[:, None]
