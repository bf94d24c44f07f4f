"""Rotary position embeddings, once: every RoPE variant a family's config can name, parsed into a `Rope`
whose tables every backend applies the same way.

A `Rope` reduces each variant to one form, which features.rope_cos_sin turns into tables for every backend
(the PyTorch reference, the ONNX graphs; the native artifact holds the same numbers for the C++ runtime):

    cos, sin = cos(p * inv_freq) * attention_factor, sin(p * inv_freq) * attention_factor

on the first `rotary_dim` dimensions of each head (the two halves rotated, as in Llama). LongRoPE has
two frequency sets: a row whose largest position reaches `switch_at` (original_max_position_embeddings)
uses `long_inv_freq` for the whole call, as transformers decides per forward call (transformers takes
the largest position of the batch; a row's own is the same at batch 1 and for rows of equal length, and
keeps rows of a batch independent of each other).

Adding a variant: one `@variant` function below that checks its parameters and returns the float32
frequencies exactly as transformers computes them (modeling_rope_utils), plus its tests.

Frequencies are computed in float32 with torch (imported when first needed, so reading a config stays
light), in the order transformers computes them, so that the tables are the same to the last bit.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from ..errors import AdafuseError

SCALE_RANGE = (1e-6, 1e6)  # scaling factors: beyond these the frequencies leave float32's useful range
MAX_ATTENTION_FACTOR = 65504.0  # the tables are stored in the model dtype: float16's largest value


@dataclass(frozen=True)
class Rope:
    """One layer type's rotary embedding (see the module docstring for how a backend applies it)."""
    kind: str  # the config's rope_type: default, linear, dynamic, yarn, longrope, llama3
    theta: float
    rotary_dim: int
    attention_factor: float = 1.0
    switch_at: int | None = None  # longrope: rows whose positions reach this use long_inv_freq
    params: tuple[tuple[str, Any], ...] = field(default=())  # the variant's own parameters, as checked

    @property
    def param(self) -> dict[str, Any]:
        return dict(self.params)

    def inv_freq(self):
        """float32 [rotary_dim // 2]: the frequencies (LongRoPE: the short set)."""
        return _frequencies(self, False)

    def long_inv_freq(self):
        """float32 [rotary_dim // 2] for rows past `switch_at` (LongRoPE), else None."""
        return None if self.switch_at is None else _frequencies(self, True)

    def cos_sin(self, positions, dtype):
        """cos, sin [B, S, rotary_dim] in `dtype` for integer positions [B, S] (torch): features.rope_cos_sin."""
        from .features import TORCH, rope_cos_sin

        return rope_cos_sin(TORCH, self, positions, dtype)

    def describe(self) -> str:
        extra = "".join(f", {k} {_short(v)}" for k, v in self.params)
        af = f", attention factor {self.attention_factor:.6g}" if self.attention_factor != 1.0 else ""
        return f"{self.kind} (theta {self.theta:g}{extra}{af})"

    def to_json(self) -> dict[str, Any]:
        return {"rope_type": self.kind, "rope_theta": self.theta, "rotary_dim": self.rotary_dim,
                "attention_factor": self.attention_factor, "switch_at": self.switch_at,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in self.params}}


def _short(v: Any) -> str:
    if isinstance(v, tuple):
        return f"[{len(v)} values]"
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class RopeContext:
    """What a variant may read besides its own parameters."""
    where: str  # the config file, for messages
    key: str  # where in it the parameters were found: rope_scaling, rope_parameters['full_attention'], ...
    rotary_dim: int
    max_position_embeddings: int
    original_max_position_embeddings: int | None  # a top-level value that wins over the parameters' (Phi-3)
    theta_key: str = "rope_theta"  # the top-level key the base comes from when the parameters name none

    def fail(self, message: str) -> AdafuseError:
        return AdafuseError(f"{self.where}: {self.key} {message}")


# rope_type -> (check: (params, ctx) -> (attention_factor, switch_at, checked params), frequencies)
Check = Callable[[dict, RopeContext], tuple[float, int | None, dict[str, Any]]]
Frequencies = Callable[..., Any]
_VARIANTS: dict[str, tuple[Check, Frequencies]] = {}


def variant(name: str, check: Check):
    def register(freq: Frequencies) -> Frequencies:
        _VARIANTS[name] = (check, freq)
        return freq
    return register


def variants() -> tuple[str, ...]:
    return tuple(_VARIANTS)


