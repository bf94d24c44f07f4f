"""What an adafuse plugin node computes, outside TensorRT: its fields, its checks, two implementations.

    y = x W^T (+ bias) + scale * sum_j gates[..., j] * B[ids[..., j]] (A[ids[..., j]] x)

AdafuseLoraLinear and AdafuseSwitchLinear share fields, inputs and result, so they share this.

- `parser_fields(node)`: the fields as TensorRT's ONNX parser hands them to the plugin creator
  (INT attribute -> kINT32 of length 1, FLOAT -> kFLOAT32), checked like
  plugins/common/adafuseLinearConfig.cpp `LinearConfig::validate`.
- `check_inputs(...)`: the shape checks of `configurePlugin`/`onShapeChange`, plus the expert ids'
  range, which the plugin leaves to its caller: an out-of-range id is refused here, never dropped.
- `lora_linear_cpu`: numpy, float32 accumulation (as the kernels accumulate).
- `lora_linear_cuda`: the kernels the plugins launch (plugins/kernels through kernels/binding.py).

Both take float32 arrays holding the node's values (float16/bfloat16 widen to float32 exactly)
and return float32 holding values of the node's dtype.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..errors import AdafuseError
from ..onnx import plugin_ops

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class LinearFields:
    in_features: int
    out_features: int
    num_experts: int
    rank: int
    top_k: int
    scale: float  # a float32 value
    has_bias: int
    weight_dtype: int = plugin_ops.WEIGHT_AS_DTYPE  # FP8 W: the session hands the op W dequantized (plugin_ops_ort)


def parser_fields(node) -> LinearFields:
    """The node's fields as the plugin creator receives them from TensorRT's ONNX parser, validated."""
    raw = plugin_ops.node_fields(node)  # exactly FIELDS, INT/FLOAT kinds, input count vs has_bias
    where = f"{node.op_type} node '{node.name}'"
    for name, kind in plugin_ops.FIELDS:
        if kind == "int" and not INT32_MIN <= raw[name] <= INT32_MAX:
            raise AdafuseError(f"{where}: field '{name}' = {raw[name]} does not fit the plugin's int32 field")
    # ONNX stores FLOAT attributes as float32, so this is the kFLOAT32 value TensorRT passes
    raw["scale"] = float(np.float32(raw["scale"]))
    f = LinearFields(**raw)
    for name in ("in_features", "out_features", "num_experts", "rank"):
        if getattr(f, name) <= 0:
            raise AdafuseError(f"{where}: field '{name}' expected > 0, found {getattr(f, name)}")
    if not 1 <= f.top_k <= f.num_experts:
        raise AdafuseError(f"{where}: field 'top_k' expected in [1, num_experts={f.num_experts}], found {f.top_k}")
    if not math.isfinite(f.scale):
        raise AdafuseError(f"{where}: field 'scale' expected a finite float, found {f.scale}")
    if f.has_bias not in (0, 1):
        raise AdafuseError(f"{where}: field 'has_bias' expected 0 or 1, found {f.has_bias}")
    if f.weight_dtype not in plugin_ops.WEIGHT_DTYPES.values():
        raise AdafuseError(f"{where}: field 'weight_dtype' expected one of {sorted(plugin_ops.WEIGHT_DTYPES.values())} "
                           f"(adafuse_weight_dtype), found {f.weight_dtype}")
    if f.weight_dtype == plugin_ops.WEIGHT_FP8_E4M3 and f.in_features % 16:
        raise AdafuseError(f"{where}: field 'in_features' = {f.in_features} must be a multiple of 16 with weight_dtype 1 "
                           f"(16 FP8 weights per 16-byte load, ADAFUSE_WEIGHT_FP8_E4M3 in adafuse_kernels.h)")
    if f.weight_dtype == plugin_ops.WEIGHT_FP8_E4M3 and node.op_type != plugin_ops.STRATEGIES["fused"]:
        raise AdafuseError(f"{where}: field 'weight_dtype' = 1 (fp8 W): {node.op_type} takes W in the dtype of x only "
                           f"(no FP8 weight_scale input); FP8 weights run with {plugin_ops.STRATEGIES['fused']} "
                           "(--strategy fused) or the native backend's switch strategy")
    if f.out_features * f.in_features > INT32_MAX:
        raise AdafuseError(f"{where}: out_features*in_features = {f.out_features * f.in_features} exceeds the int32 "
                           f"element count the kernels index with")
    return f


def _expect(name: str, shape: tuple[int, ...], expected: tuple[tuple[int, str], ...]) -> None:
    """shape == the expected (value, meaning) per dimension, else ValueError like the plugin's message."""
    if len(shape) != len(expected):
        raise ValueError(f"{name} expected {len(expected)} dimensions, found {len(shape)} (shape {list(shape)})")
    for axis, (value, meaning) in enumerate(expected):
        if shape[axis] != value:
            raise ValueError(f"{name} dimension {axis} expected {meaning}={value}, found {shape[axis]} (shape {list(shape)})")


