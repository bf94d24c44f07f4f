"""Checkpoints written by the real source libraries, for converter tests.

Plain functions (no tests here): each writes a tiny, seeded checkpoint into a
directory, or returns the real library's float32 logits for given input ids.

- ``transformers``: the base model (llama / mistral / qwen2).
- ``peft``: plain LoRA adapters (``get_peft_model`` + ``save_pretrained``).
- ``moe_peft`` 2.0.2: MixLoRA, LoRAMoE and MoLA adapters, written by MoE-PEFT's
  own save path (``LLMModel.get_adapter_weight_dict`` + ``config.export()``, as
  ``moe_peft.trainer.save_adapter_weight`` does) and run by its own forward.
- ``mixlora`` 0.2.3 (PyPI): loads and runs MixLoRA checkpoints (it has no save
  path of its own; MoE-PEFT is the trainer that writes them).

MoE-PEFT 2.0.2 pins transformers<4.47 and imports ``datasets``/``evaluate``; it
runs here (transformers 5.x, CPU) with two local shims, see ``_import_moe_peft``
and ``_moe_peft_model``. Both MoE libraries leave LoRA dropout active at
inference (their LoRA modules live in plain dicts that ``model.eval()`` never
reaches); the forward helpers below switch it off, which is the intended math.

``moe_peft_reference_logits`` is an independent pure-torch implementation of
docs/formats/moe-peft.md (per-token loops), the third opinion on the math.

Heavy imports (torch, transformers, peft, moe_peft, mixlora) are done inside
the functions, so importing this module is cheap.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import math
import os
import sys
import types
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

TINY_DIMS = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    intermediate_size=96,
    max_position_embeddings=256,
)

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
MOE_PEFT_KINDS = ("mixlora", "loramoe", "mola")

# A few fixed prompts (ids < TINY_DIMS["vocab_size"]).
SAMPLE_IDS = [[1, 5, 9, 33, 100, 7, 64, 2], [3, 3, 17, 120, 45, 8, 99, 11]]


def _ids_tensor(input_ids):
    import torch

    t = torch.as_tensor(input_ids, dtype=torch.long)
    return t.unsqueeze(0) if t.dim() == 1 else t


# ----------------------------------------------------------------- base model
def write_hf_base(
    dir,
    family: str = "llama",
    seed: int = 0,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.1,
    **overrides,
) -> Path:
    """Write a tiny random ``family`` (llama / mistral / qwen2 / qwen3 / phi3 / gemma2 / gemma3_text) causal
    LM with ``save_pretrained`` (float32, safetensors) into ``dir``; return the path.

    ``initializer_range`` is larger than HF's 0.02 so that adapters and routes
    change the logits visibly. ``overrides`` go into the config."""
    import torch
    import transformers

    configs = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "phi3": transformers.Phi3Config,
        "gemma2": transformers.Gemma2Config,
        "gemma3_text": transformers.Gemma3TextConfig,
    }
    if family not in configs:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(configs)}")
    dims = dict(TINY_DIMS)
    dims.update(tie_word_embeddings=tie_word_embeddings, initializer_range=initializer_range)
    dims.update(overrides)
    cfg = configs[family](**dims)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # RMSNorm weights start at 1 (Gemma's at 0: it scales by 1 + w): perturb them so a wrong norm is caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _load_hf(base_dir, **config):
    """The base model in float32; ``config`` overrides keys of its config.json."""
    import torch
    import transformers

    # eager: the attention written out in PyTorch ops, the only one that applies Gemma 2's logit soft-capping
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32,
                                                              attn_implementation="eager", **config)
    return model.eval()


def hf_forward_logits(base_dir, input_ids) -> "torch.Tensor":
    """Logits [B, T, vocab] (float32) of the plain base model."""
    import torch

    model = _load_hf(base_dir)
    with torch.no_grad():
        return model(_ids_tensor(input_ids)).logits.float()


# ---------------------------------------------------------------- PEFT LoRA
def write_peft_lora(
    dir,
    base_dir,
    use_rslora: bool = False,
    rank_pattern: Optional[Dict[str, int]] = None,
    alpha_pattern: Optional[Dict[str, int]] = None,
    target_modules: Sequence[str] = ALL_LINEARS,
    r: int = 4,
    lora_alpha: int = 8,
    seed: int = 0,
    init_scale: float = 0.1,
) -> Path:
    """Write a PEFT LoRA adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``) for the base at ``base_dir`` with real
    ``peft`` (``get_peft_model`` + ``save_pretrained``).

    lora_B is re-drawn as N(0, init_scale) (PEFT initialises it to zero, which
    would make the adapter a no-op); lora_A keeps PEFT's kaiming init. Patterns
    are PEFT's ``rank_pattern``/``alpha_pattern`` (regex/suffix -> int)."""
    import peft
    import torch

    base = _load_hf(base_dir)
    cfg = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
    )
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, cfg)
    _redraw(model, "lora_B", seed + 1, init_scale)
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    _point_at_base(out, base_dir)
    return out


