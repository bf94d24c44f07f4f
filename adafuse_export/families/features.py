"""The math of each model feature, written once over a small array namespace `xp`.

These functions are the definitions. The PyTorch reference calls them with
`TORCH` (values are torch tensors); the ONNX builder calls them with its graph namespace
(onnx/graph_xp.py: values are graph values and every operation adds a node). So a norm kind, an
activation, an attention extra or a RoPE variant (families/rope.py) is written in one module, plus its
tests; the CUDA kernels of the C++ runtime's native backend implement them (it refuses, at open, a feature
they do not cover).

What `xp` provides: arithmetic and comparison operators on its values (with Python numbers, which take
the value's dtype), and the functions named in `Namespace` below. `dtype` arguments are the namespace's
own dtype objects (torch dtypes, ONNX element types); `xp.float32` names float32.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .rope import Rope


class Namespace(Protocol):
    """The operations the definitions below use (both namespaces implement exactly these)."""
    @property
    def float32(self) -> Any: ...

    def cast(self, x, dtype): ...
    def dtype(self, x): ...
    def constant(self, tensor, name: str, like): ...
    def rsqrt(self, x): ...
    def mean_last(self, x): ...  # keepdim
    def amax_last(self, x): ...  # keepdim
    def tanh(self, x): ...
    def cos(self, x): ...
    def sin(self, x): ...
    def silu(self, x): ...
    def gelu_tanh(self, x): ...
    def where(self, cond, a, b): ...
    def unsqueeze_last(self, x): ...
    def cat_last(self, xs: list): ...
    def split_last(self, x, sizes: list[int]): ...


# ---- norms: families.base.NORMS ----------------------------------------------------------------------
def rms_norm(xp: Namespace, x, weight, eps: float, kind: str):
    """x / rms(x) computed in float32, then scaled: `rms` by w in x's dtype (Llama: w * x^ after the cast
    back), `rms_one_plus` by (1 + w) in float32 before the cast back (Gemma)."""
    h = xp.cast(x, xp.float32)
    h = h * xp.rsqrt(xp.mean_last(h * h) + eps)
    if kind == "rms_one_plus":
        return xp.cast(h * (xp.cast(weight, xp.float32) + 1.0), xp.dtype(x))
    if kind == "rms":
        return weight * xp.cast(h, xp.dtype(x))
    raise ValueError(f"norm kind {kind!r}")


# ---- MLP activations: families.base.ACTIVATIONS --------------------------------------------------------
def activation(xp: Namespace, name: str, x):
    """The activation applied to the MLP gate (silu: Llama's SwiGLU; gelu_tanh: Gemma's GeGLU)."""
    if name == "silu":
        return xp.silu(x)
    if name == "gelu_tanh":
        return xp.gelu_tanh(x)
    raise ValueError(f"activation {name!r}")


def gelu_tanh_formula(xp: Namespace, x):
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))): gelu with the tanh approximation, for a namespace
    without a gelu of its own (ONNX before opset 20)."""
    inner = (x + (x * x * x) * 0.044715) * math.sqrt(2 / math.pi)
    return (x * 0.5) * (xp.tanh(inner) + 1.0)


# ---- attention and head extras -------------------------------------------------------------------------
def softcap(xp: Namespace, x, cap: float | None):
    """cap * tanh(x / cap) (Gemma 2's attention scores, Gemma's final logits); None: x unchanged."""
    return x if cap is None else xp.tanh(x / cap) * cap


# ---- rotary position embeddings: the tables of a Rope, and their application -----------------------------
def rope_cos_sin(xp: Namespace, rope: Rope, positions, dtype, name: str = "rope.inv_freq"):
    """cos, sin [B, S, rotary_dim] in `dtype` for integer positions [B, S] (families/rope.py says what each
    part means). `name` names the frequency constants (graph initializers)."""
    pos = xp.cast(positions, xp.float32)  # positions < 2^24: exact
    inv = xp.constant(rope.inv_freq(), name, pos)
    if rope.switch_at is not None:  # LongRoPE: a row reaching switch_at uses the long set, for the whole call
        long = xp.unsqueeze_last(xp.amax_last(pos) + 1.0 > float(rope.switch_at))  # [B, 1, 1]
        inv = xp.where(long, xp.constant(rope.long_inv_freq(), f"{name}.long", pos), inv)
    freqs = xp.unsqueeze_last(pos) * inv
    emb = xp.cat_last([freqs, freqs])
    cos, sin = xp.cos(emb), xp.sin(emb)
    if rope.attention_factor != 1.0:
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    return xp.cast(cos, dtype), xp.cast(sin, dtype)


def apply_rope(xp: Namespace, x, cos, sin, rotary_dim: int, head_dim: int):
    """Rotate the first rotary_dim dims of each head of x [..., head_dim] (all of them unless partial):
    x cos + rotate_half(x) sin, rotate_half([x1, x2]) = [-x2, x1]."""
    rot, keep = (x, None) if rotary_dim == head_dim else xp.split_last(x, [rotary_dim, head_dim - rotary_dim])
    x1, x2 = xp.split_last(rot, [rotary_dim // 2, rotary_dim // 2])
    out = rot * cos + xp.cat_last([-x2, x1]) * sin
    return out if keep is None else xp.cat_last([out, keep])


# ---- the PyTorch namespace ------------------------------------------------------------------------------
class _Torch:
    """`xp` over torch tensors (imported on first use)."""

    @property
    def float32(self):
        import torch

        return torch.float32

    def cast(self, x, dtype):
        return x.to(dtype)

    def dtype(self, x):
        return x.dtype

    def constant(self, tensor, name: str, like):
        return _on_device(tensor, like.device)

    def rsqrt(self, x):
        return x.rsqrt()

    def mean_last(self, x):
        return x.mean(-1, keepdim=True)

    def amax_last(self, x):
        return x.amax(-1, keepdim=True)

    def tanh(self, x):
        return x.tanh()

    def cos(self, x):
        return x.cos()

    def sin(self, x):
        return x.sin()

    def silu(self, x):
        import torch

        return torch.nn.functional.silu(x)

    def gelu_tanh(self, x):
        import torch

        return torch.nn.functional.gelu(x, approximate="tanh")

    def where(self, cond, a, b):
        import torch

        return torch.where(cond, a, b)

    def unsqueeze_last(self, x):
        return x.unsqueeze(-1)

    def cat_last(self, xs: list):
        import torch

        return torch.cat(xs, dim=-1)

    def split_last(self, x, sizes: list[int]):
        import torch

        return torch.split(x, sizes, dim=-1)


TORCH = _Torch()
_DEVICE_COPIES: dict = {}


def _on_device(tensor, device):
    """A constant's copy on `device`, made once: a CUDA graph capturing a decode step must find it there
    (the constants here are cached objects, e.g. Rope's frequencies, so their ids are stable)."""
    if tensor.device == device:
        return tensor
    key = (id(tensor), device)
    if key not in _DEVICE_COPIES:
        _DEVICE_COPIES[key] = (tensor, tensor.to(device))  # holding `tensor` keeps its id from being reused
    return _DEVICE_COPIES[key][1]