def check_inputs(f: LinearFields, x, W, A, B, ids, gates, bias) -> None:
    """Raise ValueError when an input does not fit the fields, or an expert id is out of range."""
    if x.ndim < 1:
        raise ValueError("input 0 (x) expected at least 1 dimension, found 0")
    lead = tuple((d, "the matching leading dimension of x") for d in x.shape[:-1])
    _expect("input 0 (x)", x.shape, lead + ((f.in_features, "in_features"),))
    _expect("input 1 (W)", W.shape, ((f.out_features, "out_features"), (f.in_features, "in_features")))
    _expect("input 2 (A)", A.shape, ((f.num_experts, "num_experts"), (f.rank, "rank"), (f.in_features, "in_features")))
    _expect("input 3 (B)", B.shape, ((f.num_experts, "num_experts"), (f.out_features, "out_features"), (f.rank, "rank")))
    _expect("input 4 (expert_ids)", ids.shape, lead + ((f.top_k, "top_k"),))
    _expect("input 5 (gates)", gates.shape, lead + ((f.top_k, "top_k"),))
    if f.has_bias:
        _expect("input 6 (bias)", bias.shape, ((f.out_features, "out_features"),))
    bad = (ids < 0) | (ids >= f.num_experts)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"input 4 (expert_ids) holds {int(ids[where])} at {list(where)}, outside [0, num_experts="
                         f"{f.num_experts}) ({int(bad.sum())} of {ids.size} ids out of range)")


def lora_linear_cpu(f: LinearFields, x, W, A, B, ids, gates, bias, dtype: str) -> np.ndarray:
    """numpy, float32 accumulation; tokens grouped by expert like the kernels' many-row path."""
    x2 = x.reshape(-1, f.in_features).astype(np.float32, copy=False)
    y = x2 @ W.astype(np.float32, copy=False).T
    if f.has_bias:
        y += bias.astype(np.float32, copy=False)
    ids2, g2 = ids.reshape(-1, f.top_k), gates.reshape(-1, f.top_k).astype(np.float32, copy=False)
    delta = np.zeros_like(y)
    for e in np.unique(ids2):
        rows, slots = np.nonzero(ids2 == e)
        u = (x2[rows] @ A[e].astype(np.float32, copy=False).T) @ B[e].astype(np.float32, copy=False).T
        np.add.at(delta, rows, g2[rows, slots, None] * u)
    y += np.float32(f.scale) * delta
    return round_to(y.reshape(x.shape[:-1] + (f.out_features,)), dtype)


@functools.cache
def cuda_kernels():
    """The kernel library, built with nvcc on first use (load_kernels re-hashes sources on every call)."""
    from ..kernels import load_kernels

    return load_kernels()


def lora_linear_cuda(f: LinearFields, x, W, A, B, ids, gates, bias, dtype: str) -> np.ndarray:
    """Kernels.lora_linear (adafuse_lora_linear from plugins/kernels) on the current CUDA device."""
    import torch

    kernels = cuda_kernels()
    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]

    def dev(a, to=tdtype):  # the float32 values are exact in `to`, so this cast is exact
        return torch.from_numpy(np.ascontiguousarray(a)).to(device="cuda").to(to)

    y = kernels.lora_linear(dev(x.reshape(-1, f.in_features)), dev(W), dev(A), dev(B),
                            dev(ids.reshape(-1, f.top_k), torch.int32), dev(gates.reshape(-1, f.top_k), torch.float32),
                            f.scale, bias=dev(bias) if f.has_bias else None)
    return y.float().cpu().numpy().reshape(x.shape[:-1] + (f.out_features,))


IMPLEMENTATIONS = {"cpu": lora_linear_cpu, "cuda": lora_linear_cuda}
DESCRIPTIONS = {"cpu": "cpu (numpy, float32 accumulation)",
                "cuda": "cuda (plugins/kernels adafuse_lora_linear, the plugins' kernels)"}


def round_to(y: np.ndarray, dtype: str) -> np.ndarray:
    """float32 holding y rounded to `dtype` (round to nearest even, as a cast on the GPU)."""
    if dtype == "float32":
        return y.astype(np.float32, copy=False)
    if dtype == "float16":
        return y.astype(np.float16).astype(np.float32)
    import ml_dtypes  # installed with onnx

    return y.astype(ml_dtypes.bfloat16).astype(np.float32)
