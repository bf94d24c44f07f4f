"""Gemma 2: Llama's decoder with Gemma's choices, all read from config.json as transformers reads them.

- RMSNorm scales by (1 + w), in float32 before the cast back (weights are stored centred on 0);
- four norms per layer: the attention and the MLP outputs are normalised too (post_attention_layernorm
  is the attention *output* norm here; the MLP input norm is pre_feedforward_layernorm);
- GeGLU MLP: gelu with the tanh approximation (`hidden_activation` gelu_pytorch_tanh);
- embeddings times sqrt(hidden_size), that factor rounded to the model dtype first;
- attention scores scaled by query_pre_attn_scalar^-0.5 (not head_dim^-0.5), then soft-capped:
  cap * tanh(scores / cap) with attn_logit_softcapping, before the mask; the logits likewise with
  final_logit_softcapping;
- sliding-window attention on the layers `layer_types` marks sliding_attention (default: every other
  layer, starting with layer 0), full causal attention on the others;
- tied embeddings by default.

Defaults for absent keys are transformers' Gemma2Config defaults; an explicit null soft-cap means none.
"""
from __future__ import annotations

from ..errors import AdafuseError
from ..spec import ModelSpec, config_value, float32_scale, positive
from .base import Family, LayerNorms, register, window_size, windows_from_layer_types

GEMMA_NORMS = LayerNorms(attn_in="input_layernorm", attn_out="post_attention_layernorm",
                         mlp_in="pre_feedforward_layernorm", mlp_out="post_feedforward_layernorm")


def optional_cap(cfg: dict, key: str, where: str, default: float | None) -> float | None:
    """A soft-cap: absent -> the config class's default, null -> no capping, else a positive number."""
    if key in cfg and cfg[key] is None:
        return None
    value = config_value(cfg, key, (int, float), where, default)
    return None if value is None else float32_scale(positive(float(value), key, where), key, where)


class GemmaBase(Family):
    """What Gemma 2 and Gemma 3 share; each registers its own model_type."""
    norms = GEMMA_NORMS
    norm = "rms_one_plus"
    act_key = "hidden_activation"
    activations = ("gelu_pytorch_tanh",)
    default_window = 4096  # Gemma2Config / Gemma3TextConfig default sliding_window
    default_head_dim = 256  # theirs too

    def parse(self, cfg: dict, where: str) -> ModelSpec:
        if config_value(cfg, "use_bidirectional_attention", bool, where, False):
            raise AdafuseError(f"{where}: use_bidirectional_attention true is not supported for model_type "
                               f"'{self.name}' (expected false or absent: causal attention)")
        return super().parse(cfg, where)

    def tie_default(self) -> bool:
        return True

    def query_scale(self, cfg: dict, where: str, head_dim: int) -> float:
        scalar = config_value(cfg, "query_pre_attn_scalar", (int, float), where, 256)
        return float32_scale(float(positive(scalar, "query_pre_attn_scalar", where)), "query_pre_attn_scalar", where) ** -0.5

    def embed_scale(self, cfg: dict, where: str, hidden_size: int) -> float:
        return hidden_size ** 0.5

    def default_sliding_layers(self, cfg: dict, where: str, num_layers: int) -> tuple[int, ...]:
        """The sliding layers of a config without `layer_types`."""
        raise NotImplementedError

    def sliding_window(self, cfg: dict, where: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
        window = window_size(cfg, where) if "sliding_window" in cfg else self.default_window
        return windows_from_layer_types(cfg, where, num_layers, window,
                                        self.default_sliding_layers(cfg, where, num_layers))


@register
class Gemma2(GemmaBase):
    name = "gemma2"

    def default_sliding_layers(self, cfg: dict, where: str, num_layers: int) -> tuple[int, ...]:
        return tuple(range(0, num_layers, 2))  # transformers: sliding when (i + 1) % 2

    def softcaps(self, cfg: dict, where: str) -> tuple[float | None, float | None]:
        return (optional_cap(cfg, "attn_logit_softcapping", where, 50.0),
                optional_cap(cfg, "final_logit_softcapping", where, 30.0))