def _redraw(model, part: str, seed: int, scale: float) -> None:
    """Parameters whose name contains `part` drawn again from N(0, scale) (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if part in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _point_at_base(adapter_dir: Path, base_dir) -> None:
    """save_pretrained records the base's own name_or_path: point it at base_dir."""
    cfg_path = adapter_dir / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(data, indent=2))


def peft_forward_logits(adapter_dir, base_dir, input_ids) -> "torch.Tensor":
    """Logits [B, T, vocab] (float32) of the base + PEFT adapter, run by peft."""
    import peft
    import torch

    model = peft.PeftModel.from_pretrained(_load_hf(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=_ids_tensor(input_ids)).logits.float()


# ------------------------------------------------------------------ MoE-PEFT
def _import_moe_peft():
    """Import moe_peft 2.0.2 here: it imports ``datasets`` and ``evaluate`` at
    top level (only used for training tasks). Missing ones are stubbed for the
    duration of the import and removed from sys.modules afterwards."""
    if "moe_peft" in sys.modules:
        return sys.modules["moe_peft"]
    inserted = []
    for name in ("datasets", "evaluate"):
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = stub
            inserted.append(name)
    os.environ.setdefault("MOE_PEFT_EXECUTOR_TYPE", "CPU")
    try:
        return importlib.import_module("moe_peft")
    finally:
        for name in inserted:
            sys.modules.pop(name, None)


def _moe_peft_model(base_dir):
    """moe_peft.LLMModel over the HF base at base_dir (float32, CPU).

    Replaces ``LLMModel.from_pretrained``, which reads ``config.rope_theta`` /
    ``config.rope_scaling`` (gone in transformers 5: now ``rope_parameters``);
    the two attributes are set on this config instance only. A config's sliding
    window is honoured (MoE-PEFT's Gemma 2 then equals transformers' eager forward;
    without the flag it attends to the whole prefix)."""
    moe_peft = _import_moe_peft()
    from moe_peft.models import from_pretrained as mp_from_pretrained

    hf = _load_hf(base_dir)
    hf.requires_grad_(False)
    cfg = hf.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    if "rope_theta" not in cfg.__dict__:
        cfg.rope_theta = rope.get("rope_theta", 10000.0)
    if "rope_scaling" not in cfg.__dict__:
        rtype = rope.get("rope_type", "default")
        cfg.rope_scaling = None if rtype == "default" else dict(rope)
    window = getattr(cfg, "sliding_window", None) is not None  # MoE-PEFT's Llama refuses the flag
    model = mp_from_pretrained(hf, attn_impl="eager", use_sliding_window=window, device="cpu")
    return moe_peft.LLMModel(model)


def _moe_peft_adapter_dict(
    kind: str,
    num_experts: int,
    top_k: int,
    r: int,
    lora_alpha: int,
    target_modules: Sequence[str],
    use_rslora: bool,
    lora_dropout: float,
    expert_r: Optional[int],
    expert_alpha: Optional[int],
    act_fn: Optional[str],
) -> dict:
    d = {
        "peft_type": {"mixlora": "MIXLORA", "loramoe": "LORAMOE", "mola": "MOLA"}[kind],
        "routing_strategy": kind,
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "target_modules": list(target_modules),
        "num_experts": num_experts,
    }
    if use_rslora:
        d["use_rslora"] = True
    if kind in ("mixlora", "mola"):
        d["top_k"] = top_k
    if kind == "mixlora":
        if act_fn is not None:
            d["act_fn"] = act_fn
        if expert_r is not None or expert_alpha is not None:
            d["expert_lora"] = {
                "r": expert_r if expert_r is not None else r,
                "lora_alpha": expert_alpha if expert_alpha is not None else lora_alpha,
                "lora_dropout": lora_dropout,
            }
    elif expert_r is not None or expert_alpha is not None:
        raise ValueError("expert_r/expert_alpha exist for MixLoRA only")
    return d


def _iter_moe_peft_loras(llm_model):
    """Every moe_peft Lora object and MoE block of an LLMModel."""
    for layer in llm_model.model_.layers_:
        attn, mlp = layer.state_dict()
        for lin in list(attn.values()) + list(mlp.values()):
            yield from lin.loras_.values()
            yield from lin.moes_.values()
        yield from layer.mlp_.moes_.values()


def write_moe_peft(
    dir,
    base_dir,
    kind: str = "mixlora",
    num_experts: int = 4,
    top_k: int = 2,
    r: int = 4,
    lora_alpha: int = 8,
    target_modules: Sequence[str] = ALL_LINEARS,
    use_rslora: bool = False,
    lora_dropout: float = 0.05,
    expert_r: Optional[int] = None,
    expert_alpha: Optional[int] = None,
    act_fn: Optional[str] = None,
    seed: int = 0,
    init_scale: float = 0.1,
    router_scale: float = 1.0,
) -> Path:
    """Write a MoE-PEFT adapter of ``kind`` (mixlora / loramoe / mola) with
    moe_peft's own init and save path: ``adapter_config.json`` (from
    ``config.export()``, plus base_model_name_or_path and task_type as
    ``trainer.save_adapter_weight`` adds) and ``adapter_model.bin``
    (``torch.save`` of ``get_adapter_weight_dict``; a causal-LM task adds no
    output-layer key, a classification task would add ``classifier``).

    After moe_peft's init, every lora_B is re-drawn as N(0, init_scale) and
    every router as N(0, router_scale) so that routes and experts matter.
    ``expert_r``/``expert_alpha`` (MixLoRA only) write an ``expert_lora``
    section: experts then use that rank/alpha, attention LoRA the top-level one.
    ``act_fn`` None lets MoE-PEFT record the base FFN's (``hidden_act``)."""
    import torch

    if kind not in MOE_PEFT_KINDS:
        raise ValueError(f"unknown MoE-PEFT kind {kind!r}; expected one of {MOE_PEFT_KINDS}")
    _import_moe_peft()
    from moe_peft.adapters import lora_config_factory

    out = Path(dir)
    adapter_name = out.name or "adapter"
    conf_dict = _moe_peft_adapter_dict(
        kind, num_experts, top_k, r, lora_alpha, target_modules, use_rslora,
        lora_dropout, expert_r, expert_alpha, act_fn,
    )
    config = lora_config_factory(conf_dict)
    config.adapter_name = adapter_name
    config.task_name = "casual"

    llm = _moe_peft_model(base_dir)
    torch.manual_seed(seed)
    llm.init_adapter(config, None)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for obj in _iter_moe_peft_loras(llm):
            if hasattr(obj, "lora_b_"):
                obj.lora_b_.weight.copy_(torch.randn(obj.lora_b_.weight.shape, generator=gen) * init_scale)
            elif hasattr(obj, "gate_"):
                g = obj.gate_.weight
                g.copy_(torch.randn(g.shape, generator=gen) * router_scale)

    # == moe_peft.trainer.save_adapter_weight, minus its TrainConfig argument.
    weights = llm.get_adapter_weight_dict(adapter_name)
    exported = llm.adapter_configs_[adapter_name].export()
    exported["base_model_name_or_path"] = str(base_dir)
    exported["task_type"] = "CAUSAL_LM"
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in weights.items()}, out / "adapter_model.bin")
    with open(out / "adapter_config.json", "w") as f:
        json.dump(exported, f, indent=4)
    return out


