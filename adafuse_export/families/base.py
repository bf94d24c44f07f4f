"""What a model family is, once: the description every backend reads, and the registry.

A family module subclasses `Family`, sets the class attributes that differ from Llama's and
overrides the config hooks it needs, then registers itself with `@register` (the way Optimum
registers one export config per model type and llama.cpp one class per architecture). The PyTorch
reference (reference/model.py), the ONNX builder (onnx/builder.py) and the native artifact writer
(native_artifact.py) read only this description and the ModelSpec it parses, never the
family's name. docs/adding-a-family.md lists every field and who reads it.

Vocabulary:
  role        one logical linear map of a decoder layer: q, k, v, o (attention), gate, up, down (MLP)
  projection  one linear module in the weights, computing one or more roles stacked along its output
              rows (Phi-3's `qkv_proj` computes q, k and v); it is also the adapter site: a LoRA on
              `qkv_proj` is one [r, in] / [out_q + out_k + out_v, r] pair, applied to the stacked
              output before it is split, exactly as PEFT applies it to the fused module
  stage       the roles read from one input: qkv (the attention input), o, gate_up (the MLP input), down
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import AdafuseError
from ..spec import ModelSpec, config_value, positive
from .rope import Rope, RopeContext, parse_rope

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
STAGES: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}
# hidden_act names in Hugging Face configs -> the activation every backend implements
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
NORMS = ("rms", "rms_one_plus")


@dataclass(frozen=True)
class Projection:
    name: str  # module name in the weights and adapter site name: q_proj, qkv_proj, ...
    group: str  # the submodule holding it: self_attn or mlp
    roles: tuple[str, ...]  # the roles whose outputs it stacks, in row order

    def __post_init__(self):
        # one input per projection: its roles must all belong to one stage
        if not any(self.roles and set(self.roles) <= set(members) for members in STAGES.values()):
            raise ValueError(f"projection {self.name}: roles {self.roles} must be roles of one stage ({STAGES})")
        if self.group not in ("self_attn", "mlp"):
            raise ValueError(f"projection {self.name}: group must be self_attn or mlp, found {self.group}")

    @property
    def stage(self) -> str:
        return next(s for s, members in STAGES.items() if self.roles[0] in members)


def separate() -> tuple[Projection, ...]:
    """One projection per role (Llama's seven: q_proj ... down_proj)."""
    return tuple(Projection(f"{r}_proj", "self_attn" if r in ("q", "k", "v", "o") else "mlp", (r,)) for r in ROLES)


@dataclass(frozen=True)
class LayerNorms:
    """Weight names (under model.layers.{l}.) of the norms around a layer's two blocks; None: absent.

    Llama:  h += attn(norm_attn_in(h));              h += mlp(norm_mlp_in(h))
    Gemma:  h += norm_attn_out(attn(norm_attn_in(h))); h += norm_mlp_out(mlp(norm_mlp_in(h)))
    """
    attn_in: str = "input_layernorm"
    attn_out: str | None = None
    mlp_in: str = "post_attention_layernorm"
    mlp_out: str | None = None

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.attn_in, self.attn_out, self.mlp_in, self.mlp_out) if n is not None)


