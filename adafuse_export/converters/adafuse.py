"""`adafuse`: the canonical format itself (see docs/checkpoint-format.md)."""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import ADAPTER_CONFIG, ADAPTERS, BASE_STEM, CONFIG, Checkpoint
from ..spec import AdapterSpec, ModelSpec
from ..tensors import SafetensorsSource, load_sharded_dir, read_json
from . import Converter, register


def load_hf_base(directory: Path) -> tuple[dict, ModelSpec, SafetensorsSource]:
    """A Hugging Face model directory: config.json + model.safetensors (or shards)."""
    cfg = read_json(directory / CONFIG)
    spec = ModelSpec.from_hf_config(cfg, directory / CONFIG)
    return cfg, spec, load_sharded_dir(directory, BASE_STEM)


@register
class AdafuseConverter(Converter):
    name = "adafuse"
    description = "canonical AdaFuse checkpoint (pre-gated or layer-routed experts): adafuse_config.json + adafuse_adapters.safetensors"

    def detect(self, path: Path) -> bool:
        return (path / ADAPTER_CONFIG).exists()

    def load(self, path: Path, base: Path | None = None) -> Checkpoint:
        cfg, model, base_src = load_hf_base(base or path)
        adapter = AdapterSpec.from_json(read_json(path / ADAPTER_CONFIG), path / ADAPTER_CONFIG, model.num_layers)
        return Checkpoint(path=path, format=self.name, hf_config=cfg, model=model, adapter=adapter,
                          base=base_src, adapters=SafetensorsSource([path / ADAPTERS]))