def moe_peft_forward_logits(adapter_dir, base_dir, input_ids) -> "torch.Tensor":
    """Logits [B, T, vocab] (float32) of base + adapter run by moe_peft's own
    forward (``LLMModel.load_adapter`` + ``forward`` with inference_mode_),
    LoRA dropout off and the non-fused ("compatible") operators."""
    import torch

    moe_peft = _import_moe_peft()
    llm = _moe_peft_model(base_dir)
    name = llm.load_adapter(str(adapter_dir), "fixture")
    for obj in _iter_moe_peft_loras(llm):
        if hasattr(obj, "eval"):  # Lora is an nn.Module; MoE blocks hold no dropout
            obj.eval()
    ids = _ids_tensor(input_ids)
    inp = moe_peft.LLMModelInput(
        batch_configs_=[moe_peft.LLMBatchConfig(adapter_name_=name, batch_start_idx_=0, batch_end_idx_=ids.shape[0])],
        batch_tokens_=ids.tolist(),
        inference_mode_=True,
        # the fused plain-LoRA operator calls F.dropout unconditionally
        efficient_operator_=False,
        output_router_logits_=False,
    )
    with torch.no_grad():
        return llm.forward(inp)[0].logits.float()


def mixlora_forward_logits(adapter_dir, base_dir, input_ids) -> "torch.Tensor":
    """Logits [B, T, vocab] (float32) of base + MixLoRA adapter run by the
    ``mixlora`` PyPI package (``load_adapter_weights`` +
    ``inject_adapter_in_model``), its expert dropout switched off.

    mixlora 0.2.3 needs ``act_fn`` in adapter_config.json (None crashes) and
    gives experts the top-level r/lora_alpha (it ignores ``expert_lora``)."""
    import mixlora
    import torch

    config, weights = mixlora.load_adapter_weights(str(adapter_dir), device="cpu", dtype=torch.float32)
    model = _load_hf(base_dir)
    mixlora.inject_adapter_in_model(model, config, weights)
    model.eval()
    for layer in model.model.layers:
        for moe in getattr(layer.mlp, "mixlora_moes", {}).values():
            for expert in moe.experts_.values():
                expert.eval()
    with torch.no_grad():
        return model(_ids_tensor(input_ids)).logits.float()