def parse_rope(params: dict, ctx: RopeContext, default_theta: float) -> Rope:
    """A Rope from one parameter dict as transformers standardises it (rope_type or the older `type`,
    rope_theta beside it or `default_theta`)."""
    kind = params.get("rope_type", params.get("type", "default"))
    if not isinstance(kind, str) or kind not in _VARIANTS:
        raise ctx.fail(f"rope type {kind!r} is not supported (expected one of {', '.join(_VARIANTS)})")
    theta = _number(params.get("rope_theta", default_theta), "rope_theta", ctx)
    # theta^(-2i/d) for 2i < d must stay a normal float32
    extreme = theta ** (-(ctx.rotary_dim - 2) / ctx.rotary_dim) if theta > 0 else math.inf
    if theta <= 0 or not 1e-30 <= extreme <= 1e30:
        name = f"{ctx.key} 'rope_theta'" if "rope_theta" in params else f"key '{ctx.theta_key}'"
        raise AdafuseError(f"{ctx.where}: {name} must be a positive number whose frequencies theta^(-2i/d) stay "
                           f"within float32 (1e-30 to 1e30), found {theta!r}")
    check, _ = _VARIANTS[kind]
    attention_factor, switch_at, checked = check(params, ctx)
    if not 0 < attention_factor <= MAX_ATTENTION_FACTOR:
        raise ctx.fail(f"attention factor must be in (0, {MAX_ATTENTION_FACTOR:g}] (the tables are stored in the "
                       f"model dtype), found {attention_factor!r}")
    return Rope(kind, theta, ctx.rotary_dim, attention_factor, switch_at, tuple(checked.items()))


@cache
def _frequencies(rope: Rope, long: bool):
    import torch

    _, freq = _VARIANTS[rope.kind]
    out = freq(rope, long).to(torch.float32)
    if not (torch.isfinite(out).all() and (out > 0).all()):
        raise AdafuseError(f"rope type '{rope.kind}' with {rope.describe()}: its frequencies are not finite positive "
                           "float32 numbers")
    return out


def _powers(theta: float, dim: int):
    """theta ** (2i / dim) in float32, as transformers computes it."""
    import torch

    return theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)


# ---- parameter checks -------------------------------------------------------------------------------
def _number(value: Any, name: str, ctx: RopeContext) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ctx.fail(f"'{name}' must be a finite number, found {value!r}")
    return float(value)


def _scale(params: dict, name: str, ctx: RopeContext, default: float | None = None) -> float:
    value = params.get(name, default)
    if value is None:
        raise ctx.fail(f"needs '{name}' for rope type '{params.get('rope_type', params.get('type'))}'")
    value = _number(value, name, ctx)
    lo, hi = SCALE_RANGE
    if not lo <= value <= hi:
        raise ctx.fail(f"'{name}' must be in [{lo:g}, {hi:g}], found {value!r}")
    return value


def _original(params: dict, ctx: RopeContext) -> int:
    """original_max_position_embeddings: a top-level value (Phi-3) wins, else the parameters', else
    max_position_embeddings (transformers' standardisation)."""
    value = ctx.original_max_position_embeddings
    if value is None:
        value = params.get("original_max_position_embeddings", ctx.max_position_embeddings)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 31:
        raise ctx.fail(f"'original_max_position_embeddings' must be a positive integer, found {value!r}")
    return value


def _check_none(params: dict, ctx: RopeContext):
    return 1.0, None, {}


def _check_factor(params: dict, ctx: RopeContext):
    return 1.0, None, {"factor": _scale(params, "factor", ctx)}


def _check_dynamic(params: dict, ctx: RopeContext):
    # transformers grows the base only once a sequence passes max_position_embeddings, which no command
    # here accepts: within it the frequencies are those at max_position_embeddings, computed below
    return 1.0, None, {"factor": _scale(params, "factor", ctx), "max_position_embeddings": ctx.max_position_embeddings}


def _check_llama3(params: dict, ctx: RopeContext):
    low, high = _scale(params, "low_freq_factor", ctx), _scale(params, "high_freq_factor", ctx)
    if high <= low:
        raise ctx.fail(f"'high_freq_factor' ({high:g}) must be larger than 'low_freq_factor' ({low:g})")
    return 1.0, None, {"factor": _scale(params, "factor", ctx), "low_freq_factor": low, "high_freq_factor": high,
                       "original_max_position_embeddings": _original(params, ctx)}


