"""Checkpoint weights as the exporters store them, read once per use and written in one place: the ONNX
builder's initializers and the native artifact's tensors come from these functions, so both hold the
same numbers (a base weight rounded to the model dtype, a static LoRA merged into it in float32).
"""
from __future__ import annotations

DTYPE_NAMES = ("float32", "float16", "bfloat16")


# --weights: the projections' base weights in the model dtype, or FP8 e4m3 with per-output-channel scales; the
# value names the stored form (native artifact model.weights, ONNX metadata adafuse.weights, engine manifest)
WEIGHT_FORMATS = {"dtype": "dtype", "fp8": "fp8_e4m3"}


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def read_released(src, name: str):
    """One checkpoint tensor. A SafetensorsSource keeps each shard memory-mapped once opened, and the
    pages read stay resident (and count in RSS) while the map lives, so reading a 7B checkpoint through
    it would grow RSS to the checkpoint size; the maps are released after every read (re-opening costs
    a header parse)."""
    t = src.get(name)
    src.release()
    return t


def rounded(src, name: str, tdtype):
    """The tensor as the reference holds it (cast to the model dtype), in float32."""
    import torch

    return read_released(src, name).to(tdtype).to(torch.float32)


def base_weight(ckpt, name: str, tdtype, merge_site=None):
    """A base weight in the model dtype; with `merge_site` (a static LoRA site: one expert, no router)
    W + scale * B A computed in float32 from the dtype-rounded tensors, then rounded once."""
    if merge_site is None:
        # == rounded(...).to(tdtype): float32 holds every float16/bfloat16 value exactly
        return read_released(ckpt.base, name).to(tdtype)
    w = rounded(ckpt.base, name, tdtype)
    A = rounded(ckpt.adapters, f"{merge_site.name}.lora_A", tdtype)[0]
    B = rounded(ckpt.adapters, f"{merge_site.name}.lora_B", tdtype)[0]
    w = w + ckpt.adapter.site_scale(merge_site.name) * (B @ A)  # out of place: w may be the source tensor
    return w.to(tdtype)
