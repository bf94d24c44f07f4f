"""`xlora`: an X-LoRA model saved by PEFT (`XLoraConfig`, peft_type XLORA); layout and math: docs/formats/xlora.md.

  adapter_config.json        XLoraConfig; `adapters` maps "0".."n-1" to the LoRA adapters' directories
  adapter_model.safetensors  the classifier: base_model.internal_xlora_classifier.layers.{i}.{weight,bias}
  {name}/                    PEFT also writes one folder per adapter, but its 0.21 save mangles them (below)

The experts are read from the `adapters` directories (PEFT's own from_pretrained needs them passed for a
local checkpoint too). PEFT 0.21 drops every classifier key containing ".{name}." of an adapter name from
the root file and writes it, with ".{name}" cut out, into folder {name}: a classifier Linear at index i < n
is read from there (`...layers.weight`).
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpoint
from ..errors import AdafuseError
from ..inputs import check_directory, confine, read_json
from ..spec import AdapterSpec, XLoraSpec
from ..tensors import LazySource, SafetensorsSource, TensorInfo
from . import Converter, register, resolve_base
from .adafuse import load_hf_base
from .peft_lora import ADAPTER_CONFIG, PeftLoraConverter, read_adapter_dir

CLASSIFIER = "base_model.internal_xlora_classifier.layers"
# PEFT numbers X-LoRA's sites in model.modules() order, i.e. the order transformers registers the projections:
# the family's projection order except Phi-3, whose attention registers o_proj before qkv_proj.
MODULE_ORDER = {"llama": None, "mistral": None, "qwen2": None, "qwen3": None,
                "phi3": ("o_proj", "qkv_proj", "gate_up_proj", "down_proj")}


def _config_value(cfg: dict, key: str, kinds: tuple, where: Path, default=None, optional=False):
    value = cfg.get(key, default)
    if value is None and optional:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise AdafuseError(f"{where}: '{key}' must be {' or '.join(k.__name__ for k in kinds)}, found {value!r}")
    return value


def _xlora_spec(cfg: dict, where: Path, module_order: tuple[str, ...]) -> tuple[XLoraSpec, float]:
    """The mixing settings, and the classifier's dropout (it decides where its Linear layers sit)."""
    depth = _config_value(cfg, "xlora_depth", (int,), where, 1)
    dropout = float(_config_value(cfg, "xlora_dropout_p", (int, float), where, 0.2))
    if not 0 <= dropout <= 1:  # NaN included: torch's Dropout refuses it, so PEFT cannot build the classifier
        raise AdafuseError(f"{where}: 'xlora_dropout_p' must be a probability in [0, 1], found {dropout!r}")
    spec = XLoraSpec(
        classifier_depth=depth,
        classifier_size=_config_value(cfg, "xlora_size", (int,), where, 2048),
        layerwise_scalings=_config_value(cfg, "layerwise_scalings", (bool,), where, False),
        enable_softmax=_config_value(cfg, "enable_softmax", (bool,), where, True),
        softmax_temperature=float(_config_value(cfg, "softmax_temperature", (int, float), where, 1.0)),
        enable_softmax_topk=_config_value(cfg, "enable_softmax_topk", (bool,), where, False),
        top_k_lora=_config_value(cfg, "top_k_lora", (int,), where, optional=True),
        scaling_pass_value=float(_config_value(cfg, "scaling_pass_value", (int, float), where, 0.0)),
        global_scaling_weight=float(_config_value(cfg, "global_scaling_weight", (int, float), where, 1.0)),
        module_order=module_order)
    spec.check(str(where))
    return spec, dropout


def _classifier_indices(depth: int, dropout: float) -> list[int]:
    """Positions of the Linear layers in PEFT's nn.Sequential: Linear, ReLU, [Dropout], ..., Linear."""
    stride = 3 if dropout > 0 else 2
    return [0] if depth == 1 else [k * stride for k in range(depth)]


