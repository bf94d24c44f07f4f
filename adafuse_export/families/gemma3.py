"""Gemma 3, text only (`Gemma3ForCausalLM`, model_type gemma3_text): Gemma 2 (gemma2.py) with

- a per-head RMSNorm of q and k before RoPE, (1 + w) like every Gemma norm (self_attn.q_norm / k_norm);
- RoPE per layer type: rope_parameters.full_attention and .sliding_attention (transformers 5), or the
  published spelling: rope_theta (default 1e6) and rope_scaling for the full-attention layers (the
  4B/12B/27B checkpoints scale them `linear`, factor 8), rope_local_base_freq (default 10000) for the
  sliding ones;
- five sliding layers to one full by default (`sliding_window_pattern` 6) when `layer_types` is absent;
- no attention logit soft-capping: transformers' Gemma 3 attention never applies attn_logit_softcapping
  (the key is read and ignored), so it is ignored here too; final_logit_softcapping applies (default none).

The multimodal `Gemma3ForConditionalGeneration` (model_type gemma3) is a different layout, not read here.
"""
from __future__ import annotations

from ..errors import AdafuseError
from ..spec import config_value
from .base import register
from .gemma2 import GemmaBase, optional_cap
from .rope import Rope, RopeContext

GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # Gemma3TextConfig.default_theta
LAYER_TYPES = ("full_attention", "sliding_attention")


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

    def ropes(self, cfg: dict, where: str, rotary_dim: int, max_positions: int) -> tuple[Rope, Rope | None]:
        """Gemma3TextConfig's reading: rope_parameters keyed by layer type (absent: default RoPE for both),
        a published rope_scaling merged into full_attention's, each type's base defaulting to the
        top-level key of the older spelling."""
        nested = config_value(cfg, "rope_parameters", dict, where, None)
        if nested is not None and not set(nested) <= set(LAYER_TYPES):
            raise AdafuseError(f"{where}: rope_parameters must be keyed by layer type ({', '.join(LAYER_TYPES)}) for "
                               f"model_type '{self.name}', found keys {sorted(map(str, nested))[:4]}")
        out = []
        for layer_type, theta_key, default in (("full_attention", "rope_theta", GLOBAL_THETA),
                                               ("sliding_attention", "rope_local_base_freq", LOCAL_THETA)):
            params = (nested or {}).get(layer_type) or {}
            if not isinstance(params, dict):
                raise AdafuseError(f"{where}: rope_parameters['{layer_type}'] must be an object, found {params!r}")
            key = f"rope_parameters['{layer_type}']"
            scaling = config_value(cfg, "rope_scaling", dict, where, None)
            if layer_type == "full_attention" and scaling is not None:
                params, key = {**params, **scaling}, "rope_scaling"
            theta = config_value(cfg, theta_key, (int, float), where, default)
            out.append(self.rope(params, RopeContext(where, key, rotary_dim, max_positions, None, theta_key), theta))
        full, local = out
        return full, (local if local != full else None)
