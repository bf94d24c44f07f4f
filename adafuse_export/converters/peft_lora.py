"""`peft-lora`: a plain PEFT LoRA adapter on a Hugging Face base model: one always-on expert.

Layout: adapter_config.json (peft_type LORA) + adapter_model.safetensors (or .bin), keys
`base_model.model.model.layers.{L}.{self_attn|mlp}.{module}.lora_{A|B}.weight`.
Honours use_rslora, rank_pattern, alpha_pattern and target_modules (list or regex).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import regex

from ..checkpoint import Checkpoint
from ..errors import AdafuseError
from ..spec import AdapterSpec
from ..inputs import check_readable_file, confine, read_json
from ..tensors import LazySource, SafetensorsSource, TensorInfo, TensorSource, in_memory_source
from . import Converter, register, resolve_base
from .adafuse import load_hf_base

ADAPTER_CONFIG = "adapter_config.json"
# matched with fullmatch: a `$` also matches before a trailing newline ("...lora_B.weight\n")
LORA_KEY = re.compile(r"base_model\.model\.model\.layers\.(0|[1-9]\d*)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight", re.ASCII)
# PEFT LoraConfig options that change what the adapter computes and are not implemented here: refused when set
UNSUPPORTED_OPTIONS = ("layer_replication", "lora_bias", "trainable_token_indices", "target_parameters",
                       "alora_invocation_tokens", "use_qalora")


def read_adapter_dir(path: Path) -> tuple[dict, TensorSource]:
    """adapter_config.json and the adapter weights (safetensors preferred, else pickled .bin)."""
    cfg = read_json(confine(path, ADAPTER_CONFIG, path))
    if not isinstance(cfg, dict):
        raise AdafuseError(f"{path / ADAPTER_CONFIG}: expected a JSON object, found {type(cfg).__name__}")
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.exists() or st.is_symlink():
        return cfg, SafetensorsSource([confine(path, st.name, path)])
    if binf.exists() or binf.is_symlink():
        return cfg, in_memory_source(_load_pickled(confine(path, binf.name, path)), str(binf))
    raise AdafuseError(f"{path}: no adapter_model.safetensors or adapter_model.bin found")


def _load_pickled(binf: Path) -> object:
    """torch.load with weights_only (no code runs); torch's own advice to turn that off is never passed on."""
    import torch

    check_readable_file(binf, "PyTorch weights file")
    try:
        return torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        detail = f": {first}" if first and "weights_only" not in str(e) else ""
        raise AdafuseError(f"{binf}: cannot read PyTorch weights as plain tensors ({type(e).__name__}{detail}); "
                           "only dicts of tensors are read, nothing that would run code") from None


REGEX_TIMEOUT_S = 0.5  # a PEFT pattern is matched against a ~40-character module name: microseconds when sane


def peft_pattern_value(pattern: dict, module_name: str, default, where: object = "rank_pattern"):
    """PEFT's rule: the first key k such that the module name matches `(.*\\.)?k$` (PEFT uses `re`; the `regex`
    package matches the same syntax and stops a pathological, backtracking key after REGEX_TIMEOUT_S)."""
    for key, value in pattern.items():
        try:
            found = regex.match(rf"(.*\.)?({key})$", module_name, timeout=REGEX_TIMEOUT_S)
        except regex.error as e:
            raise AdafuseError(f"{where}: key {key!r} is not a valid regular expression ({e})") from None
        except TimeoutError:
            raise AdafuseError(f"{where}: key {key!r} took more than {REGEX_TIMEOUT_S} s to match '{module_name}' "
                               "(a catastrophically backtracking regular expression)") from None
        if found:
            return value
    return default


def stacked(source: TensorSource, name: str, canonical: str) -> tuple[TensorInfo, object]:
    """A [r, in] / [out, r] PEFT matrix as a one-expert [1, ...] canonical tensor."""
    info = source.info(name)
    return TensorInfo(canonical, (1,) + info.shape, info.dtype, info.origin), (lambda: source.get(name)[None])


