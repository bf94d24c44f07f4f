"""`convert`: checkpoint -> ONNX -> validated -> TensorRT engine (adafuse_export.convert does the work)."""
from __future__ import annotations

from pathlib import Path

import click

from .options import backend_option, base_option, ckpt_argument, dtype_option, force_option, format_option, plugin_strategy_option, emit


@click.command(short_help="Checkpoint -> validated ONNX -> TensorRT engine (the main job), or a native artifact.")
@ckpt_argument
@click.argument("engine", type=click.Path(path_type=Path))
@format_option
@base_option
@backend_option("tensorrt: plugin flavour with fused kernels (needs --plugin-lib); tensorrt-rtx: portable graph, "
                "builds on the CPU, runs on compute capability 8.x/12.x; auto: the first installed; native: no TensorRT, "
                "writes ENGINE as a directory OUT.native for the C++ runtime's native backend (the project's CUDA "
                "kernels, run by adafuse-serve / adafuse-generate on an NVIDIA GPU: runtime/README.md).", extra=("native",))
@dtype_option("float16")
@click.option("--weights", "weights", type=click.Choice(["dtype", "fp8"]), default="dtype", show_default=True,
              help="The projections' base weights in --dtype, or fp8 (float8 e4m3 with per-output-channel float32 scales, "
                   "W8A16: activations, adapters, norms, embedding and head stay in --dtype, which must be float16 or "
                   "bfloat16). The ONNX export holds them as float8e4m3fn initializers with DequantizeLinear (opset 19) "
                   "and the plugin nodes take them as FP8 inputs (--strategy fused); a native artifact stores them "
                   "for the native backend's FP8 kernels (strategy fused, or switch: the merged weights 16-bit copies).")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=1, show_default=True, help="Largest batch the engine accepts.")
@click.option("--max-seq", type=click.IntRange(2, 1 << 20), default=None,
              help="Longest context (prompt + generated) [default: the model's max_position_embeddings, at most 2048]; "
                   "more than max_position_embeddings is refused.")
@click.option("--plugin-lib", type=click.Path(path_type=Path), default=None,
              help="libadafuse_trt_plugins.so for --backend tensorrt (default: $ADAFUSE_PLUGIN_LIB, else the one installed with this tool).")
@plugin_strategy_option("Plugin for the adapter sites of a --backend tensorrt engine: fused (AdafuseLoraLinear, the "
                        "default: 0.97x the cuBLAS dense decode step on the H200) or switch (AdafuseSwitchLinear: merges the "
                        "route into a copy of W; pays only when routes repeat). See docs/engine-path.md.")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None, help="Reuse/extend a TensorRT timing cache file.")
@click.option("--version-compatible", is_flag=True,
              help="--backend tensorrt: a version-compatible engine (lean-runtime operators only, the lean runtime left out "
                   "of the plan), which the C++ runtime runs on TensorRT's lean runtime (libnvinfer_lean, pip "
                   "tensorrt-lean-cu12-libs / tensorrt-lean-cu13-libs of the engine's TensorRT version) instead of the full "
                   "libnvinfer. Refused for tensorrt-rtx and native.")
@click.option("--kv-update", "kv_update", type=click.Choice(["auto", "copy", "in-place"]), default="auto",
              show_default=True,
              help="How the engine's decoder writes the KV cache: in-place (TensorScatter into a static cache of "
                   "--max-seq positions, one cache buffer, no copy per step: --backend tensorrt 10.15 or newer), copy "
                   "(every step's present is a new cache: any TensorRT), or auto (in-place where the builder supports "
                   "it). Refused for --backend native.")
@click.option("--validate", "validate_mode", type=click.Choice(["full", "layerwise", "off"]), default="layerwise",
              show_default=True,
              help="Check the export against the PyTorch reference in ONNX Runtime: layerwise (the reference reads one "
                   "layer's weights at a time: bounded memory, same comparison), full (the reference holds every "
                   "weight) or off. A mode that will not fit in memory is refused before stage 1. A float16 export "
                   "is judged against the float32 reference, each output's atol max(the fixed one, 2 x the float16 "
                   "reference's own distance from float32), expert ids exact against the float16 reference (two "
                   "references: twice the time); `validate --half-tolerance fixed` gives the fixed-tolerance check.")
@click.option("--no-validate", is_flag=True, help="Alias of --validate off.")
@force_option("Overwrite existing ENGINE, its .json manifest and .onnx directory.")
def convert(ckpt, engine, fmt, base, backend, dtype, weights, max_batch, max_seq, plugin_lib, strategy, timing_cache,
            version_compatible, kv_update, validate_mode, no_validate, force):
    """Convert CKPT into a TensorRT engine ENGINE (e.g. out.engine), or with --backend native into a native
    artifact ENGINE (e.g. out.native/).

    \b
    Stages: read + validate the checkpoint; export ONNX (with the pre-gate and its routing
    table); check the ONNX against the PyTorch reference with ONNX Runtime; build the engine.
    Writes ENGINE, ENGINE's .json manifest (tensors, profiles, routing, SHA-256 hashes) and the
    .onnx directory it was built from, all atomically. Without any TensorRT it still leaves the
    validated ONNX and says what to install. Memory and disk for each stage are estimated from
    the checkpoint's headers first: a stage that will not fit is refused before it starts (an
    engine build that will not fit: the validated ONNX is kept). Leftovers of a killed run on the
    same output are removed.

    \b
    --backend native writes OUT.native/ instead: weights.safetensors (q/k/v and gate/up stacked
    as the kernels take them, static LoRAs merged, RoPE tables), adapters.safetensors (experts
    per lora_linear site, routers), routes.safetensors (the pre-gate's table) and manifest.json
    (kernel ABI, family features, SHA-256 of every file); --dtype, --weights, --max-batch, --max-seq
    and --force apply, the TensorRT options do not, and there is no ONNX and no CPU validation.
    """
    from ..convert import convert as run_convert

    run_convert(ckpt, engine, fmt=fmt, base=base, backend=backend, dtype=dtype, weights=weights, max_batch=max_batch,
                max_seq=max_seq,
                force=force, validate="off" if no_validate else validate_mode, plugin_library=plugin_lib, timing_cache=timing_cache,
                strategy=strategy, version_compatible=version_compatible, kv_update=kv_update, log=emit)
