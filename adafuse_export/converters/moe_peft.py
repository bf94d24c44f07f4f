"""`moe-peft`: MixLoRA, LoRAMoE and MoLA adapters as saved by MoE-PEFT (layouts and math:
docs/formats/moe-peft.md).

  MixLoRA  experts are whole FFNs behind one router per layer; attention targets are plain LoRA
  LoRAMoE  a dense softmax router per FFN linear; attention targets are plain LoRA
  MoLA     a top-k router per targeted linear (attention and FFN)
"""
from __future__ import annotations

import math
from pathlib import Path

from ..checkpoint import Checkpoint
from ..errors import AdafuseError
from ..families.base import ACTIVATIONS
from ..spec import AdapterSpec
from ..tensors import LazySource, TensorInfo, TensorSource, read_json
from . import Converter, register, resolve_base
from .adafuse import load_hf_base
from .peft_lora import ADAPTER_CONFIG, read_adapter_dir, stacked

STRATEGIES = ("mixlora", "loramoe", "mola")
UNSUPPORTED = {"mixlora-dynamic": "top-p routing", "mixlora-switch": "switch routing with capacity"}
PEFT_TYPES = {"MIXLORA": "mixlora", "LORAMOE": "loramoe", "MOLA": "mola"}


def _number(cfg: dict, key: str, where: Path, default=None, integer=False):
    value = cfg.get(key, default)
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or not 0 < value < 1 << 31:
        raise AdafuseError(f"{where}: '{key}' must be a positive {'integer' if integer else 'number'}, found {value!r}")
    return value


