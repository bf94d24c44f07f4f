"""Mistral: Llama with a sliding attention window on every layer (config `sliding_window`, null: none)."""
from __future__ import annotations

from .base import Family, register, window_size


@register
class Mistral(Family):
    name = "mistral"

    def sliding_window(self, cfg: dict, where: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
        window = window_size(cfg, where)
        return (window, tuple(range(num_layers))) if window is not None else (None, ())