# ------------------------------------------- independent reference (pure torch)
def _load_moe_peft_dir(adapter_dir):
    import torch

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = torch.load(adapter_dir / "adapter_model.bin", map_location="cpu", weights_only=True)
    return cfg, {k: v.float() for k, v in weights.items()}


def _scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def moe_peft_reference_logits(adapter_dir, base_dir, input_ids) -> "torch.Tensor":
    """Logits [B, T, vocab] (float32) of base + MoE-PEFT adapter computed from
    docs/formats/moe-peft.md alone: the HF base model with its linears / MLPs
    wrapped by straightforward per-token loops (no moe_peft, no mixlora).
    Supports routing_strategy mixlora / loramoe / mola, llama-style MLPs."""
    import torch
    import torch.nn.functional as F
    from transformers.activations import ACT2FN

    cfg, W = _load_moe_peft_dir(adapter_dir)
    kind = cfg["routing_strategy"]
    if kind not in MOE_PEFT_KINDS:
        raise ValueError(f"reference supports {MOE_PEFT_KINDS}, not {kind!r}")
    prefix = kind
    E = int(cfg["num_experts"])
    rs = bool(cfg.get("use_rslora", False))
    s_top = _scale(cfg["r"], cfg["lora_alpha"], rs)
    exp = dict(cfg, **cfg.get("expert_lora", {})) if kind == "mixlora" else cfg
    s_exp = _scale(exp["r"], exp["lora_alpha"], bool(exp.get("use_rslora", False)))
    top_k = int(cfg.get("top_k", 2))
    targets = set(cfg["target_modules"])

    model = _load_hf(base_dir)
    act = ACT2FN[cfg.get("act_fn") or model.config.hidden_act]

    def delta(x, a, b, s):  # x [in] -> s * B A x  [out]
        return s * (b @ (a @ x))

    def route(logits, k):  # softmax in fp32, top-k, renormalise
        p = torch.softmax(logits.float(), dim=-1)
        w, idx = torch.topk(p, k)
        return w / w.sum(), idx

    class PlainLoRA(torch.nn.Module):
        def __init__(self, base, key):
            super().__init__()
            self.base, self.a, self.b = base, W[f"{key}.lora_A.weight"], W[f"{key}.lora_B.weight"]

        def forward(self, x):
            y = self.base(x)
            flat = x.reshape(-1, x.shape[-1])
            d = torch.stack([delta(t, self.a, self.b, s_top) for t in flat])
            return y + d.reshape(y.shape)

    class PerLinearMoE(torch.nn.Module):  # LoRAMoE (dense) / MoLA (top-k)
        def __init__(self, base, key):
            super().__init__()
            self.base, self.gate = base, W[f"{key}.moe_gate.weight"]
            self.A = [W[f"{key}.experts.{e}.lora_A.weight"] for e in range(E)]
            self.B = [W[f"{key}.experts.{e}.lora_B.weight"] for e in range(E)]

        def forward(self, x):
            y = self.base(x)
            out = []
            for t in x.reshape(-1, x.shape[-1]):
                logits = self.gate @ t
                if kind == "loramoe":
                    w, idx = torch.softmax(logits, -1), range(E)
                    pairs = [(w[e], e) for e in idx]
                else:
                    w, idx = route(logits, top_k)
                    pairs = list(zip(w, idx.tolist()))
                out.append(sum(g * delta(t, self.A[e], self.B[e], s_top) for g, e in pairs))
            return y + torch.stack(out).reshape(y.shape)

    class MixLoRAMLP(torch.nn.Module):
        def __init__(self, mlp, layer):
            super().__init__()
            self.mlp, key = mlp, f"{prefix}.layers.{layer}.mlp"
            self.gate = W[f"{key}.moe_gate.weight"]
            self.lora = {}
            for p in MLP_LINEARS:
                if p in targets:
                    self.lora[p] = [
                        (W[f"{key}.{p}.experts.{e}.lora_A.weight"], W[f"{key}.{p}.experts.{e}.lora_B.weight"])
                        for e in range(E)
                    ]

        def lin(self, p, e, x):
            y = F.linear(x, getattr(self.mlp, p).weight)
            if p in self.lora:
                a, b = self.lora[p][e]
                y = y + delta(x, a, b, s_exp)
            return y

        def forward(self, x):
            out = []
            for t in x.reshape(-1, x.shape[-1]):
                w, idx = route(self.gate @ t, top_k)
                acc = torch.zeros_like(t)
                for g, e in zip(w, idx.tolist()):
                    h = act(self.lin("gate_proj", e, t)) * self.lin("up_proj", e, t)
                    acc = acc + g * self.lin("down_proj", e, h)
                out.append(acc)
            return torch.stack(out).reshape(x.shape)

    for L, layer in enumerate(model.model.layers):
        for p in ATTN_LINEARS:
            if p not in targets:
                continue
            key = f"{prefix}.layers.{L}.self_attn.{p}"
            base = getattr(layer.self_attn, p)
            wrap = PerLinearMoE(base, key) if kind == "mola" else PlainLoRA(base, key)
            setattr(layer.self_attn, p, wrap)
        if kind == "mixlora":
            layer.mlp = MixLoRAMLP(layer.mlp, L)
        else:
            for p in MLP_LINEARS:
                if p in targets:
                    key = f"{prefix}.layers.{L}.mlp.{p}"
                    setattr(layer.mlp, p, PerLinearMoE(getattr(layer.mlp, p), key))
    model.eval()
    with torch.no_grad():
        return model(_ids_tensor(input_ids)).logits.float()


