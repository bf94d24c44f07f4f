"""The canonical checkpoint: backbone + adapters, lazily indexed and strictly validated.

Every converter produces a Checkpoint; everything downstream (reference model, ONNX,
engines) reads only this. Canonical adapter tensor names:
  layers.{l}.{module}.lora_A   [E_l, r, in]     (E_l = 1 for static modules)
  layers.{l}.{module}.lora_B   [E_l, out, r]
  pregate.weight [E, hidden] (+ pregate.bias [E])            routing 'pregate'
  layers.{l}.{module}.router.weight [E_l, in]                 routing 'layerwise', expert_kind 'linear'
  layers.{l}.mlp.router.weight [E_l, hidden]                  routing 'layerwise', expert_kind 'ffn'
  xlora.classifier.{j}.weight / .bias                         routing 'xlora' (the classifier's Linear layers)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdafuseError
from .spec import AdapterSpec, ModelSpec
from .tensors import FLOAT_DTYPES, TensorSource, save_json, save_safetensors

CONFIG = "config.json"
ADAPTER_CONFIG = "adafuse_config.json"
ADAPTERS = "adafuse_adapters.safetensors"
BASE_STEM = "model"


@dataclass(frozen=True)
class Site:
    layer: int
    module: str
    static: bool  # one always-on LoRA, no router

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.module}"


@dataclass
class Checkpoint:
    path: Path
    format: str
    hf_config: dict
    model: ModelSpec
    adapter: AdapterSpec
    base: TensorSource  # Hugging Face names
    adapters: TensorSource  # canonical names
    notes: list[str] = field(default_factory=list)
    inputs: tuple[Path, ...] = ()  # every directory it was read from (checkpoint, base): no output may touch them

    def __post_init__(self):
        self.adapter.check_modules(self.model, f"{self.path} ({self.format} adapter)")

    def base_only(self) -> "Checkpoint":
        """The base model without the adapters (run --no-adapters, the benchmarks' dense rows): routing 'none'."""
        import dataclasses

        from .tensors import in_memory_source

        adapter = AdapterSpec(num_experts=1, top_k=1, r=self.adapter.r, lora_alpha=self.adapter.lora_alpha,
                              target_modules=(), routing="none")
        return dataclasses.replace(self, adapter=adapter, adapters=in_memory_source({}, f"{self.path} (base only)"))

    def sites(self) -> list[Site]:
        out = []
        for layer in range(self.model.num_layers):
            for m in self.adapter.static_modules:
                out.append(Site(layer, m, True))
            for m in self.adapter.target_modules:
                out.append(Site(layer, m, False))
        return sorted(out, key=lambda s: (s.layer, s.module))

    def site_experts(self, site: Site) -> int:
        return 1 if site.static else self.adapter.experts_in_layer(site.layer)

    def expected_adapter_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, what the dims mean) for every adapter tensor the spec requires."""
        a, m = self.adapter, self.model
        shapes = {}
        for site in self.sites():
            out, inp = m.linear_shape(site.module)
            e, r = self.site_experts(site), a.site_rank(site.name)
            shapes[f"{site.name}.lora_A"] = ((e, r, inp), f"[experts, r, in_features of {site.module}]")
            shapes[f"{site.name}.lora_B"] = ((e, out, r), f"[experts, out_features of {site.module}, r]")
            if a.routing == "layerwise" and a.expert_kind == "linear" and not site.static:
                shapes[f"{site.name}.router.weight"] = ((e, inp), f"[experts, in_features of {site.module}]")
        if a.routing == "layerwise" and a.expert_kind == "ffn":
            for layer in range(m.num_layers):
                shapes[f"layers.{layer}.mlp.router.weight"] = ((a.experts_in_layer(layer), m.hidden_size), "[experts, hidden_size]")
        if a.routing == "pregate":
            shapes["pregate.weight"] = ((a.num_experts, m.hidden_size), "[num_experts, hidden_size]")
        if a.xlora is not None:
            x, sites = a.xlora, len(self.sites())
            outs = [x.classifier_size] * (x.classifier_depth - 1) + [a.num_experts * (sites if x.layerwise_scalings else 1)]
            for j, (inp, out) in enumerate(zip([m.hidden_size] + outs[:-1], outs)):
                shapes[f"xlora.classifier.{j}.weight"] = ((out, inp), "[out, in] of an X-LoRA classifier layer")
                shapes[f"xlora.classifier.{j}.bias"] = ((out,), "[out] of an X-LoRA classifier layer")
        return shapes

    def require_exportable(self) -> None:
        """Graph export covers one forward pass per step; X-LoRA needs two (docs/formats/xlora.md)."""
        if self.adapter.routing == "xlora":
            raise AdafuseError(f"{self.path}: X-LoRA ({self.format}) cannot be exported: its scaling pass is a second full "
                               "forward of the model (with its own KV cache) before every step, which the ONNX graphs and "
                               "engines do not have; run it with the PyTorch reference (adafuse-export run)")

    def require_routing_table(self) -> None:
        """A routing table [vocab, k] is the pre-gate only where the route depends on the token id alone."""
        a = self.adapter
        if a.routing_table_exact:
            return
        if a.routing == "pregate":
            why = (f"its pre-gate reads '{a.pregate_input}' (after layer 0's attention, which depends on the whole "
                   "context), so the route is not a function of the token id and no table can replace it")
        elif a.routing == "layerwise":
            why = "it has no pre-gate: a router in every layer decides there (routing 'layerwise'), so there is no table"
        else:
            why = f"it has no pre-gate and no router (routing '{a.routing}'): every token takes the same adapter"
        raise AdafuseError(f"{self.path}: no routing table: {why}")

    def router_names(self) -> list[str]:
        names = [n for n in self.expected_adapter_shapes()
                 if n.endswith("router.weight") or n.startswith(("pregate.", "xlora.classifier."))]
        if "pregate.bias" in self.adapters:
            names.append("pregate.bias")
        return names

    def validate(self, check_values: bool = True) -> None:
        """Check every tensor's presence, shape and dtype; router values if asked (they are small)."""
        for name, shape in self.model.hf_weight_shapes().items():
            _check_tensor(self.base, name, shape, "base weight")
        expected = self.expected_adapter_shapes()
        for name, (shape, meaning) in expected.items():
            if name.endswith(".lora_B"):
                a_name = name[: -len("lora_B")] + "lora_A"
                if a_name in self.adapters and name in self.adapters:
                    ra, rb = self.adapters.info(a_name).shape, self.adapters.info(name).shape
                    if len(ra) == 3 and len(rb) == 3 and ra[1] != rb[2]:
                        raise AdafuseError(f"{self.adapters.info(name).origin}: tensor '{name}' has rank {rb[2]} but '{a_name}' has rank {ra[1]}: experts must share one rank per site")
            _check_tensor(self.adapters, name, shape, meaning)
        if "pregate.bias" in self.adapters:
            _check_tensor(self.adapters, "pregate.bias", (self.adapter.num_experts,), "[num_experts]")
        if check_values:  # routers are small: read them now, which refuses NaN/Inf (tensors.check_finite)
            for name in self.router_names():
                self.adapters.get(name)

    def parameter_counts(self) -> dict[str, int]:
        base = sum(self.base.info(n).numel for n in self.model.hf_weight_shapes())
        adapters = sum(self.adapters.info(n).numel for n in self.adapters.names())
        base_bytes = sum(self.base.info(n).nbytes for n in self.model.hf_weight_shapes())
        return {"base_parameters": base, "adapter_parameters": adapters,
                "base_bytes": base_bytes, "adapter_bytes": self.adapters.total_bytes()}

    def index_sha256(self) -> str:
        """Hash of the tensor index (names, shapes, dtypes, configs): identifies the source cheaply."""
        h = hashlib.sha256()
        h.update(json.dumps(self.hf_config, sort_keys=True).encode())
        h.update(json.dumps(self.adapter.to_json(), sort_keys=True).encode())
        for src in (self.base, self.adapters):
            for n in sorted(src.names()):
                i = src.info(n)
                h.update(f"{n}|{i.dtype}|{list(i.shape)}\n".encode())
        return h.hexdigest()


