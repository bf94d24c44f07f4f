"""families/features.py: each definition, interpreted by both namespaces, gives the same numbers.

The PyTorch namespace runs the definition on tensors; the graph namespace emits it as ONNX nodes, which
ONNX Runtime runs. Inputs are fresh random values (never zeros), in float32 and float16; the definitions
are also checked against an independent float64 formula, so a definition that is wrong in both
namespaces the same way still fails."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from onnx import TensorProto

from adafuse_export.families import features
from adafuse_export.families.features import TORCH
from adafuse_export.onnx.graph import ELEM, Graph, torch_dtype
from adafuse_export.onnx.graph_xp import GraphNamespace
from adafuse_export.spec import ModelSpec

ort = pytest.importorskip("onnxruntime")
DTYPES = ("float32", "float16")
GEN = torch.Generator().manual_seed(7)


def randn(*shape, dtype="float32", scale=1.0):
    return (torch.randn(*shape, generator=GEN, dtype=torch.float64) * scale).to(torch_dtype(dtype))


def run_graph(build, inputs: dict[str, torch.Tensor]):
    """Build a one-feature graph with `build(xp, values) -> Value | tuple`, run it in ONNX Runtime."""
    g = Graph("feature", "float32")
    xp = GraphNamespace(g)
    elem = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.int64: TensorProto.INT64}
    values = {n: xp.value(g.input(n, elem[t.dtype], list(t.shape)), elem[t.dtype]) for n, t in inputs.items()}
    outs = build(xp, values)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for i, v in enumerate(outs):
        g.output(f"out{i}", v.name, v.elem, None)  # shapes left to ONNX Runtime
    model = g.model()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.numpy() for n, t in inputs.items()})
    return [torch.from_numpy(a) for a in got]


def close(a: torch.Tensor, b: torch.Tensor, dtype: str) -> bool:
    tol = {"float32": 2e-6, "float16": 2e-3}[dtype]
    return a.dtype == b.dtype and torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["rms", "rms_one_plus"])
def test_rms_norm(kind, dtype):
    x, w = randn(3, 5, 64, dtype=dtype), randn(64, dtype=dtype, scale=0.3) + 1
    want = features.rms_norm(TORCH, x, w, 1e-5, kind)
    got, = run_graph(lambda xp, v: features.rms_norm(xp, v["x"], v["w"], 1e-5, kind), {"x": x, "w": w})
    assert close(got, want, dtype)
    x64, w64 = x.double(), w.double()
    normed = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-5)
    formula = normed * (1 + w64 if kind == "rms_one_plus" else w64)
    assert close(want.double(), formula, dtype)  # same dtype (float64) on both sides: compare values


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["silu", "gelu_tanh"])
def test_activation(name, dtype):
    x = randn(4, 96, dtype=dtype, scale=3)
    want = features.activation(TORCH, name, x)
    got, = run_graph(lambda xp, v: features.activation(xp, name, v["x"]), {"x": x})
    assert close(got, want, dtype)
    x64 = x.double()
    formula = x64 / (1 + torch.exp(-x64)) if name == "silu" else \
        0.5 * x64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    assert close(want.double(), formula, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap(dtype):
    x = randn(2, 4, 7, 7, dtype=dtype, scale=5)
    for cap in (None, 1.5, 30.0):
        want = features.softcap(TORCH, x, cap)
        got, = run_graph(lambda xp, v: features.softcap(xp, v["x"], cap), {"x": x})
        assert close(got, want, dtype)
        formula = x.double() if cap is None else cap * torch.tanh(x.double() / cap)
        assert close(want.double(), formula, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_apply_rope(rotary_dim, dtype):
    x = randn(2, 4, 5, 16, dtype=dtype)
    angle = randn(2, 1, 5, rotary_dim // 2, dtype="float32", scale=3).double()
    cos = torch.cat([angle.cos()] * 2, -1).to(torch_dtype(dtype))
    sin = torch.cat([angle.sin()] * 2, -1).to(torch_dtype(dtype))
    want = features.apply_rope(TORCH, x, cos, sin, rotary_dim, 16)
    got, = run_graph(lambda xp, v: features.apply_rope(xp, v["x"], v["c"], v["s"], rotary_dim, 16),
                     {"x": x, "c": cos, "s": sin})
    assert close(got, want, dtype)
    # rotating each pair (x_i, x_{i + n/2}) by its angle, by hand in float64
    x64, half = x.double(), rotary_dim // 2
    a, b = x64[..., :half], x64[..., half:rotary_dim]
    c, s = cos.double()[..., :half], sin.double()[..., :half]
    formula = torch.cat([a * c - b * s, b * c + a * s, x64[..., rotary_dim:]], -1)
    assert close(want.double(), formula, dtype)


ROPES = {
    "default": {"rope_theta": 1e4},
    "llama3": {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "yarn": {"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    "longrope": {"model_type": "phi3", "original_max_position_embeddings": 8, "partial_rotary_factor": 0.5,
                 "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6],
                                  "long_factor": [1.0, 3.0, 9.0, 27.0]}},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ROPES))
def test_rope_tables(name, dtype):
    """The tables of each variant, rows on both sides of LongRoPE's switch in one batch."""
    cfg = {"model_type": "llama", "vocab_size": 8, "hidden_size": 64, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 64, **ROPES[name]}
    rope = ModelSpec.from_hf_config(cfg, "config.json").rope
    positions = torch.tensor([[0, 1, 2, 3], [9, 10, 11, 12]])
    want = features.rope_cos_sin(TORCH, rope, positions, torch_dtype(dtype))
    got = run_graph(lambda xp, v: features.rope_cos_sin(xp, rope, v["p"], ELEM[dtype]), {"p": positions})
    for a, b in zip(got, want):
        assert close(a, b, dtype)
    inv = np.asarray(rope.inv_freq(), dtype=np.float64)
    if rope.switch_at is not None:
        assert rope.switch_at == 8  # row 0 stays short, row 1 goes long
        inv = np.stack([inv, np.asarray(rope.long_inv_freq(), dtype=np.float64)])[:, None, :]
    angle = positions.double().numpy()[..., None] * inv
    formula = torch.from_numpy(np.cos(np.concatenate([angle, angle], -1)) * rope.attention_factor)
    assert close(want[0].double(), formula, dtype)


def test_namespaces_offer_the_same_operations():
    """Both namespaces implement every operation the Namespace protocol names (a definition using one
    that only one namespace has would fail in the other backend)."""
    ops = {n for n in vars(features.Namespace) if not n.startswith("_")}
    assert ops <= set(dir(TORCH)) and ops <= set(dir(GraphNamespace(Graph("g", "float32"))))