def write_moe_peft_synthetic(
    dir,
    base_dir,
    kind: str = "mixlora",
    num_experts: int = 4,
    top_k: int = 2,
    r: int = 4,
    lora_alpha: int = 8,
    target_modules: Sequence[str] = ALL_LINEARS,
    seed: int = 0,
) -> Path:
    """Write the documented MoE-PEFT layout with random tensors and no library
    (``torch.save`` adapter_model.bin + adapter_config.json), for machines
    without moe_peft. Same layout as ``write_moe_peft``."""
    import torch

    if kind not in MOE_PEFT_KINDS:
        raise ValueError(f"unknown MoE-PEFT kind {kind!r}; expected one of {MOE_PEFT_KINDS}")
    base_cfg = json.loads((Path(base_dir) / "config.json").read_text())
    H, I = base_cfg["hidden_size"], base_cfg["intermediate_size"]
    nh, nkv = base_cfg["num_attention_heads"], base_cfg["num_key_value_heads"]
    hd = base_cfg.get("head_dim") or H // nh
    shapes = {
        "q_proj": (H, nh * hd), "k_proj": (H, nkv * hd), "v_proj": (H, nkv * hd),
        "o_proj": (nh * hd, H), "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H),
    }
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, std=0.1: torch.randn(*s, generator=gen) * std  # noqa: E731
    W = {}
    for L in range(base_cfg["num_hidden_layers"]):
        if kind == "mixlora":
            W[f"mixlora.layers.{L}.mlp.moe_gate.weight"] = rnd(num_experts, H, std=1.0)
        for p in target_modules:
            mod = "self_attn" if p in ATTN_LINEARS else "mlp"
            key = f"{kind}.layers.{L}.{mod}.{p}"
            fin, fout = shapes[p]
            moe = (kind == "mola") or (mod == "mlp")
            if not moe:
                W[f"{key}.lora_A.weight"], W[f"{key}.lora_B.weight"] = rnd(r, fin), rnd(fout, r)
                continue
            if kind != "mixlora":
                W[f"{key}.moe_gate.weight"] = rnd(num_experts, fin, std=1.0)
            for e in range(num_experts):
                W[f"{key}.experts.{e}.lora_A.weight"] = rnd(r, fin)
                W[f"{key}.experts.{e}.lora_B.weight"] = rnd(fout, r)
    cfg = _moe_peft_adapter_dict(kind, num_experts, top_k, r, lora_alpha, target_modules, False, 0.05, None, None,
                                 base_cfg.get("hidden_act", "silu") if kind == "mixlora" else None)
    cfg = dict(bias="none", **cfg, base_model_name_or_path=str(base_dir), task_type="CAUSAL_LM")
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(W, out / "adapter_model.bin")
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=4))
    return out