@register
class PeftLoraConverter(Converter):
    name = "peft-lora"
    description = "PEFT LoRA adapter (adapter_config.json peft_type LORA) on a base model directory: one always-on expert"

    def detect(self, path: Path) -> bool:
        try:
            cfg = read_json(path / ADAPTER_CONFIG)
        except AdafuseError:
            return False
        # LoRAMoE / HydraLoRA forks also say LORA but add expert counts.
        return isinstance(cfg, dict) and cfg.get("peft_type") == "LORA" and "lora_nums" not in cfg \
            and "routing_strategy" not in cfg

    def load(self, path: Path, base: Path | None = None) -> Checkpoint:
        cfg, weights = read_adapter_dir(path)
        where = path / ADAPTER_CONFIG
        for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
            if cfg.get(key, ok) not in (ok, None):
                raise AdafuseError(f"{where}: '{key}: {cfg[key]}' is not supported (expected {ok})")
        if cfg.get("bias", "none") != "none":
            raise AdafuseError(f"{where}: 'bias: {cfg['bias']}' is not supported (expected 'none')")
        if cfg.get("modules_to_save"):
            raise AdafuseError(f"{where}: modules_to_save {cfg['modules_to_save']} is not supported (expected none)")
        for key in UNSUPPORTED_OPTIONS:
            if cfg.get(key):
                raise AdafuseError(f"{where}: '{key}: {json.dumps(cfg[key])[:80]}' is not supported (expected it unset)")
        if cfg.get("layers_to_transform") is not None:
            raise AdafuseError(f"{where}: layers_to_transform is not supported (expected every layer adapted)")
        r, alpha = cfg.get("r"), cfg.get("lora_alpha")
        for key, value in (("r", r), ("lora_alpha", alpha)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise AdafuseError(f"{where}: '{key}' must be a positive number, found {value!r}")
        base_dir = resolve_base(path, cfg.get("base_model_name_or_path"), base)
        hf_cfg, model, base_src = load_hf_base(base_dir)

        found: dict[tuple[int, str], dict[str, str]] = {}
        for name in weights.names():
            m = LORA_KEY.fullmatch(name)
            if not m:
                raise AdafuseError(f"{weights.info(name).origin}: tensor '{name}' is not a LoRA weight of a decoder projection "
                                   "(expected base_model.model.model.layers.L.<self_attn|mlp>.<proj>.lora_<A|B>.weight)")
            layer, _, module, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            if module not in model.arch.module_names:
                raise AdafuseError(f"{weights.info(name).origin}: tensor '{name}' adapts module '{module}', which a "
                                   f"{model.family} model does not have (expected one of {', '.join(model.arch.module_names)})")
            if layer >= model.num_layers:
                raise AdafuseError(f"{weights.info(name).origin}: tensor '{name}' is for layer {layer}, but the base "
                                   f"model has {model.num_layers} layers")
            found.setdefault((layer, module), {})[which] = name
        modules = sorted({mod for _, mod in found}, key=model.arch.module_names.index)
        if not modules:
            raise AdafuseError(f"{weights.info(weights.names()[0]).origin if weights.names() else path}: no LoRA tensors found")
        entries, ranks, alphas = {}, {}, {}
        use_rslora = cfg.get("use_rslora", False)
        if not isinstance(use_rslora, bool):
            raise AdafuseError(f"{where}: 'use_rslora' must be true or false, found {use_rslora!r}")
        if not isinstance(r, int) or isinstance(r, bool):
            raise AdafuseError(f"{where}: 'r' must be an integer, found {r!r}")
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        for key, pattern, kinds in (("rank_pattern", rank_pattern, (int,)), ("alpha_pattern", alpha_pattern, (int, float))):
            if not isinstance(pattern, dict):
                raise AdafuseError(f"{where}: '{key}' must be an object of module pattern -> number, found {pattern!r}")
            for k, v in pattern.items():
                if not isinstance(v, kinds) or isinstance(v, bool) or not 0 < v < 1 << 31:
                    raise AdafuseError(f"{where}: {key}[{k!r}] must be a positive {'integer' if key == 'rank_pattern' else 'number'}"
                                       f", found {v!r}")
        for layer in range(model.num_layers):
            for module in modules:
                pair = found.get((layer, module), {})
                site = f"layers.{layer}.{module}"
                peft_name = model.arch.weight_prefix(layer, module)
                for which in "AB":
                    if which not in pair:
                        raise AdafuseError(f"{path}: missing tensor 'base_model.model.{peft_name}.lora_{which}.weight' "
                                           f"(every layer must adapt {module})")
                    entries[f"{site}.lora_{which}"] = stacked(weights, pair[which], f"{site}.lora_{which}")
                site_r = int(peft_pattern_value(rank_pattern, peft_name, r, f"{where}: rank_pattern"))
                site_alpha = float(peft_pattern_value(alpha_pattern, peft_name, alpha, f"{where}: alpha_pattern"))
                if site_r != r:
                    ranks[site] = site_r
                if site_alpha != float(alpha):
                    alphas[site] = site_alpha
        adapter = AdapterSpec(num_experts=1, top_k=1, r=int(r), lora_alpha=float(alpha), target_modules=(),
                              routing="none", use_rslora=use_rslora, static_modules=tuple(modules),
                              rank_pattern=ranks, alpha_pattern=alphas)
        adapter.check(str(where))
        return Checkpoint(path=path, format=self.name, hf_config=hf_cfg, model=model, adapter=adapter,
                          base=base_src, adapters=LazySource(entries), inputs=(path, base_dir))
