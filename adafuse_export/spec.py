"""What a checkpoint is: the backbone (ModelSpec) and its adapters (AdapterSpec).

Both are parsed from JSON with strict type checks, so a wrong config gets a one-line
error naming the file and key instead of a failure deep inside the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdafuseError

FAMILIES = ("llama", "mistral", "qwen2")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
MODULES = ATTN_MODULES + MLP_MODULES
ROUTINGS = ("pregate", "layerwise", "none")
ROUTER_KINDS = ("topk", "dense")
EXPERT_KINDS = ("linear", "ffn")
PREGATE_INPUTS = ("attn_norm_0", "mlp_norm_0")
FORMAT_VERSION = 1

_MISSING = object()


def _get(cfg: dict, key: str, kind, where: str, default=_MISSING):
    """cfg[key] checked against kind (a type or tuple); bools are not ints."""
    if key not in cfg or cfg[key] is None:
        if default is _MISSING:
            raise AdafuseError(f"{where}: missing required key '{key}'")
        return default
    value = cfg[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise AdafuseError(f"{where}: key '{key}' must be {names}, found {type(value).__name__} {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not _finite(value):
        raise AdafuseError(f"{where}: key '{key}' must be a finite number of at most 2^63, found {str(value)[:20]}")
    return value


def _finite(value: int | float) -> bool:
    return abs(value) <= 1 << 63 if isinstance(value, int) else math.isfinite(value)


MAX_SIZE = (1 << 31) - 1  # every size, count and position is an int32 in the graphs and engines


def _positive(value: int, key: str, where: str) -> int:
    if value <= 0:
        raise AdafuseError(f"{where}: key '{key}' must be positive, found {value}")
    if isinstance(value, int) and value > MAX_SIZE:
        raise AdafuseError(f"{where}: key '{key}' must be at most {MAX_SIZE}, found {str(value)[:20]}")
    return value


def module_group(module: str) -> str:
    return "self_attn" if module in ATTN_MODULES else "mlp"


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    bias_modules: tuple[str, ...]  # linear modules that carry a bias
    sliding_window: int | None = None
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf_config(cls, cfg: object, where: str | Path) -> "ModelSpec":
        where = str(where)
        if not isinstance(cfg, dict):
            raise AdafuseError(f"{where}: expected a JSON object, found {type(cfg).__name__}")
        family = _get(cfg, "model_type", str, where)
        if family not in FAMILIES:
            raise AdafuseError(f"{where}: model_type '{family}' is not supported (expected one of {', '.join(FAMILIES)})")
        hidden = _positive(_get(cfg, "hidden_size", int, where), "hidden_size", where)
        heads = _positive(_get(cfg, "num_attention_heads", int, where), "num_attention_heads", where)
        kv_heads = _positive(_get(cfg, "num_key_value_heads", int, where, heads), "num_key_value_heads", where)
        if heads % kv_heads:
            raise AdafuseError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = _get(cfg, "head_dim", int, where, None)
        if head_dim is not None:
            _positive(head_dim, "head_dim", where)
        else:
            if hidden % heads:
                raise AdafuseError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
            head_dim = hidden // heads
        if head_dim % 2:
            raise AdafuseError(f"{where}: head_dim must be even for rotary embeddings, found {head_dim}")
        act = _get(cfg, "hidden_act", str, where, "silu")
        if act != "silu":
            raise AdafuseError(f"{where}: hidden_act '{act}' is not supported (expected 'silu')")
        rope = _get(cfg, "rope_parameters", dict, where, None) or {}
        scaling = _get(cfg, "rope_scaling", dict, where, None) or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise AdafuseError(f"{where}: rope type '{rope_type}' is not supported (expected 'default', no rope scaling)")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not math.isfinite(theta) or theta <= 0:
            raise AdafuseError(f"{where}: rope_theta must be a positive number, found {theta!r}")
        if family == "qwen2":
            bias = ("q_proj", "k_proj", "v_proj")
        else:
            bias = ATTN_MODULES if _get(cfg, "attention_bias", bool, where, False) else ()
        if _get(cfg, "mlp_bias", bool, where, False):
            bias = bias + MLP_MODULES
        window = None
        if family == "mistral" or (family == "qwen2" and _get(cfg, "use_sliding_window", bool, where, False)):
            window = _get(cfg, "sliding_window", int, where, None)
            if window is not None:
                _positive(window, "sliding_window", where)
        return cls(
            family=family,
            vocab_size=_positive(_get(cfg, "vocab_size", int, where), "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=_positive(_get(cfg, "intermediate_size", int, where), "intermediate_size", where),
            num_layers=_positive(_get(cfg, "num_hidden_layers", int, where), "num_hidden_layers", where),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=float(theta),
            rms_norm_eps=_positive(float(_get(cfg, "rms_norm_eps", (int, float), where, 1e-6)), "rms_norm_eps", where),
            tie_word_embeddings=_get(cfg, "tie_word_embeddings", bool, where, False),
            bias_modules=bias,
            sliding_window=window,
            max_position_embeddings=_positive(_get(cfg, "max_position_embeddings", int, where, 4096),
                                              "max_position_embeddings", where),
        )

    def linear_shape(self, module: str) -> tuple[int, int]:
        """(out_features, in_features) of a projection."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }[module]

    def hf_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every base tensor the Hugging Face layout must hold, with its shape."""
        shapes = {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
                  "model.norm.weight": (self.hidden_size,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}"
            shapes[f"{p}.input_layernorm.weight"] = (self.hidden_size,)
            shapes[f"{p}.post_attention_layernorm.weight"] = (self.hidden_size,)
            for m in MODULES:
                out, inp = self.linear_shape(m)
                shapes[f"{p}.{module_group(m)}.{m}.weight"] = (out, inp)
                if m in self.bias_modules:
                    shapes[f"{p}.{module_group(m)}.{m}.bias"] = (out,)
        return shapes


def _pattern_value(pattern: dict, site: str, default):
    """PEFT-style pattern lookup: the longest key that names the site or a suffix of it."""
    best = None
    for key in pattern:
        if site == key or site.endswith("." + key):
            if best is None or len(key) > len(best):
                best = key
    return default if best is None else pattern[best]


@dataclass(frozen=True)
class AdapterSpec:
    num_experts: int
    top_k: int
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]  # routed expert sites
    routing: str = "pregate"
    router_kind: str = "topk"  # layerwise only: top-k of a softmax, or the dense softmax (LoRAMoE)
    normalize_topk: bool = True
    expert_kind: str = "linear"  # linear: experts per projection; ffn: MixLoRA experts are whole FFNs
    use_rslora: bool = False
    static_modules: tuple[str, ...] = ()  # one always-on LoRA each (no router), e.g. MixLoRA attention
    pregate_input: str = "attn_norm_0"
    num_experts_per_layer: tuple[int, ...] | None = None  # MoLA-style allocation; None: num_experts everywhere
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, cfg: object, where: str | Path, num_layers: int) -> "AdapterSpec":
        where = str(where)
        if not isinstance(cfg, dict):
            raise AdafuseError(f"{where}: expected a JSON object, found {type(cfg).__name__}")
        version = _get(cfg, "format_version", int, where)
        if version != FORMAT_VERSION:
            raise AdafuseError(f"{where}: format_version {version} is not supported (expected {FORMAT_VERSION})")

        def str_list(key, default):
            value = _get(cfg, key, list, where, default)
            if not all(isinstance(v, str) for v in value):
                raise AdafuseError(f"{where}: key '{key}' must be a list of strings, found {value!r}")
            return tuple(value)

        def choice(key, options, default=_MISSING):
            value = _get(cfg, key, str, where, default)
            if value not in options:
                raise AdafuseError(f"{where}: key '{key}' must be one of {', '.join(options)}, found '{value}'")
            return value

        def pattern(key, kind):
            value = _get(cfg, key, dict, where, {})
            for k, v in value.items():
                if not isinstance(v, kind) or isinstance(v, bool) or not _finite(v):
                    raise AdafuseError(f"{where}: {key}['{k}'] must be a number, found {v!r}")
            return dict(value)

        per_layer = _get(cfg, "num_experts_per_layer", list, where, None)
        if per_layer is not None:
            if len(per_layer) != num_layers or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in per_layer):
                raise AdafuseError(f"{where}: num_experts_per_layer must list {num_layers} positive integers, found {per_layer!r}")
            per_layer = tuple(per_layer)
        spec = cls(
            num_experts=_get(cfg, "num_experts", int, where),
            top_k=_get(cfg, "top_k", int, where),
            r=_get(cfg, "r", int, where),
            lora_alpha=float(_get(cfg, "lora_alpha", (int, float), where)),
            target_modules=str_list("target_modules", _MISSING),
            routing=choice("routing", ROUTINGS),
            router_kind=choice("router_kind", ROUTER_KINDS, "topk"),
            normalize_topk=_get(cfg, "normalize_topk", bool, where, True),
            expert_kind=choice("expert_kind", EXPERT_KINDS, "linear"),
            use_rslora=_get(cfg, "use_rslora", bool, where, False),
            static_modules=str_list("static_modules", []),
            pregate_input=choice("pregate_input", PREGATE_INPUTS, "attn_norm_0"),
            num_experts_per_layer=per_layer,
            rank_pattern=pattern("rank_pattern", int),
            alpha_pattern=pattern("alpha_pattern", (int, float)),
        )
        spec.check(where)
        return spec

    def check(self, where: str) -> None:
        """Consistency rules that do not need tensors."""
        def bad(msg):
            raise AdafuseError(f"{where}: {msg}")

        for key in ("num_experts", "top_k", "r"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value > MAX_SIZE:
                bad(f"{key} must be an integer of at most {MAX_SIZE}, found {str(value)[:20]}")
        if not isinstance(self.use_rslora, bool):
            bad(f"use_rslora must be true or false, found {self.use_rslora!r}")
        if self.num_experts <= 0:
            bad(f"num_experts must be positive, found {self.num_experts}")
        if self.top_k <= 0:
            bad(f"top_k must be positive, found {self.top_k}")
        if self.r <= 0:
            bad(f"r must be positive, found {self.r}")
        if not self.lora_alpha > 0:
            bad(f"lora_alpha must be positive, found {self.lora_alpha}")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SIZE:
                bad(f"rank_pattern['{key}'] must be a positive integer, found {value!r}")
        for key, value in self.alpha_pattern.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                bad(f"alpha_pattern['{key}'] must be a positive number, found {value!r}")
        smallest = min(self.num_experts_per_layer or (self.num_experts,))
        if self.top_k > smallest and not (self.routing == "layerwise" and self.router_kind == "dense"):
            bad(f"top_k {self.top_k} is larger than num_experts {smallest}")
        for m in self.target_modules + self.static_modules:
            if m not in MODULES:
                bad(f"unknown module '{m}' (expected one of {', '.join(MODULES)})")
        if set(self.target_modules) & set(self.static_modules):
            bad(f"modules {sorted(set(self.target_modules) & set(self.static_modules))} are both routed and static")
        if not self.target_modules and not self.static_modules:
            bad("target_modules is empty")
        if self.routing == "none" and (self.num_experts != 1 or self.top_k != 1):
            bad(f"routing 'none' needs num_experts 1 and top_k 1, found {self.num_experts} and {self.top_k}")
        if self.expert_kind == "ffn":
            if self.routing != "layerwise":
                bad(f"expert_kind 'ffn' (MixLoRA) needs routing 'layerwise', found '{self.routing}'")
            if not set(self.target_modules) <= set(MLP_MODULES):
                bad(f"expert_kind 'ffn' routes FFN modules only, found target_modules {list(self.target_modules)}")
        if self.routing == "pregate":
            if self.num_experts_per_layer and len(set(self.num_experts_per_layer)) > 1:
                bad("a pre-gate routes every layer alike, so num_experts_per_layer must be uniform")
            if self.pregate_input == "mlp_norm_0" and set(self.target_modules + self.static_modules) & set(ATTN_MODULES):
                bad("pregate_input 'mlp_norm_0' comes after layer 0's attention, so attention modules cannot be adapted")

    def experts_in_layer(self, layer: int) -> int:
        return self.num_experts_per_layer[layer] if self.num_experts_per_layer else self.num_experts

    def site_rank(self, site: str) -> int:
        return int(_pattern_value(self.rank_pattern, site, self.r))

    def site_scale(self, site: str) -> float:
        rank = self.site_rank(site)
        alpha = float(_pattern_value(self.alpha_pattern, site, self.lora_alpha))
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)

    @property
    def routing_table_exact(self) -> bool:
        """The route depends only on the token id (the pre-gate reads RMSNorm_0(embed))."""
        return self.routing == "pregate" and self.pregate_input == "attn_norm_0"

    def to_json(self) -> dict:
        out = {
            "format_version": FORMAT_VERSION,
            "num_experts": self.num_experts, "top_k": self.top_k, "r": self.r, "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora, "target_modules": list(self.target_modules),
            "static_modules": list(self.static_modules), "routing": self.routing,
            "router_kind": self.router_kind, "normalize_topk": self.normalize_topk,
            "expert_kind": self.expert_kind, "pregate_input": self.pregate_input,
            "rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern,
        }
        if self.num_experts_per_layer:
            out["num_experts_per_layer"] = list(self.num_experts_per_layer)
        return out
