"""Llama (1, 2, 3): the base description as it is (GQA, RoPE, RMSNorm, SwiGLU; attention_bias/mlp_bias optional)."""
from __future__ import annotations

from .base import Family, register


@register
class Llama(Family):
    name = "llama"