def available(module: str) -> bool:
    """True when ``module`` imports (moe_peft through its shim)."""
    try:
        if module == "moe_peft":
            _import_moe_peft()
        else:
            importlib.import_module(module)
        return True
    except Exception:
        return False


# ------------------------------------------------------------------ PEFT X-LoRA
def write_peft_xlora(dir, base_dir, input_ids, lora_specs: Sequence[dict], seed: int = 0, classifier_scale: float = 1.0,
                     **xlora_config):
    """Write LoRA adapters (``write_peft_lora`` kwargs in ``lora_specs``) under ``dir``, build an X-LoRA model over
    them with real ``peft`` (``XLoraConfig`` + ``get_peft_model``; the classifier drawn from N(0, classifier_scale)),
    run PEFT's forward on ``input_ids`` and save it with ``save_pretrained`` into ``dir/xlora``.

    Returns (checkpoint dir, PEFT's float32 logits [B, T, vocab], PEFT's greedy ``generate`` of 4 new tokens from
    the first prompt). The logits come from the model before saving: PEFT 0.21's own reload of an X-LoRA
    checkpoint loses the classifier's first layer (docs/formats/xlora.md)."""
    import peft
    import torch

    root = Path(dir)
    adapters = {str(i): str(write_peft_lora(root / f"lora{i}", base_dir, seed=seed + 10 * i, **kw))
                for i, kw in enumerate(lora_specs)}
    model = _load_hf(base_dir)
    model.config.use_cache = False  # X-LoRA refuses a KV cache
    hidden = json.loads((Path(base_dir) / "config.json").read_text())["hidden_size"]
    cfg = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=hidden, adapters=adapters, **xlora_config)
    xmodel = peft.get_peft_model(model, cfg).eval()
    _redraw(xmodel, "internal_xlora_classifier", seed + 7, classifier_scale)
    with torch.no_grad():
        ids = _ids_tensor(input_ids)
        logits = xmodel(input_ids=ids).logits.float()
        generated = xmodel.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False)[:, ids.shape[1]:]
    out = root / "xlora"
    xmodel.save_pretrained(str(out))
    _point_at_base(out, base_dir)
    return out, logits, generated
