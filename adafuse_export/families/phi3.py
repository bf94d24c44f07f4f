"""Phi-3: fused projections (`self_attn.qkv_proj` = [q; k; v] rows, `mlp.gate_up_proj` = [gate; up] rows),
RoPE on the first partial_rotary_factor of each head, an optional sliding window on every layer.

Adapters target the fused modules as PEFT does: a LoRA on `qkv_proj` is one site whose output rows
are q, k and v together (docs/adding-a-family.md, "Fused projections").
"""
from __future__ import annotations

from .base import Family, Projection, register, window_size


@register
class Phi3(Family):
    name = "phi3"
    projections = (
        Projection("qkv_proj", "self_attn", ("q", "k", "v")),
        Projection("o_proj", "self_attn", ("o",)),
        Projection("gate_up_proj", "mlp", ("gate", "up")),
        Projection("down_proj", "mlp", ("down",)),
    )
    partial_rotary = True

    def bias_modules(self, cfg: dict, where: str) -> tuple[str, ...]:
        return ()  # transformers' Phi-3 has no bias on any projection

    def sliding_window(self, cfg: dict, where: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
        window = window_size(cfg, where)
        return (window, tuple(range(num_layers))) if window is not None else (None, ())
