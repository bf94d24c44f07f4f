"""Checkpoints in the exact layout of the HydraLoRA and LoRAMoE authors' peft forks, and a float64
forward written from their equations (no package of either fork is on PyPI, so the save path is
re-enacted here; sources cited in docs/formats/hydralora.md and docs/formats/loramoe-original.md).

Their save path (both forks, an early peft): ``PeftModel.save_pretrained`` writes
``torch.save(get_peft_model_state_dict(model))`` to ``adapter_model.bin`` (every state-dict key
containing ``lora_``, prefix ``base_model.model.``) and ``LoraConfig.__dict__`` as JSON to
``adapter_config.json`` with ``inference_mode`` set to true.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

MLP_ORDER = ("gate_proj", "down_proj", "up_proj")  # registration order in the forks' LlamaMLP
ATTN_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_fork_adapter(dir, base_dir, layout: str, lora_nums: int = 3, r: int = 4, lora_alpha: float = 8.0,
                       target_modules: Sequence[str] = ("gate_proj", "down_proj", "up_proj"), seed: int = 0,
                       dtype: str = "float32", blc: bool = True) -> Path:
    """Write a `layout` ('hydralora' or 'loramoe') adapter for the tiny base at base_dir.

    Initialised like the forks (kaiming-uniform router and A), except that B is drawn from N(0, 0.1)
    instead of zeros so that the experts change the logits. blc: write the balancing-loss keys
    (blc_alpha/blc_weight) of LoRAMoE and HydraLoRA's later fork; HydraLoRA's first release lacks them."""
    import torch

    cfg_base = json.loads((Path(base_dir) / "config.json").read_text())
    hidden, inter = cfg_base["hidden_size"], cfg_base["intermediate_size"]
    heads, kv = cfg_base["num_attention_heads"], cfg_base.get("num_key_value_heads", cfg_base["num_attention_heads"])
    head_dim = cfg_base.get("head_dim") or hidden // heads
    shapes = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv * head_dim, hidden), "v_proj": (kv * head_dim, hidden),
              "o_proj": (hidden, heads * head_dim), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter)}
    gen = torch.Generator().manual_seed(seed)

    def kaiming(rows, cols):  # nn.init.kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1 / math.sqrt(cols)
        return (torch.rand(rows, cols, generator=gen) * 2 - 1) * bound

    state = {}
    for layer in range(cfg_base["num_hidden_layers"]):
        for group, order in (("self_attn", ATTN_ORDER), ("mlp", MLP_ORDER)):
            for m in order:
                if m not in target_modules:
                    continue
                out, inp = shapes[m]
                p = f"base_model.model.model.layers.{layer}.{group}.{m}"
                state[f"{p}.lora_route.weight"] = kaiming(lora_nums, inp)
                if layout == "hydralora":
                    state[f"{p}.lora_A.weight"] = kaiming(r, inp)
                for i in range(lora_nums):
                    if layout == "loramoe":
                        state[f"{p}.lora_A{i}.weight"] = kaiming(r, inp)
                    state[f"{p}.lora_B{i}.weight"] = torch.randn(out, r, generator=gen) * 0.1
    state = {k: v.to(getattr(torch, dtype)) for k, v in state.items()}
    config = {"base_model_name_or_path": str(base_dir), "peft_type": "LORA", "task_type": "CAUSAL_LM",
              "inference_mode": True, "r": r, "target_modules": list(target_modules), "lora_alpha": lora_alpha,
              "lora_nums": lora_nums}
    if blc:
        config.update(blc_alpha=0.0, blc_weight=0.0)
    config.update(lora_dropout=0.05, merge_weights=False, fan_in_fan_out=False, enable_lora=None, bias="none",
                  modules_to_save=None)
    out_dir = Path(dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, out_dir / "adapter_model.bin")
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def fork_forward_logits_f64(adapter_dir, base_dir, input_ids) -> "torch.Tensor":
    """Logits of base + adapter in float64: transformers' llama with each adapted nn.Linear replaced by the forks'
    `Linear.forward` (inference: dropout off, not merged), read straight from their tensor names:
        route = softmax(lora_route(x));  y = W x + sum_i route_i * lora_B{i}(lora_A[{i}](x)) * lora_alpha / r
    """
    import torch
    import transformers

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    state = torch.load(Path(adapter_dir) / "adapter_model.bin", weights_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float64).eval()
    scaling = cfg["lora_alpha"] / cfg["r"]

    class ForkLinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear, prefix: str):
            super().__init__()
            self.base = base
            t = {k[len(prefix) + 1:]: v.double() for k, v in state.items() if k.startswith(prefix + ".")}
            self.route = t["lora_route.weight"]
            n = self.route.shape[0]
            self.A = [t.get("lora_A.weight", t.get(f"lora_A{i}.weight")) for i in range(n)]
            self.B = [t[f"lora_B{i}.weight"] for i in range(n)]

        def forward(self, x):
            result = self.base(x)
            route_weight = torch.softmax(x @ self.route.T, dim=-1)
            for i in range(len(self.B)):
                result = result + route_weight[..., i:i + 1] * ((x @ self.A[i].T) @ self.B[i].T) * scaling
            return result

    prefixes = {k.rsplit(".", 2)[0] for k in state}
    for name, module in list(model.named_modules()):
        key = f"base_model.model.{name}"
        if key in prefixes:
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, ForkLinear(module, key))
            prefixes.discard(key)
    assert not prefixes, f"adapter tensors for modules the model lacks: {sorted(prefixes)[:3]}"
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(input_ids)).logits
