"""`export-onnx`: write decoder.onnx (+ .data), pregate.onnx, routes.safetensors, manifest.json atomically."""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from ..checkpoint import Checkpoint
from ..progress import Progress
from ..routes import write_routing_table
from ..summary import adapter_summary, routing_contract
from ..tensors import atomic_directory
from . import DECODER, MANIFEST, PREGATE, ROUTES, contract, plugin_ops
from .builder import WEIGHTS, build_decoder, build_pregate, check_kv_update, has_pregate_graph, pregate_in_decoder
from .graph import ELEM_NAMES, ExternalData, Graph

# Protobuf cannot hold more than 2 GiB; above this many initializer bytes, weights go to external data.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000


class _CountedExternalData(ExternalData):
    """ExternalData that reports each tensor written to a Progress."""

    def __init__(self, path: Path, progress: Progress | None):
        super().__init__(path)
        self.progress = progress

    def add(self, name: str, t) -> onnx.TensorProto:
        proto = super().add(name, t)
        if self.progress is not None:
            self.progress.update(t.numel() * t.element_size())
        return proto


def write_model(graph: Graph, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD,
                progress: bool = False) -> tuple[onnx.ModelProto, str | None]:
    """Write a built graph; its weights go to `<name>.data` when all initializers total more than
    `threshold` bytes (decided from the checkpoint's tensor shapes before any weight is read).

    External: each weight is read, converted, appended (4096-aligned) and released in turn, so peak
    memory is about the largest tensor; the .onnx file holds the graph and the inline constants.
    Returns (the ModelProto as written, without weight bytes when external; the data file name or None).
    progress: report tensors and bytes written to external data (stdout; a rewritten line on a TTY).
    """
    path = Path(path)
    total = graph.initializer_bytes()
    if total > threshold:
        location = path.name + ".data"
        weights = sum(1 for e in graph.initializers if not isinstance(e, onnx.TensorProto))
        meter = Progress(f"writing {location}", weights, total) if progress else None
        with _CountedExternalData(path.parent / location, meter) as sink:
            model = graph.model(external=sink)
            sink.close()
        if meter is not None:
            meter.done()
    else:
        location, model = None, graph.model()
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return model, location


def io_spec(model: onnx.ModelProto) -> dict:
    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": ELEM_NAMES.get(t.elem_type, str(t.elem_type)), "shape": shape})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def _check(path: Path, flavour: str) -> None:
    try:
        # custom-domain ops have no schema: full (shape-inferring) check for the portable flavour only.
        # By path, the checker parses the graph and checks external-data references (file present,
        # inside the model's folder) without loading weight bytes; shape inference needs only
        # initializer dims, plus the values of the inline shape constants.
        onnx.checker.check_model(str(path), full_check=flavour == "portable")
    except onnx.checker.ValidationError as e:  # a builder bug, not a user error
        raise RuntimeError(f"{path}: exported graph fails onnx.checker: {e}") from e


def export_onnx(ckpt: Checkpoint, out_dir: Path, flavour: str = "portable", dtype: str = "float32",
                force: bool = False, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                strategy: str | None = None, progress: bool = False, weights: str = "dtype",
                quantize_from: str | None = None, kv_update: str = "copy", cache_len: int | None = None) -> dict:
    """Build and write every file into a temporary directory next to out_dir, then rename it into place.
    strategy: the plugin op of the plugin flavour (plugin_ops.STRATEGIES; default fused).
    progress: print tensors and bytes written while external weight data is written.
    weights: 'dtype', or 'fp8' (the projections' base weights float8e4m3fn + DequantizeLinear, builder.py),
    quantized from the weights rounded to quantize_from (default dtype).
    kv_update: 'copy', or 'in-place' (plugin flavour: present = TensorScatter into the past, a static cache of
    cache_len positions; builder.KV_UPDATES)."""
    check_kv_update(kv_update, flavour, cache_len)  # before anything is written
    ckpt.require_exportable()
    with atomic_directory(Path(out_dir), force) as tmp:
        return _write_all(ckpt, tmp, flavour, dtype, external_data_threshold, strategy, progress, weights, quantize_from,
                          kv_update, cache_len)


def _write_all(ckpt: Checkpoint, tmp: Path, flavour: str, dtype: str, threshold: int, strategy: str | None,
               progress: bool, weights: str = "dtype", quantize_from: str | None = None, kv_update: str = "copy",
               cache_len: int | None = None) -> dict:
    m, adapter = ckpt.model, adapter_summary(ckpt.adapter)
    graphs = {}
    decoder_graph = build_decoder(ckpt, flavour, dtype, strategy, weights, quantize_from, kv_update, cache_len)
    opset = decoder_graph.opset
    strategy = decoder_graph.metadata.get("adafuse.strategy")  # None: no plugin node in the graph
    decoder, ext = write_model(decoder_graph, tmp / DECODER, threshold, progress)
    _check(tmp / DECODER, flavour)
    graphs["decoder"] = {"file": DECODER, "external_data": ext, **io_spec(decoder)}
    del decoder
    routes = None
    if has_pregate_graph(ckpt):
        pregate, ext = write_model(build_pregate(ckpt, dtype), tmp / PREGATE, threshold, progress)
        _check(tmp / PREGATE, "portable")
        graphs["pregate"] = {"file": PREGATE, "external_data": ext, **io_spec(pregate)}
        del pregate
        routes = write_routing_table(ckpt, tmp / ROUTES, dtype)
    manifest = {
        "format": "adafuse-onnx", "version": contract.VERSION, "flavour": flavour, "dtype": dtype, "opset": opset,
        "weights": WEIGHTS[weights], "kv_update": kv_update,
        "checkpoint": {"path": str(ckpt.path), "format": ckpt.format, "index_sha256": ckpt.index_sha256()},
        "model": {"family": m.family, "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
                  "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                  "sliding_window": m.sliding_window},
        "adapter": {**routing_contract(adapter),
                    "pregate_location": ("pregate.onnx" if has_pregate_graph(ckpt) else
                                         "decoder (outputs expert_ids, gates)" if pregate_in_decoder(ckpt) else None),
                    "static_modules_merged": adapter["static_modules"], "routed_modules": adapter["target_modules"]},
        "graphs": graphs, "routes": routes,
        "custom_ops": ({"domain": plugin_ops.DOMAIN, "version": plugin_ops.DOMAIN_VERSION, "strategy": strategy,
                        "op_type": plugin_ops.op_type(strategy), "plugin_version": plugin_ops.PLUGIN_VERSION,
                        "fields": [n for n, _ in plugin_ops.FIELDS], "inputs": list(plugin_ops.INPUTS)}
                       if strategy is not None else None),
        "kv_cache": (f"past_key_values.{{l}}.key/value [batch, kv_heads, {cache_len or contract.CACHE_AXIS}, head_dim] hold "
                     f"position p of row b at index p; present = the cache with row b's {contract.SEQ_LENS}[b] new entries "
                     f"written from index {contract.PAST_LENGTHS}[b] (adafuse_export/onnx/contract.py)"
                     + ("; in place: TensorScatter into the past (TensorRT >= 10.15 binds present to the past's memory)"
                        if kv_update == "in-place" else "")),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
