"""Tiny, seeded example checkpoints in the canonical format.

Used by the README's first command, by `adafuse-export make-example`, and by the tests
(tests/conftest.py builds one of each kind). Weights are random but non-trivial: LoRA B
matrices are not zero, so every adapter changes the logits.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import Checkpoint, write_canonical
from .spec import AdapterSpec, ModelSpec
from .tensors import in_memory_source

TINY_CONFIG = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
}

ALL_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
MLP_ROLES = ("gate", "up", "down")
# name: adapter config (merged over defaults); target_roles / static_roles name roles
# (families.base.ROLES), adapted through whichever projections of the family compute them
KINDS = {
    "lora": dict(routing="none", target_roles=(), static_roles=("q", "v")),
    "pregate": dict(routing="pregate", target_roles=ALL_ROLES),
    "pregate-ffn": dict(routing="pregate", target_roles=MLP_ROLES, pregate_input="mlp_norm_0"),
    "mola": dict(routing="layerwise", router_kind="topk", target_roles=("q", "v", "down")),
    "loramoe": dict(routing="layerwise", router_kind="dense", normalize_topk=False, target_roles=MLP_ROLES),
    "mixlora": dict(routing="layerwise", expert_kind="ffn", target_roles=MLP_ROLES, static_roles=("q", "k", "v", "o")),
}


def modules_for(model: ModelSpec, roles) -> list[str]:
    """The family's projections that compute any of these roles (Phi-3's qkv_proj for q)."""
    return [p.name for p in model.arch.projections if set(p.roles) & set(roles)]


def make_example(out_dir: Path | str, kind: str = "pregate", family: str = "llama", seed: int = 0,
                 num_experts: int = 4, top_k: int = 2, r: int = 8, config: dict | None = None,
                 tied: bool = False) -> Checkpoint:
    """tied: the head reads the embedding matrix (tie_word_embeddings, as Gemma, small Qwen and Llama 3.2 ship)."""
    import torch

    out_dir = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.02):
        return torch.randn(*shape, generator=gen) * std

    cfg = {**TINY_CONFIG, "model_type": family, "tie_word_embeddings": tied, **(config or {})}
    model = ModelSpec.from_hf_config(cfg, "example config")
    base = {}
    for name, shape in model.hf_weight_shapes().items():
        if name.endswith("norm.weight"):
            base[name] = 1.0 + randn(*shape, std=0.1)
        elif name.endswith(".bias"):
            base[name] = randn(*shape, std=0.1)
        else:
            base[name] = randn(*shape, std=0.5 if "embed" in name else 0.08)
    adapter_cfg = dict(format_version=1, num_experts=num_experts if kind != "lora" else 1,
                       top_k=top_k if kind != "lora" else 1, r=r, lora_alpha=2.0 * r, **KINDS[kind])
    adapter_cfg["target_modules"] = modules_for(model, adapter_cfg.pop("target_roles"))
    adapter_cfg["static_modules"] = modules_for(model, adapter_cfg.pop("static_roles", ()))
    if adapter_cfg.get("router_kind") == "dense":
        adapter_cfg["top_k"] = num_experts
    adapter = AdapterSpec.from_json(adapter_cfg, f"example '{kind}'", model.num_layers)
    ckpt = Checkpoint(out_dir, "adafuse", cfg, model, adapter, in_memory_source(base, "example"),
                      in_memory_source({}, "example"))
    tensors = {}
    for name, (shape, _) in ckpt.expected_adapter_shapes().items():
        std = 1.0 if "router" in name or name.startswith("pregate") else 0.1
        tensors[name] = randn(*shape, std=std)
    ckpt.adapters = in_memory_source(tensors, "example")
    ckpt.validate()
    write_canonical(ckpt, out_dir)
    return ckpt
