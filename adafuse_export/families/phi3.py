"""Phi-3 / Phi-3.5: fused projections (`self_attn.qkv_proj` = [q; k; v] rows, `mlp.gate_up_proj` = [gate; up]
rows), RoPE on the first partial_rotary_factor of each head (LongRoPE on the 128k and 3.5 checkpoints),
an optional sliding window on every layer.

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
    # Phi3Config renames the older names of LongRoPE and accepts no other scaling; its
    # original_max_position_embeddings (default 4096) wins over the rope parameters'
    rope_aliases = {"su": "longrope", "yarn": "longrope"}
    rope_types = ("default", "longrope")

    def ropes(self, cfg: dict, where: str, rotary_dim: int, max_positions: int):
        return super().ropes({"original_max_position_embeddings": 4096, **cfg}, where, rotary_dim, max_positions)

    def bias_modules(self, cfg: dict, where: str) -> tuple[str, ...]:
        return ()  # transformers' Phi-3 has no bias on any projection

    def sliding_window(self, cfg: dict, where: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
        window = window_size(cfg, where)
        return (window, tuple(range(num_layers))) if window is not None else (None, ())
