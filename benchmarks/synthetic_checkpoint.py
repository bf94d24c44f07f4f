"""Write a synthetic canonical checkpoint of a real model's shape (random weights), streaming.

  python3 benchmarks/synthetic_checkpoint.py OUT_DIR --shape llama2-7b --experts 8 --rank 16
  python3 benchmarks/synthetic_checkpoint.py OUT_DIR --shape llama2-7b --layers 2   # 7B width, 2 layers

Llama-2-7B shape in bf16 is about 13.5 GB of base weights in 4 GB shards plus the adapters;
only one tensor is held in memory at a time. Used by benchmarks/streaming_rss.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adafuse_export.checkpoint import Checkpoint  # noqa: E402
from adafuse_export.spec import AdapterSpec, ModelSpec  # noqa: E402
from adafuse_export.tensors import in_memory_source, write_safetensors_streaming  # noqa: E402

SHAPES = {
    "llama2-7b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False},
    # build-memory fit (benchmarks/build_rss.py): a Qwen3 with Qwen's 152k vocabulary on a narrow, shallow
    # body (the 162M model: embeddings and head are 96% of it), and a Llama of 8 narrow layers
    "qwen3-162m": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 512, "intermediate_size": 1536,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 2048,
                   "tie_word_embeddings": False},
    "llama-58m": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376,
                  "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
                  "rope_theta": 10000.0, "max_position_embeddings": 1024, "tie_word_embeddings": False},
    "tiny": {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "tie_word_embeddings": False},
}


def specs(shape: str, experts: int = 8, rank: int = 16, top_k: int = 2,
          layers: int | None = None) -> tuple[dict, ModelSpec, AdapterSpec]:
    """(config.json, model, adapter) of a synthetic checkpoint."""
    cfg = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    spec = ModelSpec.from_hf_config(cfg, shape)
    adapter = AdapterSpec(num_experts=experts, top_k=top_k, r=rank, lora_alpha=2.0 * rank, target_modules=spec.arch.module_names)
    return cfg, spec, adapter


def tensor_counts(shape: str, experts: int = 8, rank: int = 16, top_k: int = 2,
                  layers: int | None = None) -> list[tuple[str, int]]:
    """(name, element count) of every tensor write_synthetic writes, without writing it (resources.Sizes.from_counts)."""
    cfg, spec, adapter = specs(shape, experts, rank, top_k, layers)
    ckpt = Checkpoint(Path("-"), "adafuse", cfg, spec, adapter, in_memory_source({}, "-"), in_memory_source({}, "-"))
    shapes = [(n, tuple(s)) for n, s in spec.hf_weight_shapes().items()]
    shapes += [(n, tuple(s)) for n, (s, _) in ckpt.expected_adapter_shapes().items()]
    return [(n, int(torch.Size(s).numel())) for n, s in shapes]


def write_synthetic(out: Path, shape: str = "llama2-7b", experts: int = 8, rank: int = 16, top_k: int = 2,
                    shard_bytes: int = 4 << 30, seed: int = 0, layers: int | None = None, log=print,
                    device: str = "cpu") -> None:
    """layers: fewer (or more) decoder layers than the shape has, same widths (build-memory scaling).
    device: where the random numbers are drawn ("cuda": the 7B's 6.7e9 in seconds rather than minutes; other
    values than the CPU's, the same ones for the same seed on the same kind of device)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg, spec, adapter = specs(shape, experts, rank, top_k, layers)
    gen = torch.Generator(device).manual_seed(seed)

    def producer(shape_, std, offset=0.0):
        return lambda: (torch.randn(shape_, generator=gen, device=device) * std + offset).to(torch.bfloat16).cpu()

    shards, current, size = [], [], 0
    for name, shp in spec.hf_weight_shapes().items():
        nbytes = 2 * int(torch.Size(shp).numel())
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        norm = name.endswith("norm.weight")
        current.append((name, "BF16", tuple(shp), producer(shp, 0.05 if norm else 0.02, 1.0 if norm else 0.0)))
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, entries in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        t = time.time()
        write_safetensors_streaming(out / fname, entries, {"format": "pt"})
        log(f"wrote {fname}: {len(entries)} tensors in {time.time() - t:.1f}s")
        weight_map.update({e[0]: fname for e in entries})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    ckpt = Checkpoint(out, "adafuse", cfg, spec, adapter, in_memory_source({}, "-"), in_memory_source({}, "-"))
    entries = [(name, "BF16", tuple(shp), producer(shp, 1.0 if name.startswith("pregate") else 0.02))
               for name, (shp, _) in ckpt.expected_adapter_shapes().items()]
    write_safetensors_streaming(out / "adafuse_adapters.safetensors", entries, {"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "adafuse_config.json").write_text(json.dumps(adapter.to_json(), indent=2))
    log(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers [the shape's]")
    a = ap.parse_args()
    write_synthetic(a.out, a.shape, a.experts, a.rank, shard_bytes=int(a.shard_gb * (1 << 30)), layers=a.layers)


if __name__ == "__main__":
    main()
