"""Gemma 3, text only (`Gemma3ForCausalLM`, model_type gemma3_text): Gemma 2 (gemma2.py) with

- a per-head RMSNorm of q and k before RoPE, (1 + w) like every Gemma norm (self_attn.q_norm / k_norm);
- its own RoPE base on the sliding layers: rope_parameters.sliding_attention.rope_theta (older configs:
  rope_local_base_freq, default 10000) beside full_attention's (older: rope_theta, default 1e6);
- five sliding layers to one full by default (`sliding_window_pattern` 6) when `layer_types` is absent;
- no attention logit soft-capping: transformers' Gemma 3 attention never applies attn_logit_softcapping
  (the key is read and ignored), so it is ignored here too; final_logit_softcapping applies (default none).

RoPE scaling (the `linear` factor of the larger Gemma 3 checkpoints) is refused, as for every family.
The multimodal `Gemma3ForConditionalGeneration` (model_type gemma3) is a different layout, not read here.
"""
from __future__ import annotations

import math

from ..errors import AdafuseError
from ..spec import config_value
from .base import register
from .gemma2 import GemmaBase, optional_cap

GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # Gemma3TextConfig.default_theta


def _rope_theta(params: object, where: str, key: str, default: float) -> float:
    """The base of one layer type's rope_parameters entry (absent: `default`); only unscaled RoPE is implemented."""
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise AdafuseError(f"{where}: rope_parameters['{key}'] must be an object, found {params!r}")
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise AdafuseError(f"{where}: rope_parameters['{key}'] rope type '{rope_type}' is not supported "
                           "(expected 'default', no rope scaling)")
    theta = params.get("rope_theta", default)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not math.isfinite(theta) or theta <= 0:
        raise AdafuseError(f"{where}: rope_parameters['{key}'] rope_theta must be a positive number, found {theta!r}")
    return float(theta)


@register
class Gemma3Text(GemmaBase):
    name = "gemma3_text"
    qk_norm = True

    def default_sliding_layers(self, cfg: dict, where: str, num_layers: int) -> tuple[int, ...]:
        key = "sliding_window_pattern" if "sliding_window_pattern" in cfg else "_sliding_window_pattern"
        pattern = config_value(cfg, key, int, where, 6)
        if pattern <= 0:
            raise AdafuseError(f"{where}: key '{key}' must be positive, found {pattern}")
        return tuple(i for i in range(num_layers) if (i + 1) % pattern)

    def softcaps(self, cfg: dict, where: str) -> tuple[float | None, float | None]:
        return None, optional_cap(cfg, "final_logit_softcapping", where, None)

    def rope_thetas(self, cfg: dict, where: str) -> tuple[float, float | None]:
        rope = config_value(cfg, "rope_parameters", dict, where, None) or {}
        scaling = config_value(cfg, "rope_scaling", dict, where, None)
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            raise AdafuseError(f"{where}: rope_scaling ('{kind}') is not supported (expected null: no rope scaling)")
        full = _rope_theta(rope.get("full_attention"), where, "full_attention",
                           cfg.get("rope_theta", GLOBAL_THETA))
        local = _rope_theta(rope.get("sliding_attention"), where, "sliding_attention",
                            cfg.get("rope_local_base_freq", LOCAL_THETA))
        return full, (local if local != full else None)
