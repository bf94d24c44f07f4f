"""`hydralora` and `loramoe-original`: adapters saved by the authors' own peft forks.

Both forks keep `peft_type: "LORA"` and add `lora_nums` (the expert count) to adapter_config.json;
`adapter_model.bin` holds, per adapted linear `base_model.model.model.layers.{L}.{self_attn|mlp}.{m}`:

  lora_route.weight  [E, in]   a dense softmax router over all E experts (no top-k)
  HydraLoRA:  lora_A.weight [r, in] shared by every expert, lora_B{i}.weight [out, r]
  LoRAMoE:    lora_A{i}.weight [r, in] and lora_B{i}.weight [out, r] per expert

y = W x + sum_i softmax(R x)_i * (alpha / r) * B_i A_i x. A shared A becomes every expert's A.
Layouts, sources and math: docs/formats/hydralora.md, docs/formats/loramoe-original.md.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..checkpoint import Checkpoint
from ..errors import AdafuseError
from ..inputs import check_held, read_json
from ..spec import AdapterSpec
from ..tensors import LazySource, TensorInfo, TensorSource
from . import Converter, register, resolve_base
from .adafuse import load_hf_base
from .peft_lora import ADAPTER_CONFIG, read_adapter_dir

KEY = re.compile(r"base_model\.model\.model\.layers\.(0|[1-9]\d*)\.(self_attn|mlp)\.(\w+)\.(lora_route|lora_A|lora_B)(\d*)\.weight", re.ASCII)  # fullmatch
HYDRA, LORAMOE = "hydralora", "loramoe-original"


def _is_fork_config(path: Path) -> bool:
    try:
        cfg = read_json(path / ADAPTER_CONFIG)
    except AdafuseError:
        return False
    return isinstance(cfg, dict) and cfg.get("peft_type") == "LORA" and "lora_nums" in cfg


def _layout(names: list[str]) -> str | None:
    """HYDRA (one shared lora_A per linear), LORAMOE (lora_A{i} per expert), or None when mixed or neither."""
    shared = any(n.endswith(".lora_A.weight") for n in names)
    indexed = any(re.search(r"\.lora_A\d+\.weight\Z", n) for n in names)
    return HYDRA if shared and not indexed else LORAMOE if indexed and not shared else None


def _positive_int(cfg: dict, key: str, where: Path) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 31:
        raise AdafuseError(f"{where}: '{key}' must be a positive integer, found {value!r}")
    return value


def _check_config(cfg: dict, where: Path) -> tuple[int, float, int]:
    """(r, lora_alpha, lora_nums), refusing the fork options that change the math."""
    r, experts = _positive_int(cfg, "r", where), _positive_int(cfg, "lora_nums", where)
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < 1 << 31:
        raise AdafuseError(f"{where}: 'lora_alpha' must be a positive number, found {alpha!r}")
    for key, ok in (("fan_in_fan_out", False), ("bias", "none"), ("enable_lora", None), ("modules_to_save", None)):
        if cfg.get(key) not in (ok, None) and not (key == "modules_to_save" and cfg[key] == []):
            raise AdafuseError(f"{where}: '{key}: {json.dumps(cfg[key])}' is not supported (expected {json.dumps(ok)})")
    return r, float(alpha), experts


class _LoraNumsConverter(Converter):
    layout = ""

    def detect(self, path: Path) -> bool:
        if not _is_fork_config(path):
            return False
        found = _layout(read_adapter_dir(path)[1].names())
        # HydraLoRA also claims a mixed or empty one, so that it gets load()'s precise error, not "unknown layout".
        return found == self.layout or (found is None and self.layout == HYDRA)

    def load(self, path: Path, base: Path | None = None) -> Checkpoint:
        cfg, weights = read_adapter_dir(path)
        where = path / ADAPTER_CONFIG
        if cfg.get("peft_type") != "LORA" or "lora_nums" not in cfg:
            raise AdafuseError(f"{where}: expected peft_type 'LORA' with 'lora_nums' (the authors' peft fork), "
                               f"found peft_type {cfg.get('peft_type')!r}{'' if 'lora_nums' in cfg else ' and no lora_nums'}")
        r, alpha, experts = _check_config(cfg, where)
        names = weights.names()
        origin = weights.info(names[0]).origin if names else str(path)
        # every expert has its own lora_B{i} per linear: names per expert are built below, so bound lora_nums first
        check_held(where, "lora_nums", experts, len(names), f"tensors {origin} holds")
        found = _layout(names)
        if found != self.layout:
            what = {None: "no LoRA tensors of either layout" if not any(".lora_A" in n for n in names)
                    else "both a shared 'lora_A' (HydraLoRA) and per-expert 'lora_A{i}' (LoRAMoE) tensors",
                    HYDRA: "the HydraLoRA layout (one shared lora_A per linear)",
                    LORAMOE: "the LoRAMoE layout (lora_A{i} per expert)"}[found]
            raise AdafuseError(f"{origin}: a {self.name} adapter needs "
                               f"{'one shared lora_A' if self.layout == HYDRA else 'lora_A0..lora_A{E-1}'} per linear, found {what}")
        base_dir = resolve_base(path, cfg.get("base_model_name_or_path"), base)
        hf_cfg, model, base_src = load_hf_base(base_dir)
        arch = model.arch
        sites: dict[tuple[int, str], set[str]] = {}
        for name in names:
            m = KEY.fullmatch(name)
            if not m or (m.group(4) == "lora_route" and m.group(5)):
                raise AdafuseError(f"{origin}: tensor '{name}' is not a {self.name} weight (expected base_model.model.model."
                                   "layers.L.<self_attn|mlp>.<proj>.<lora_route|lora_A|lora_A{i}|lora_B{i}>.weight)")
            module = m.group(3)
            if module not in arch.module_names or arch.projection(module).group != m.group(2):
                raise AdafuseError(f"{origin}: tensor '{name}' adapts module '{m.group(2)}.{module}', which a {model.family} "
                                   f"model does not have (expected one of "
                                   f"{', '.join(f'{arch.projection(x).group}.{x}' for x in arch.module_names)})")
            sites.setdefault((int(m.group(1)), module), set()).add(name)
        modules = sorted({mod for _, mod in sites}, key=arch.module_names.index)
        entries: dict[str, tuple[TensorInfo, object]] = {}
        for layer in range(model.num_layers):
            for module in modules:
                prefix = f"base_model.model.{arch.weight_prefix(layer, module)}"
                a_names = [f"{prefix}.lora_A.weight"] * experts if self.layout == HYDRA \
                    else [f"{prefix}.lora_A{i}.weight" for i in range(experts)]
                b_names = [f"{prefix}.lora_B{i}.weight" for i in range(experts)]
                route = f"{prefix}.lora_route.weight"
                wanted = set(a_names) | set(b_names) | {route}
                have = sites.pop((layer, module), set())
                missing, extra = sorted(wanted - have), sorted(have - wanted)
                if missing:
                    raise AdafuseError(f"{origin}: missing tensor '{missing[0]}' (lora_nums is {experts}; every layer "
                                       f"adapts {', '.join(modules)})")
                if extra:
                    raise AdafuseError(f"{origin}: unexpected tensor '{extra[0]}' (lora_nums is {experts})")
                site = f"layers.{layer}.{module}"
                for canonical, group in ((f"{site}.lora_A", a_names), (f"{site}.lora_B", b_names)):
                    entries[canonical] = _stacked(weights, group, canonical, r, where)
                info = weights.info(route)
                entries[f"{site}.router.weight"] = (TensorInfo(f"{site}.router.weight", info.shape, info.dtype, info.origin),
                                                    (lambda n=route: weights.get(n)))
        if sites:
            (layer, module), have = sorted(sites.items())[0]
            raise AdafuseError(f"{origin}: tensor '{sorted(have)[0]}' is for layer {layer}, but the base model has "
                               f"{model.num_layers} layers")
        adapter = AdapterSpec(num_experts=experts, top_k=experts, r=r, lora_alpha=alpha, target_modules=tuple(modules),
                              routing="layerwise", router_kind="dense", normalize_topk=False, expert_kind="linear")
        adapter.check(str(where))
        ckpt = Checkpoint(path=path, format=self.name, hf_config=hf_cfg, model=model, adapter=adapter, base=base_src,
                          adapters=LazySource(entries), inputs=(path, base_dir))
        if self.layout == HYDRA:
            ckpt.notes.append("HydraLoRA: the shared lora_A is repeated for every expert")
        return ckpt


def _stacked(source: TensorSource, names: list[str], canonical: str, r: int, where: Path) -> tuple[TensorInfo, object]:
    """Per-expert [r, in] / [out, r] matrices stacked into one canonical [E, ...] tensor (a shared A repeated)."""
    import torch

    infos = [source.info(n) for n in names]
    for info in infos:
        rank = info.shape[0] if ".lora_A" in info.name else info.shape[-1]
        if len(info.shape) != 2 or rank != r or info.shape != infos[0].shape:
            raise AdafuseError(f"{info.origin}: tensor '{info.name}' has shape {list(info.shape)}, expected rank {r} "
                               f"(r in {where.name}) and the shape {list(infos[0].shape)} of '{infos[0].name}'")
    info = TensorInfo(canonical, (len(names),) + infos[0].shape, infos[0].dtype, infos[0].origin)
    if len(set(names)) == 1:
        return info, (lambda: source.get(names[0]).unsqueeze(0).expand(len(names), *infos[0].shape).contiguous())
    return info, (lambda: torch.stack([source.get(n) for n in names]))


@register
class HydraLoraConverter(_LoraNumsConverter):
    name = HYDRA
    layout = HYDRA
    description = "HydraLoRA (authors' peft fork: lora_nums, one shared lora_A, lora_B{i}, lora_route per linear)"


@register
class LoraMoeOriginalConverter(_LoraNumsConverter):
    name = LORAMOE
    layout = LORAMOE
    description = "LoRAMoE (authors' peft fork: lora_nums, lora_A{i}/lora_B{i}, lora_route per linear)"
