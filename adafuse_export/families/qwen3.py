"""Qwen3 (dense): Llama with a per-head RMSNorm of q and k before RoPE, no q/k/v bias (attention_bias
optional, on all four attention projections), head_dim from the config, Qwen's sliding-window rule."""
from __future__ import annotations

from .base import Family, register
from .qwen2 import qwen_windows


@register
class Qwen3(Family):
    name = "qwen3"
    qk_norm = True
    default_head_dim = 128  # Qwen3Config's, whatever hidden_size / num_attention_heads is

    def sliding_window(self, cfg: dict, where: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
        return qwen_windows(cfg, where, num_layers)