def _flag(cfg: dict, key: str, where: Path, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise AdafuseError(f"{where}: '{key}' must be true or false, found {value!r}")
    return value


def _stack(source: TensorSource, names: list[str], canonical: str) -> tuple[TensorInfo, object]:
    """Per-expert [r, in] matrices stacked into one [E, r, in] canonical tensor."""
    import torch

    infos = [source.info(n) for n in names]
    for info in infos[1:]:
        if info.shape != infos[0].shape:
            raise AdafuseError(f"{info.origin}: tensor '{info.name}' has shape {list(info.shape)}, expected "
                               f"{list(infos[0].shape)} like '{infos[0].name}' (experts must share one rank)")
    info = TensorInfo(canonical, (len(names),) + infos[0].shape, infos[0].dtype, infos[0].origin)
    return info, (lambda: torch.stack([source.get(n) for n in names]))


@register
class MoePeftConverter(Converter):
    name = "moe-peft"
    description = "MixLoRA / LoRAMoE / MoLA adapters saved by MoE-PEFT or mixlora (adapter_config.json + adapter_model.bin)"

    def detect(self, path: Path) -> bool:
        try:
            cfg = read_json(path / ADAPTER_CONFIG)
        except AdafuseError:
            return False
        return isinstance(cfg, dict) and (cfg.get("routing_strategy") in STRATEGIES + tuple(UNSUPPORTED)
                                          or cfg.get("peft_type") in PEFT_TYPES)

    def load(self, path: Path, base: Path | None = None) -> Checkpoint:
        cfg, weights = read_adapter_dir(path)
        where = path / ADAPTER_CONFIG
        strategy = cfg.get("routing_strategy") or PEFT_TYPES.get(cfg.get("peft_type"))
        if strategy in UNSUPPORTED:
            raise AdafuseError(f"{where}: routing_strategy '{strategy}' ({UNSUPPORTED[strategy]}) is not supported "
                               f"(expected one of {', '.join(STRATEGIES)})")
        if strategy not in STRATEGIES:
            raise AdafuseError(f"{where}: routing_strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        if cfg.get("use_dora"):
            raise AdafuseError(f"{where}: 'use_dora: true' is not supported (MoE-PEFT does not save DoRA magnitudes)")
        r, alpha = _number(cfg, "r", where, integer=True), float(_number(cfg, "lora_alpha", where))
        num_experts = _number(cfg, "num_experts", where, integer=True)
        rslora = _flag(cfg, "use_rslora", where, False)
        targets = cfg.get("target_modules")
        if isinstance(targets, dict):
            targets = [k for k, v in targets.items() if v]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise AdafuseError(f"{where}: 'target_modules' must be a non-empty list of module names, found {targets!r}")
        base_dir = resolve_base(path, cfg.get("base_model_name_or_path"), base)
        hf_cfg, model, base_src = load_hf_base(base_dir)
        modules = model.arch.module_names
        for t in targets:
            if t not in modules:
                raise AdafuseError(f"{where}: target module '{t}' is not supported (expected some of {', '.join(modules)})")
        mlp = [m for m in modules if model.arch.projection(m).group == "mlp"]
        # MixLoRA experts are copies of the base FFN: their activation must be the base model's own
        act = cfg.get("act_fn")
        if strategy == "mixlora" and act is not None and ACTIVATIONS.get(act) != model.hidden_act:
            base_act = next(name for name, kind in ACTIVATIONS.items() if kind == model.hidden_act)
            raise AdafuseError(f"{where}: act_fn '{act}' is not supported (expected the base model's '{base_act}')")

        # Which targets are routed, and the experts' rank/scale.
        exp_r, exp_alpha, exp_rslora = r, alpha, rslora
        if strategy == "mixlora":
            routed = [m for m in mlp if m in targets]
            expert_lora = cfg.get("expert_lora")
            if isinstance(expert_lora, dict):
                exp_r = _number(expert_lora, "r", where, integer=True)
                exp_alpha = float(_number(expert_lora, "lora_alpha", where))
                exp_rslora = _flag(expert_lora, "use_rslora", where, rslora)
            top_k = _number(cfg, "top_k", where, 2, integer=True)
        elif strategy == "loramoe":
            routed, top_k = [m for m in mlp if m in targets], num_experts
        else:
            routed, top_k = [m for m in modules if m in targets], _number(cfg, "top_k", where, 2, integer=True)
        static = [m for m in modules if m not in mlp and m in targets and m not in routed]

        P = strategy
        entries: dict[str, tuple[TensorInfo, object]] = {}
        used: set[str] = set()
        ranks, alphas = {}, {}

        def take(name: str) -> str:
            if name not in weights:
                raise AdafuseError(f"{weights.info(weights.names()[0]).origin if weights.names() else path}: "
                                   f"missing tensor '{name}'")
            used.add(name)
            return name

        def record(site: str, site_r: int, scale: float, config_r: int):
            # MoE-PEFT scales by the config's r: a tensor of another rank is a broken save, not a pattern.
            if site_r != config_r:
                raise AdafuseError(f"{entries[f'{site}.lora_A'][0].origin}: the LoRA tensors of {site} have rank {site_r}, "
                                   f"but {where.name} says r {config_r}")
            # Canonical scale is alpha / (sqrt(r) if use_rslora else r) with the experts' settings;
            # other sites keep their exact scale through per-site rank/alpha patterns.
            if site_r != exp_r:
                ranks[site] = site_r
            site_alpha = scale * (math.sqrt(site_r) if exp_rslora else site_r)
            if not math.isclose(site_alpha, exp_alpha, rel_tol=1e-12):
                alphas[site] = site_alpha

        for layer in range(model.num_layers):
            for m in static:
                pre, site = f"{P}.layers.{layer}.self_attn.{m}", f"layers.{layer}.{m}"
                for w in "AB":
                    entries[f"{site}.lora_{w}"] = stacked(weights, take(f"{pre}.lora_{w}.weight"), f"{site}.lora_{w}")
                site_r = entries[f"{site}.lora_A"][0].shape[1]
                record(site, site_r, alpha / (math.sqrt(site_r) if rslora else site_r), r)
            for m in routed:
                pre, site = f"{P}.{model.arch.module_path(layer, m)}", f"layers.{layer}.{m}"
                for w in "AB":
                    names = [take(f"{pre}.experts.{e}.lora_{w}.weight") for e in range(num_experts)]
                    entries[f"{site}.lora_{w}"] = _stack(weights, names, f"{site}.lora_{w}")
                site_r = entries[f"{site}.lora_A"][0].shape[1]
                record(site, site_r, exp_alpha / (math.sqrt(site_r) if exp_rslora else site_r), exp_r)
                if strategy != "mixlora":
                    name = take(f"{pre}.moe_gate.weight")
                    info = weights.info(name)
                    entries[f"{site}.router.weight"] = (TensorInfo(f"{site}.router.weight", info.shape, info.dtype, info.origin),
                                                        (lambda n=name: weights.get(n)))
            if strategy == "mixlora" and routed:
                name = take(f"{P}.layers.{layer}.mlp.moe_gate.weight")
                info = weights.info(name)
                entries[f"layers.{layer}.mlp.router.weight"] = (
                    TensorInfo(f"layers.{layer}.mlp.router.weight", info.shape, info.dtype, info.origin),
                    (lambda n=name: weights.get(n)))
        extra = sorted(set(weights.names()) - used)
        if extra:
            raise AdafuseError(f"{weights.info(extra[0]).origin}: unexpected tensor '{extra[0]}' "
                               f"({len(extra)} unexpected in all) for a {strategy} adapter with targets {targets}")
        adapter = AdapterSpec(
            num_experts=num_experts, top_k=top_k, r=exp_r, lora_alpha=exp_alpha, use_rslora=exp_rslora,
            target_modules=tuple(routed), static_modules=tuple(static), routing="layerwise",
            router_kind="dense" if strategy == "loramoe" else "topk",
            normalize_topk=strategy != "loramoe", expert_kind="ffn" if strategy == "mixlora" else "linear",
            rank_pattern=ranks, alpha_pattern=alphas)
        adapter.check(str(where))
        ckpt = Checkpoint(path=path, format=self.name, hf_config=hf_cfg, model=model, adapter=adapter,
                          base=base_src, adapters=LazySource(entries), inputs=(path, base_dir))
        ckpt.notes.append(f"MoE-PEFT routing_strategy '{strategy}'")
        return ckpt