def _check_yarn(params: dict, ctx: RopeContext):
    original = _original(params, ctx)
    if params.get("factor") is None:  # transformers: the ratio of the two context lengths
        factor = ctx.max_position_embeddings / original
        lo, hi = SCALE_RANGE
        if not lo <= factor <= hi:
            raise ctx.fail(f"'factor' (max_position_embeddings / original_max_position_embeddings) must be in "
                           f"[{lo:g}, {hi:g}], found {factor!r}")
    else:
        factor = _scale(params, "factor", ctx)
    out: dict[str, Any] = {"factor": factor, "original_max_position_embeddings": original}
    # beta_fast / beta_slow: transformers takes `or 32` / `or 1`, so 0 and null mean the default
    for name, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        value = params.get(name)
        out[name] = _number(value, name, ctx) if value else default
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ctx.fail(f"'truncate' must be true or false, found {truncate!r}")
    out["truncate"] = truncate

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if params.get("attention_factor") is not None:
        attention_factor = _number(params["attention_factor"], "attention_factor", ctx)
    else:
        m, m_all = (_number(params[k], k, ctx) if params.get(k) is not None else None
                    for k in ("mscale", "mscale_all_dim"))
        if m and m_all:
            attention_factor = mscale(factor, m) / mscale(factor, m_all)
        else:
            attention_factor = mscale(factor)
    return attention_factor, None, out


def _check_longrope(params: dict, ctx: RopeContext):
    original = _original(params, ctx)
    half = ctx.rotary_dim // 2
    out: dict[str, Any] = {"original_max_position_embeddings": original}
    for name in ("short_factor", "long_factor"):
        values = params.get(name)
        if not isinstance(values, list) or len(values) != half:
            found = f"{len(values)} values" if isinstance(values, list) else repr(values)
            raise ctx.fail(f"'{name}' must be a list of {half} numbers (rotary dimensions / 2), found {found[:60]}")
        lo, hi = SCALE_RANGE
        for i, v in enumerate(values):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
                raise ctx.fail(f"'{name}'[{i}] must be a number in [{lo:g}, {hi:g}], found {v!r}")
        out[name] = tuple(float(v) for v in values)
    factor = params.get("factor")
    factor = ctx.max_position_embeddings / original if factor is None else _scale(params, "factor", ctx)
    if params.get("attention_factor") is not None:
        attention_factor = _number(params["attention_factor"], "attention_factor", ctx)
    else:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return attention_factor, original, out


# ---- the variants: float32 frequencies as transformers computes them ------------------------------------
@variant("default", _check_none)
def _default(rope: Rope, long: bool):
    return 1.0 / _powers(rope.theta, rope.rotary_dim)


@variant("linear", _check_factor)
def _linear(rope: Rope, long: bool):
    return 1.0 / _powers(rope.theta, rope.rotary_dim) / rope.param["factor"]


@variant("dynamic", _check_dynamic)
def _dynamic(rope: Rope, long: bool):
    p, dim = rope.param, rope.rotary_dim
    length = p["max_position_embeddings"]
    base = rope.theta * ((p["factor"] * length / length) - (p["factor"] - 1)) ** (dim / (dim - 2))
    return 1.0 / _powers(base, dim)


@variant("llama3", _check_llama3)
def _llama3(rope: Rope, long: bool):
    import torch

    p = rope.param
    inv = 1.0 / _powers(rope.theta, rope.rotary_dim)
    old, factor = p["original_max_position_embeddings"], p["factor"]
    low_wavelen, high_wavelen = old / p["low_freq_factor"], old / p["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)  # long wavelengths: interpolated
    smooth = (old / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # in between: a blend
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


@variant("yarn", _check_yarn)
def _yarn(rope: Rope, long: bool):
    import torch

    p, dim, base = rope.param, rope.rotary_dim, rope.theta
    original = p["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(p["beta_fast"]), correction_dim(p["beta_slow"])
    if p["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    powers = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / powers, 1.0 / (p["factor"] * powers)
    keep = 1 - ramp  # 1: the pretrained frequency (fast dimensions), 0: interpolated (slow ones)
    return interpolation * (1 - keep) + extrapolation * keep


@variant("longrope", _check_longrope)
def _longrope(rope: Rope, long: bool):
    import torch

    factors = torch.tensor(rope.param["long_factor" if long else "short_factor"], dtype=torch.float32)
    shape = torch.arange(0, rope.rotary_dim, 2, dtype=torch.int64).float() / rope.rotary_dim
    return 1.0 / (factors * rope.theta ** shape)
