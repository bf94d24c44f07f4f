"""`export-onnx` and `export-routes`: the ONNX graphs, and the pre-gate as a routing table."""
from __future__ import annotations

from pathlib import Path

import click

from ..outputs import claim, is_marked_safetensors, onnx_export_files
from .options import (base_option, ckpt_argument, dtype_option, force_option, format_option, import_onnx, import_torch,
                      plugin_strategy_option, emit)


@click.command("export-onnx", short_help="Write the ONNX graphs only (portable or plugin flavour).")
@ckpt_argument
@click.argument("out_dir", type=click.Path(path_type=Path))
@format_option
@base_option
@click.option("--flavour", type=click.Choice(["portable", "plugin"]), default="portable", show_default=True,
              help="portable: adapters in standard ONNX ops (ONNX Runtime, TensorRT-RTX); "
                   "plugin: one adafuse::AdafuseLoraLinear (or, with --strategy switch, AdafuseSwitchLinear) node per "
                   "routed site (TensorRT + plugin library).")
@plugin_strategy_option("Plugin flavour only: the op of every adapter site, AdafuseLoraLinear (fused, the default) or "
                        "AdafuseSwitchLinear (switch); same fields and inputs. See docs/engine-path.md.")
@dtype_option("float32", "Weight and activation dtype (routers, norms and softmax stay float32).")
@click.option("--weights", "weights", type=click.Choice(["dtype", "fp8"]), default="dtype", show_default=True,
              help="The projections' base weights in --dtype, or fp8: float8e4m3fn initializers with float32 "
                   "per-output-channel scales and DequantizeLinear (opset 19), FP8 inputs of the plugin nodes; "
                   "--dtype float16 or bfloat16 (docs/onnx-graphs.md).")
@click.option("--kv-update", "kv_update", type=click.Choice(["copy", "in-place"]), default="copy", show_default=True,
              help="How the decoder writes present.{l}: copy (a new tensor of the whole cache), or in-place (plugin "
                   "flavour: TensorScatter into the past, which TensorRT >= 10.15 updates in place; needs --max-seq, "
                   "opset 24). convert --backend tensorrt picks it from the installed TensorRT.")
@click.option("--max-seq", type=click.IntRange(2, 1 << 20), default=None,
              help="--kv-update in-place: the cache's static length (the engine's --max-seq).")
@click.option("--external-data-threshold", type=click.IntRange(0), default=None, metavar="BYTES",
              help="Write weights to <graph>.onnx.data when they exceed this many bytes [default: 2e9].")
@force_option("Replace a non-empty OUT_DIR.")
def export_onnx(ckpt, out_dir, fmt, base, flavour, strategy, dtype, weights, kv_update, max_seq, external_data_threshold,
                force):
    """Write ONNX graphs for CKPT into OUT_DIR: decoder.onnx, pregate.onnx, routes.safetensors, manifest.json.

    The directory appears complete or not at all (built in a temporary directory next to it, then renamed).
    """
    import_torch()
    import_onnx()
    from ..converters import load_checkpoint
    from ..onnx.export import EXTERNAL_DATA_THRESHOLD, export_onnx as write_export

    from ..native_artifact import check_weight_dtype

    from ..onnx.builder import check_kv_update

    check_weight_dtype(dtype, weights)  # before the checkpoint is read
    check_kv_update(kv_update, flavour, max_seq)
    c = load_checkpoint(ckpt, fmt, base)
    claim(out_dir, option="OUT_DIR", inputs=c.inputs, force=force, ours=onnx_export_files, directory=True)
    threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
    manifest = write_export(c, out_dir, flavour, dtype, force, threshold, strategy, progress=True, weights=weights,
                            kv_update=kv_update, cache_len=max_seq)
    for graph, info in manifest["graphs"].items():
        extra = f" + {info['external_data']}" if info["external_data"] else ""
        emit(f"{graph:<8} {out_dir / info['file']}{extra}: "
                   f"{len(info['inputs'])} inputs, {len(info['outputs'])} outputs")
    if manifest["routes"]:
        emit(f"routes   {out_dir / manifest['routes']['file']}: routing table {manifest['routes']['expert_ids'][0]}")
    form = (" (FP8 e4m3 base weights)" if weights == "fp8" else "") + (
        f" (KV cache updated in place: {max_seq} positions)" if kv_update == "in-place" else "")
    emit(f"wrote {flavour} {dtype}{form} ONNX export to {out_dir}")


@click.command("export-routes", short_help="Write the pre-gate as a routing table [vocab, k].")
@ckpt_argument
@click.argument("out", type=click.Path(path_type=Path))
@format_option
@base_option
@force_option("Overwrite OUT.")
def export_routes(ckpt, out, fmt, base, force):
    """Write the pre-gate's exact routing table to OUT (.safetensors): expert_ids [vocab, k] int32, gates [vocab, k] float32.

    Only for pre-gated checkpoints whose pre-gate reads RMSNorm_0(embed(token)): there the
    route depends on the token id alone, and a table lookup replaces the pre-gate network.
    """
    from ..converters import load_checkpoint

    c = load_checkpoint(ckpt, fmt, base, validate=False)
    c.require_routing_table()  # from the configs alone: at once, before any tensor is read
    import_torch()
    from ..routes import write_routing_table

    c.validate()
    claim(out, option="OUT", inputs=c.inputs, force=force, ours=is_marked_safetensors)
    write_routing_table(c, out, "float32")
    emit(f"wrote routing table [{c.model.vocab_size}, {c.adapter.top_k}] to {out}")