def _check_tensor(source: TensorSource, name: str, shape: tuple[int, ...], meaning: str) -> None:
    if name not in source:
        origin = _origin_hint(source)
        raise AdafuseError(f"{origin}missing tensor '{name}', expected shape {list(shape)} {meaning}")
    info = source.info(name)
    if info.shape != tuple(shape):
        raise AdafuseError(f"{info.origin}: tensor '{name}' has shape {list(info.shape)}, expected {list(shape)} {meaning}")
    if info.dtype not in FLOAT_DTYPES:
        raise AdafuseError(f"{info.origin}: tensor '{name}' has dtype {info.dtype}, expected one of {', '.join(FLOAT_DTYPES)}")


def _origin_hint(source: TensorSource) -> str:
    names = source.names()
    return f"{source.info(names[0]).origin}: " if names else ""


def write_canonical(ckpt: Checkpoint, out_dir: Path, base_dtype=None) -> None:
    """Write a checkpoint in the canonical directory layout (each file atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = {n: ckpt.base.get(n) for n in ckpt.model.hf_weight_shapes()}
    if base_dtype is not None:
        base = {n: t.to(base_dtype) for n, t in base.items()}
    save_safetensors(base, out_dir / f"{BASE_STEM}.safetensors", {"format": "pt"})
    save_safetensors({n: ckpt.adapters.get(n) for n in ckpt.adapters.names()}, out_dir / ADAPTERS, {"format": "pt"})
    save_json(ckpt.hf_config, out_dir / CONFIG)
    save_json(ckpt.adapter.to_json(), out_dir / ADAPTER_CONFIG)