@register
class XLoraConverter(Converter):
    name = "xlora"
    description = "X-LoRA saved by PEFT (peft_type XLORA): LoRA adapters mixed by a classifier over a scaling pass"

    def detect(self, path: Path) -> bool:
        try:
            cfg = read_json(path / ADAPTER_CONFIG)
        except AdafuseError:
            return False
        return isinstance(cfg, dict) and cfg.get("peft_type") == "XLORA"

    def load(self, path: Path, base: Path | None = None) -> Checkpoint:
        import torch

        cfg, root = read_adapter_dir(path)
        where = path / ADAPTER_CONFIG
        adapters = cfg.get("adapters")
        if not isinstance(adapters, dict) or not adapters:
            raise AdafuseError(f"{where}: 'adapters' must map adapter names to LoRA directories, found {adapters!r}")
        names = list(adapters)
        if names != [str(i) for i in range(len(names))]:
            raise AdafuseError(f"{where}: adapter names must be \"0\"..\"{len(names) - 1}\" in order (PEFT 0.21 loads the "
                               f"experts under those names and fails to run others), found {names}")
        base_dir = resolve_base(path, cfg.get("base_model_name_or_path"), base)
        hf_cfg, model, base_src = load_hf_base(base_dir)
        if model.family not in MODULE_ORDER:
            raise AdafuseError(f"{where}: X-LoRA on model_type '{model.family}' is not supported: PEFT numbers its sites "
                               f"in transformers' module order, known here for {', '.join(MODULE_ORDER)}")
        hidden = _config_value(cfg, "hidden_size", (int,), where)
        if hidden != model.hidden_size:
            raise AdafuseError(f"{where}: hidden_size {hidden} does not match the base model's {model.hidden_size}")

        loras = []
        for name, declared in adapters.items():
            lora_dir = Path(declared) if isinstance(declared, str) and declared else None
            if lora_dir is not None and not lora_dir.is_absolute():
                lora_dir = path / lora_dir
            if lora_dir is None or not lora_dir.is_dir():
                raise AdafuseError(f"{where}: adapter '{name}' names {declared!r}, not a local LoRA directory (the "
                                   "X-LoRA experts are read from there, as PEFT's from_pretrained does)")
            check_directory(lora_dir, f"LoRA directory of X-LoRA adapter '{name}'")
            loras.append(PeftLoraConverter().load(lora_dir, base_dir))
        order = MODULE_ORDER[model.family] or model.arch.module_names
        routed = tuple(m for m in order if any(m in c.adapter.static_modules for c in loras))
        spec, dropout = _xlora_spec(cfg, where, routed)
        rank = max(c.adapter.site_rank(s.name) for c in loras for s in c.sites())

        entries: dict[str, tuple[TensorInfo, object]] = {}
        for layer in range(model.num_layers):
            for module in routed:
                site = f"layers.{layer}.{module}"
                out, inp = model.linear_shape(module)

                def stack(which: str, site=site, out=out, inp=inp):
                    """Experts [E, R, in] / [E, out, R]: rank padded with zeros, B times the expert's own scale."""
                    shape = (rank, inp) if which == "A" else (out, rank)
                    result = torch.zeros((len(loras),) + shape, dtype=torch.float32)
                    for e, c in enumerate(loras):
                        if f"{site}.lora_A" in c.adapters:
                            t = c.adapters.get(f"{site}.lora_{which}")[0].to(torch.float32)
                            if which == "A":
                                result[e, :t.shape[0]] = t
                            else:
                                result[e, :, :t.shape[1]] = t * c.adapter.site_scale(site)
                    return result

                origin = str(path)
                entries[f"{site}.lora_A"] = (TensorInfo(f"{site}.lora_A", (len(loras), rank, inp), "F32", origin),
                                             lambda s=stack: s("A"))
                entries[f"{site}.lora_B"] = (TensorInfo(f"{site}.lora_B", (len(loras), out, rank), "F32", origin),
                                             lambda s=stack: s("B"))
        for j, index in enumerate(_classifier_indices(spec.classifier_depth, dropout)):
            for part in ("weight", "bias"):
                source, key = root, f"{CLASSIFIER}.{index}.{part}"
                if key not in root and str(index) in adapters:  # PEFT 0.21's save moved it (module doc)
                    folder = confine(path, f"{index}/adapter_model.safetensors", where)
                    if folder.is_file():
                        source, key = SafetensorsSource([folder]), f"{CLASSIFIER}.{part}"
                if key not in source:
                    raise AdafuseError(f"{path / 'adapter_model.safetensors'}: missing X-LoRA classifier tensor "
                                       f"'{CLASSIFIER}.{index}.{part}' (xlora_depth {spec.classifier_depth}, "
                                       f"xlora_dropout_p {dropout})")
                info = source.info(key)
                canonical = f"xlora.classifier.{j}.{part}"
                entries[canonical] = (TensorInfo(canonical, info.shape, info.dtype, info.origin),
                                      (lambda s=source, k=key: s.get(k)))
        adapter = AdapterSpec(num_experts=len(loras), top_k=min(spec.top_k_lora or len(loras), len(loras)), r=rank,
                              lora_alpha=float(rank), target_modules=routed, routing="xlora", normalize_topk=False,
                              xlora=spec)
        adapter.check(str(where))
        ckpt = Checkpoint(path=path, format=self.name, hf_config=hf_cfg, model=model, adapter=adapter, base=base_src,
                          adapters=LazySource(entries), inputs=(path, base_dir) + tuple(c.path for c in loras))
        ckpt.notes.append("X-LoRA: expert scales folded into lora_B, ranks padded with zeros to the largest")
        return ckpt
