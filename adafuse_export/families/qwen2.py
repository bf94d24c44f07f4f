"""Qwen2 / Qwen2.5: Llama with q/k/v biases (always) and an optional sliding window.

The window applies only with `use_sliding_window`, on the layers `layer_types` marks
sliding_attention (transformers 5 writes it), else on layers >= max_window_layers.
"""
from __future__ import annotations

from .base import Family, register, window_size, windows_from_layer_types
from ..spec import config_value


def qwen_windows(cfg: dict, where: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
    """Qwen2's and Qwen3's rule (their transformers configs share it)."""
    if not config_value(cfg, "use_sliding_window", bool, where, False):
        return None, ()
    window = window_size(cfg, where)
    first = config_value(cfg, "max_window_layers", int, where, 28)
    default = tuple(range(first, num_layers)) if window is not None else ()
    return windows_from_layer_types(cfg, where, num_layers, window, default)


@register
class Qwen2(Family):
    name = "qwen2"

    def bias_modules(self, cfg: dict, where: str) -> tuple[str, ...]:
        # transformers' Qwen2 biases q/k/v whatever attention_bias says; mlp_bias is read as for Llama
        mlp = tuple(m for m in super().bias_modules(cfg, where) if self.projection(m).group == "mlp")
        return ("q_proj", "k_proj", "v_proj") + mlp

    def sliding_window(self, cfg: dict, where: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
        return qwen_windows(cfg, where, num_layers)
