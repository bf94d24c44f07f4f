"""What a checkpoint is: the backbone (ModelSpec) and its adapters (AdapterSpec).

Both are parsed from JSON with strict type checks, so a wrong config gets a one-line
error naming the file and key instead of a failure deep inside the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .errors import AdafuseError

if TYPE_CHECKING:
    from .families import Family
    from .families.rope import Rope

ROUTINGS = ("pregate", "layerwise", "none", "xlora")
ROUTER_KINDS = ("topk", "dense")
EXPERT_KINDS = ("linear", "ffn")
PREGATE_INPUTS = ("attn_norm_0", "mlp_norm_0")
FORMAT_VERSION = 1

_MISSING = object()
Number = TypeVar("Number", int, float)


def config_value(cfg: dict, key: str, kind, where: str, default=_MISSING):
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
# A scale a config states (lora_alpha, a soft-cap, a temperature, a mixing weight) multiplies or divides
# activations. A working model's activations sit far inside float32's range (2^-126..2^128), so a scale of
# magnitude beyond 2^64 either way overflows them (or, as a divisor, makes them infinite) in use.
SCALE_RANGE = (2.0 ** -64, 2.0 ** 64)


def float32_scale(value: float, key: str, where: str, zero_ok: bool = False) -> float:
    """Class 5's one rule: `key` (a number already type-checked) must be finite and of a magnitude float32 computes
    with (SCALE_RANGE; 0 where `zero_ok`), else a one-line error naming the field."""
    low, high = SCALE_RANGE
    if not (math.isfinite(value) and ((zero_ok and value == 0) or low <= abs(value) <= high)):
        raise AdafuseError(f"{where}: {key} is {value!r}, which overflows the float32 computation it scales "
                           f"(expected {'0 or ' if zero_ok else ''}a magnitude from 2^-64 to 2^64)")
    return value


def positive(value: Number, key: str, where: str) -> Number:
    if value <= 0:
        raise AdafuseError(f"{where}: key '{key}' must be positive, found {value}")
    if isinstance(value, int) and value > MAX_SIZE:
        raise AdafuseError(f"{where}: key '{key}' must be at most {MAX_SIZE}, found {str(value)[:20]}")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """A backbone's numbers, parsed by its family (families/): `arch` is the family's description."""
    arch: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: Rope  # the rotary embedding of full-attention layers (families/rope.py)
    rms_norm_eps: float
    tie_word_embeddings: bool
    bias_modules: tuple[str, ...]  # projections that carry a bias
    hidden_act: str  # silu or gelu_tanh (families.base.ACTIVATIONS)
    rotary_dim: int  # leading dims of each head that RoPE rotates (head_dim unless partial)
    query_scale: float  # factor on q.k (head_dim ** -0.5 unless the family says otherwise)
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # the layers that attend within sliding_window
    sliding_rope: Rope | None = None  # the rotary embedding of sliding layers when it differs (Gemma 3)
    attn_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    embed_scale: float = 1.0  # factor on the token embeddings
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf_config(cls, cfg: object, where: str | Path) -> "ModelSpec":
        """Parsed by the family its model_type names (families.get)."""
        from . import families

        where = str(where)
        if not isinstance(cfg, dict):
            raise AdafuseError(f"{where}: expected a JSON object, found {type(cfg).__name__}")
        return families.get(config_value(cfg, "model_type", str, where), where).parse(cfg, where)

    @property
    def family(self) -> str:
        return self.arch.name

    def window(self, layer: int) -> int | None:
        """The attention window of a layer (None: full causal attention)."""
        return self.sliding_window if layer in self.sliding_layers else None

    def layer_rope(self, layer: int) -> Rope:
        return self.sliding_rope if self.sliding_rope is not None and layer in self.sliding_layers else self.rope

    def role_shape(self, role: str) -> tuple[int, int]:
        """(out_features, in_features) of one role (q, k, v, o, gate, up, down)."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        h, i = self.hidden_size, self.intermediate_size
        return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (i, h), "up": (i, h), "down": (h, i)}[role]

    def linear_shape(self, module: str) -> tuple[int, int]:
        """(out_features, in_features) of a projection (its roles' outputs stacked)."""
        roles = self.arch.projection(module).roles
        return sum(self.role_shape(r)[0] for r in roles), self.role_shape(roles[0])[1]

    def hf_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every base tensor the Hugging Face layout must hold, with its shape."""
        shapes = {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
                  "model.norm.weight": (self.hidden_size,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        for layer in range(self.num_layers):
            for norm in self.arch.norms.names():
                shapes[self.arch.norm_weight(layer, norm)] = (self.hidden_size,)
            if self.arch.qk_norm:
                for role in ("q", "k"):
                    shapes[self.arch.qk_norm_weight(layer, role)] = (self.head_dim,)
            for m in self.arch.module_names:
                out, inp = self.linear_shape(m)
                p = self.arch.weight_prefix(layer, m)
                shapes[f"{p}.weight"] = (out, inp)
                if m in self.bias_modules:
                    shapes[f"{p}.bias"] = (out,)
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
class XLoraSpec:
    """PEFT X-LoRA's mixing (docs/formats/xlora.md): a scaling pass with constant scalings, then a classifier
    over its last hidden state gives per-token (per-site) expert scalings for the real pass."""
    classifier_depth: int  # Linear layers of the classifier, ReLU between them
    classifier_size: int  # width of its hidden layers (depth > 1)
    layerwise_scalings: bool  # one set of E scalings per adapted site, else one set for every site
    enable_softmax: bool  # softmax (with temperature) over the experts of the classifier output
    softmax_temperature: float
    enable_softmax_topk: bool  # softmax over the top_k_lora kept scalings
    top_k_lora: int | None  # keep the k largest scalings per site, zero the rest
    scaling_pass_value: float  # the constant scaling of every expert in the scaling pass
    global_scaling_weight: float  # multiplies every expert's output
    module_order: tuple[str, ...]  # PEFT's numbering of a layer's sites: transformers' module order

    @classmethod
    def from_json(cls, cfg: object, where: str) -> "XLoraSpec":
        if not isinstance(cfg, dict):
            raise AdafuseError(f"{where}: key 'xlora' must be an object, found {type(cfg).__name__}")
        spec = cls(
            classifier_depth=config_value(cfg, "classifier_depth", int, where),
            classifier_size=config_value(cfg, "classifier_size", int, where),
            layerwise_scalings=config_value(cfg, "layerwise_scalings", bool, where),
            enable_softmax=config_value(cfg, "enable_softmax", bool, where),
            softmax_temperature=float(config_value(cfg, "softmax_temperature", (int, float), where)),
            enable_softmax_topk=config_value(cfg, "enable_softmax_topk", bool, where),
            top_k_lora=config_value(cfg, "top_k_lora", int, where, None),
            scaling_pass_value=float(config_value(cfg, "scaling_pass_value", (int, float), where)),
            global_scaling_weight=float(config_value(cfg, "global_scaling_weight", (int, float), where)),
            module_order=tuple(config_value(cfg, "module_order", list, where)),
        )
        spec.check(where)
        return spec

    def check(self, where: str) -> None:
        if not 0 < self.classifier_depth <= 64:
            raise AdafuseError(f"{where}: X-LoRA classifier depth must be 1..64, found {self.classifier_depth}")
        positive(self.classifier_size, "classifier_size", where)
        if not self.softmax_temperature > 0:
            raise AdafuseError(f"{where}: X-LoRA softmax_temperature must be a positive number, found {self.softmax_temperature}")
        float32_scale(self.softmax_temperature, "X-LoRA softmax_temperature", where)
        if self.top_k_lora is not None and self.top_k_lora < 1:
            raise AdafuseError(f"{where}: X-LoRA top_k_lora must be at least 1, found {self.top_k_lora}")
        for key in ("scaling_pass_value", "global_scaling_weight"):
            float32_scale(getattr(self, key), f"X-LoRA {key}", where, zero_ok=True)
        if not all(isinstance(m, str) for m in self.module_order):
            raise AdafuseError(f"{where}: X-LoRA module_order must be a list of module names, found {list(self.module_order)!r}")

    def to_json(self) -> dict:
        return {**self.__dict__, "module_order": list(self.module_order)}


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
    xlora: XLoraSpec | None = None  # routing 'xlora' only

    @classmethod
    def from_json(cls, cfg: object, where: str | Path, num_layers: int) -> "AdapterSpec":
        where = str(where)
        if not isinstance(cfg, dict):
            raise AdafuseError(f"{where}: expected a JSON object, found {type(cfg).__name__}")
        version = config_value(cfg, "format_version", int, where)
        if version != FORMAT_VERSION:
            raise AdafuseError(f"{where}: format_version {version} is not supported (expected {FORMAT_VERSION})")

        def str_list(key, default):
            value = config_value(cfg, key, list, where, default)
            if not all(isinstance(v, str) for v in value):
                raise AdafuseError(f"{where}: key '{key}' must be a list of strings, found {value!r}")
            return tuple(value)

        def choice(key, options, default=_MISSING):
            value = config_value(cfg, key, str, where, default)
            if value not in options:
                raise AdafuseError(f"{where}: key '{key}' must be one of {', '.join(options)}, found '{value}'")
            return value

        def pattern(key, kind):
            value = config_value(cfg, key, dict, where, {})
            for k, v in value.items():
                if not isinstance(v, kind) or isinstance(v, bool) or not _finite(v):
                    raise AdafuseError(f"{where}: {key}['{k}'] must be a number, found {v!r}")
            return dict(value)

        per_layer = config_value(cfg, "num_experts_per_layer", list, where, None)
        if per_layer is not None:
            if len(per_layer) != num_layers or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in per_layer):
                raise AdafuseError(f"{where}: num_experts_per_layer must list {num_layers} positive integers, found {per_layer!r}")
            per_layer = tuple(per_layer)
        spec = cls(
            num_experts=config_value(cfg, "num_experts", int, where),
            top_k=config_value(cfg, "top_k", int, where),
            r=config_value(cfg, "r", int, where),
            lora_alpha=float(config_value(cfg, "lora_alpha", (int, float), where)),
            target_modules=str_list("target_modules", _MISSING),
            routing=choice("routing", ROUTINGS),
            router_kind=choice("router_kind", ROUTER_KINDS, "topk"),
            normalize_topk=config_value(cfg, "normalize_topk", bool, where, True),
            expert_kind=choice("expert_kind", EXPERT_KINDS, "linear"),
            use_rslora=config_value(cfg, "use_rslora", bool, where, False),
            static_modules=str_list("static_modules", []),
            pregate_input=choice("pregate_input", PREGATE_INPUTS, "attn_norm_0"),
            num_experts_per_layer=per_layer,
            rank_pattern=pattern("rank_pattern", int),
            alpha_pattern=pattern("alpha_pattern", (int, float)),
            xlora=XLoraSpec.from_json(cfg["xlora"], where) if cfg.get("xlora") is not None else None,
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
        float32_scale(self.lora_alpha, "lora_alpha", where)
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SIZE:
                bad(f"rank_pattern['{key}'] must be a positive integer, found {value!r}")
        for key, value in self.alpha_pattern.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                bad(f"alpha_pattern['{key}'] must be a positive number, found {value!r}")
            float32_scale(value, f"alpha_pattern[{key!r}]", where)
        smallest = min(self.num_experts_per_layer or (self.num_experts,))
        if self.top_k > smallest and not (self.routing == "layerwise" and self.router_kind == "dense"):
            bad(f"top_k {self.top_k} is larger than num_experts {smallest}")
        if set(self.target_modules) & set(self.static_modules):
            bad(f"modules {sorted(set(self.target_modules) & set(self.static_modules))} are both routed and static")
        if not self.target_modules and not self.static_modules:
            bad("target_modules is empty")
        if self.routing == "none" and (self.num_experts != 1 or self.top_k != 1):
            bad(f"routing 'none' needs num_experts 1 and top_k 1, found {self.num_experts} and {self.top_k}")
        if self.expert_kind == "ffn":
            if self.routing != "layerwise":
                bad(f"expert_kind 'ffn' (MixLoRA) needs routing 'layerwise', found '{self.routing}'")
        if (self.routing == "xlora") != (self.xlora is not None):
            bad(f"routing '{self.routing}' {'needs' if self.routing == 'xlora' else 'takes no'} X-LoRA settings ('xlora')")
        if self.routing == "xlora" and (self.expert_kind != "linear" or self.static_modules or self.num_experts_per_layer):
            bad("routing 'xlora' mixes linear experts at every routed site (no static modules, one expert count)")
        if self.xlora is not None and self.xlora.top_k_lora is not None and self.xlora.top_k_lora > self.num_experts:
            bad(f"X-LoRA top_k_lora {self.xlora.top_k_lora} is larger than the {self.num_experts} adapters "
                "(PEFT's own top-k fails on it)")
        if self.xlora is not None and sorted(self.xlora.module_order) != sorted(self.target_modules):
            bad(f"X-LoRA module_order {list(self.xlora.module_order)} must list target_modules {list(self.target_modules)} once each")
        if self.routing == "pregate":
            if self.num_experts_per_layer and len(set(self.num_experts_per_layer)) > 1:
                bad("a pre-gate routes every layer alike, so num_experts_per_layer must be uniform")

    def check_modules(self, model: ModelSpec, where: str) -> None:
        """The rules that need the family: adapted modules are its projections, in the blocks allowed."""
        attention_ok = not (self.routing == "pregate" and self.pregate_input == "mlp_norm_0")
        model.arch.check_adapter_modules(self.target_modules, attention_ok, self.expert_kind == "ffn", where)
        model.arch.check_adapter_modules(self.static_modules, attention_ok, False, where)

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
        if self.xlora is not None:
            out["xlora"] = self.xlora.to_json()
        return out
