"""`adafuse`: the canonical format itself (see docs/checkpoint-format.md)."""
from __future__ import annotations

import re
from pathlib import Path

from ..checkpoint import ADAPTER_CONFIG, ADAPTERS, BASE_STEM, CONFIG, Checkpoint
from ..spec import AdapterSpec, ModelSpec
from ..errors import AdafuseError
from ..inputs import check_held, confine, read_json
from ..tensors import SafetensorsSource, load_sharded_dir
from . import Converter, register

LAYER_NORM = re.compile(r"model\.layers\.(0|[1-9][0-9]*)\.input_layernorm\.weight")


def load_hf_base(directory: Path) -> tuple[dict, ModelSpec, SafetensorsSource]:
    """A Hugging Face model directory: config.json + model.safetensors (or shards)."""
    cfg = read_json(confine(directory, CONFIG, directory))
    weights = load_sharded_dir(directory, BASE_STEM)
    # Config numbers are checked against what the files hold before anything is sized by them (families
    # build per-layer tuples while parsing).
    layers = cfg.get("num_hidden_layers") if isinstance(cfg, dict) else None
    if isinstance(layers, int) and not isinstance(layers, bool):
        held = sum(1 for n in weights.names() if LAYER_NORM.fullmatch(n))
        check_held(directory / CONFIG, "num_hidden_layers", layers, held, f"layers the weights in {directory} hold")
    spec = ModelSpec.from_hf_config(cfg, directory / CONFIG)
    last = f"model.layers.{spec.num_layers - 1}.input_layernorm.weight"
    if last not in weights:
        raise AdafuseError(f"{directory / CONFIG}: num_hidden_layers is {spec.num_layers}, but the weights in {directory} "
                           f"hold no '{last}'")
    return cfg, spec, weights


@register
class AdafuseConverter(Converter):
    name = "adafuse"
    description = "canonical AdaFuse checkpoint (pre-gated or layer-routed experts): adafuse_config.json + adafuse_adapters.safetensors"

    def detect(self, path: Path) -> bool:
        return (path / ADAPTER_CONFIG).exists()

    def load(self, path: Path, base: Path | None = None) -> Checkpoint:
        cfg, model, base_src = load_hf_base(base or path)
        adapter = AdapterSpec.from_json(read_json(confine(path, ADAPTER_CONFIG, path)), path / ADAPTER_CONFIG, model.num_layers)
        return Checkpoint(path=path, format=self.name, hf_config=cfg, model=model, adapter=adapter,
                          base=base_src, adapters=SafetensorsSource([confine(path, ADAPTERS, path)]),
                          inputs=(path,) + ((base,) if base else ()))