class Family:
    """The Llama architecture; other families override what differs: the class attributes (structure,
    the same for every checkpoint of the family) and the config hooks (what config.json sets)."""
    name: ClassVar[str] = ""  # the config's model_type
    projections: ClassVar[tuple[Projection, ...]] = separate()
    norms: ClassVar[LayerNorms] = LayerNorms()
    norm: ClassVar[str] = "rms"  # rms: w * x^ (Llama); rms_one_plus: (1 + w) * x^ in float32 (Gemma)
    qk_norm: ClassVar[bool] = False  # per-head RMSNorm of q and k before RoPE (self_attn.q_norm / k_norm [head_dim])
    partial_rotary: ClassVar[bool] = False  # honours rope partial_rotary_factor (RoPE on the first dims of a head)
    act_key: ClassVar[str] = "hidden_act"  # the config key naming the MLP activation
    activations: ClassVar[tuple[str, ...]] = ("silu",)  # the config values accepted for it
    default_head_dim: ClassVar[int | None] = None  # head_dim when the config names none (None: hidden / heads)
    default_theta: ClassVar[float] = 10000.0  # RoPE base when the config names none
    rope_aliases: ClassVar[dict[str, str]] = {}  # older rope_type names the family's config class renames
    rope_types: ClassVar[tuple[str, ...] | None] = None  # the rope types its config class accepts (None: all)

    # ---- config hooks: what a checkpoint's config.json sets ------------------------------------
    def bias_modules(self, cfg: dict, where: str) -> tuple[str, ...]:
        """Projections that carry a bias: attention_bias -> every attention projection, mlp_bias -> every MLP one."""
        out: tuple[str, ...] = ()
        for key, group in (("attention_bias", "self_attn"), ("mlp_bias", "mlp")):
            if config_value(cfg, key, bool, where, False):
                out += tuple(p.name for p in self.projections if p.group == group)
        return out

    def sliding_window(self, cfg: dict, where: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
        """(window, the layers that use it). Llama has none."""
        return None, ()

    def query_scale(self, cfg: dict, where: str, head_dim: int) -> float:
        """The factor on q.k before the softmax."""
        return head_dim ** -0.5

    def softcaps(self, cfg: dict, where: str) -> tuple[float | None, float | None]:
        """(attention logit cap, final logit cap): x -> cap * tanh(x / cap); None: no capping."""
        return None, None

    def embed_scale(self, cfg: dict, where: str, hidden_size: int) -> float:
        """The factor on the embeddings (Gemma: sqrt(hidden_size))."""
        return 1.0

    def rope_parameters(self, cfg: dict, where: str) -> tuple[dict, str]:
        """(the RoPE parameter dict, where it was found), as transformers 5 takes them: a published
        `rope_scaling` replaces `rope_parameters` whole (its base then comes from top-level rope_theta)."""
        scaling = config_value(cfg, "rope_scaling", dict, where, None)
        if scaling:
            return dict(scaling), "rope_scaling"
        return dict(config_value(cfg, "rope_parameters", dict, where, None) or {}), "rope_parameters"

    def ropes(self, cfg: dict, where: str, rotary_dim: int, max_positions: int) -> tuple[Rope, Rope | None]:
        """(the RoPE of full-attention layers, that of sliding layers when it differs, else None)."""
        params, key = self.rope_parameters(cfg, where)
        nested = [k for k in params if k in ("full_attention", "sliding_attention")]
        if nested:
            raise AdafuseError(f"{where}: {key} keyed by layer type ({', '.join(nested)}) is not supported for "
                               f"model_type '{self.name}' (expected one parameter object for every layer)")
        original = None
        if "original_max_position_embeddings" in cfg:  # transformers: a top-level value wins over the parameters'
            original = config_value(cfg, "original_max_position_embeddings", int, where)
        return self.rope(params, RopeContext(where, key, rotary_dim, max_positions, original),
                         config_value(cfg, "rope_theta", (int, float), where, self.default_theta)), None

    def rope(self, params: dict, ctx: RopeContext, default_theta: float) -> Rope:
        """One parameter dict through the family's aliases and accepted types, then rope.parse_rope."""
        kind = params.get("rope_type", params.get("type", "default"))
        if isinstance(kind, str) and kind in self.rope_aliases:
            params = {**params, "rope_type": self.rope_aliases[kind]}
            kind = params["rope_type"]
        if self.rope_types is not None and kind not in self.rope_types:
            raise ctx.fail(f"rope type {kind!r} is not supported for model_type '{self.name}' (expected one of "
                           f"{', '.join(self.rope_types)})")
        return parse_rope(params, ctx, default_theta)

    def tie_default(self) -> bool:
        return False

    # ---- the parse every family shares ------------------------------------------------------------
    def parse(self, cfg: dict, where: str) -> ModelSpec:
        hidden = positive(config_value(cfg, "hidden_size", int, where), "hidden_size", where)
        heads = positive(config_value(cfg, "num_attention_heads", int, where), "num_attention_heads", where)
        kv_heads = positive(config_value(cfg, "num_key_value_heads", int, where, heads), "num_key_value_heads", where)
        if heads % kv_heads:
            raise AdafuseError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = config_value(cfg, "head_dim", int, where, self.default_head_dim)
        if head_dim is not None:
            positive(head_dim, "head_dim", where)
        else:
            if hidden % heads:
                raise AdafuseError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
            head_dim = hidden // heads
        rope_params, key = self.rope_parameters(cfg, where)
        full = rope_params.get("full_attention", rope_params)
        if not isinstance(full, dict):
            raise AdafuseError(f"{where}: {key}['full_attention'] must be an object, found {str(full)[:40]!r}")
        factor = full.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 1:
            raise AdafuseError(f"{where}: partial_rotary_factor must be a number in (0, 1], found {factor!r}")
        if factor != 1 and not self.partial_rotary:
            raise AdafuseError(f"{where}: partial_rotary_factor {factor} is not supported for model_type '{self.name}' "
                               "(expected 1.0)")
        rotary_dim = int(head_dim * factor)
        if rotary_dim % 2 or rotary_dim == 0:
            raise AdafuseError(f"{where}: the rotary dimensions (head_dim {head_dim} x partial_rotary_factor {factor}) "
                               f"must be even and positive, found {rotary_dim}")
        act = config_value(cfg, self.act_key, str, where, self.activations[0])
        if act not in self.activations:
            raise AdafuseError(f"{where}: {self.act_key} '{act}' is not supported for model_type '{self.name}' "
                               f"(expected {' or '.join(repr(a) for a in self.activations)})")
        max_positions = positive(config_value(cfg, "max_position_embeddings", int, where, 4096),
                                 "max_position_embeddings", where)
        rope, sliding_rope = self.ropes(cfg, where, rotary_dim, max_positions)
        num_layers = positive(config_value(cfg, "num_hidden_layers", int, where), "num_hidden_layers", where)
        window, sliding_layers = self.sliding_window(cfg, where, num_layers)
        attn_cap, final_cap = self.softcaps(cfg, where)
        return ModelSpec(
            arch=self,
            vocab_size=positive(config_value(cfg, "vocab_size", int, where), "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=positive(config_value(cfg, "intermediate_size", int, where), "intermediate_size", where),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope=rope,
            rms_norm_eps=positive(float(config_value(cfg, "rms_norm_eps", (int, float), where, 1e-6)), "rms_norm_eps", where),
            tie_word_embeddings=config_value(cfg, "tie_word_embeddings", bool, where, self.tie_default()),
            bias_modules=self.bias_modules(cfg, where),
            hidden_act=ACTIVATIONS[act],
            rotary_dim=rotary_dim,
            query_scale=self.query_scale(cfg, where, head_dim),
            sliding_window=window,
            sliding_layers=sliding_layers,
            sliding_rope=sliding_rope,
            attn_softcap=attn_cap,
            final_softcap=final_cap,
            embed_scale=self.embed_scale(cfg, where, hidden),
            max_position_embeddings=max_positions,
        )

    # ---- structure queries ---------------------------------------------------------------------
    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.projections)

    def projection(self, module: str) -> Projection:
        for p in self.projections:
            if p.name == module:
                return p
        raise KeyError(module)

    def stage_projections(self, stage: str) -> tuple[Projection, ...]:
        """The projections that compute a stage's roles, in role order."""
        return tuple(p for p in self.projections if p.stage == stage)

    def module_path(self, layer: int, module: str) -> str:
        """layers.{l}.{self_attn|mlp}.{module}: a projection's place in the decoder stack."""
        return f"layers.{layer}.{self.projection(module).group}.{module}"

    def weight_prefix(self, layer: int, module: str) -> str:
        return f"model.{self.module_path(layer, module)}"

    @staticmethod
    def norm_weight(layer: int, norm: str) -> str:
        return f"model.layers.{layer}.{norm}.weight"

    @staticmethod
    def qk_norm_weight(layer: int, role: str) -> str:
        return f"model.layers.{layer}.self_attn.{role}_norm.weight"

    def check_adapter_modules(self, modules: tuple[str, ...], attention_ok: bool, ffn_experts: bool, where: str) -> None:
        """Adapter targets must be projections of this family; `attention_ok` False: only MLP projections
        may be adapted (a pre-gate reading layer 0's MLP input); `ffn_experts`: MixLoRA routes MLP ones only."""
        for m in modules:
            if m not in self.module_names:
                raise AdafuseError(f"{where}: unknown module '{m}' for model_type '{self.name}' "
                                   f"(expected one of {', '.join(self.module_names)})")
        attn = [m for m in modules if self.projection(m).group == "self_attn"]
        if attn and not attention_ok:
            raise AdafuseError(f"{where}: pregate_input 'mlp_norm_0' comes after layer 0's attention, so attention "
                               f"modules cannot be adapted (found {attn})")
        if ffn_experts and attn:
            raise AdafuseError(f"{where}: expert_kind 'ffn' routes FFN modules only, found target_modules {list(modules)}")


def window_size(cfg: dict, where: str) -> int | None:
    window = config_value(cfg, "sliding_window", int, where, None)
    return None if window is None else positive(window, "sliding_window", where)


def windows_from_layer_types(cfg: dict, where: str, num_layers: int, window: int | None,
                             default: tuple[int, ...]) -> tuple[int | None, tuple[int, ...]]:
    """Sliding layers as transformers 5 records them (`layer_types`), else `default`."""
    types = config_value(cfg, "layer_types", list, where, None)
    if types is None:
        layers = default
    else:
        kinds = ("full_attention", "sliding_attention")
        if len(types) != num_layers or not all(isinstance(t, str) and t in kinds for t in types):
            raise AdafuseError(f"{where}: layer_types must list {num_layers} of 'full_attention' / 'sliding_attention', "
                               f"found {types!r}")
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if layers and window is None:
        raise AdafuseError(f"{where}: layer_types names sliding_attention layers but sliding_window is not set")
    return (window, layers) if layers else (None, ())


_REGISTRY: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: one instance per model_type."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"family {cls.__name__}: name {cls.name!r} is empty or already registered")
    if cls.norm not in NORMS or not set(cls.activations) <= set(ACTIVATIONS):
        raise ValueError(f"family {cls.name}: norm {cls.norm!r} / activations {cls.activations} not implemented")
    roles = [r for p in cls.projections for r in p.roles]
    if sorted(roles) != sorted(ROLES):
        raise ValueError(f"family {cls.name}: projections must compute each role once, found {roles}")
    _REGISTRY[cls.name] = cls()
    return cls


def get(model_type: str, where: str = "config") -> Family:
    if model_type not in _REGISTRY:
        raise AdafuseError(f"{where}: model_type '{model_type}' is not supported (expected one of {', '.join(names())})")
    return _REGISTRY[model_type]


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)
