"""`validate`: an ONNX export or an engine against the PyTorch reference."""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from ..errors import AdafuseError
from ..validate import DEFAULT_STEPS
from .options import base_option, ckpt_argument, device_option, emit, format_option, import_onnx, import_torch, parse_ids


class ValidationFailed(click.ClickException):
    """Outputs out of tolerance: exit status 1 (bad input exits 2 through AdafuseError)."""

    exit_code = 1

    def show(self, file=None):
        emit(f"error: {self.message}", err=True)


def _finite(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise AdafuseError(f"--{param.name}: expected a finite non-negative number, found {value}")
    return value


def _model_kind(model: Path) -> str:
    """What validate accepts (the one truth that --help, the README and docs/onnx-graphs.md state)."""
    from ..native_artifact import MANIFEST, SUFFIX, artifact_files

    model = Path(model)
    if model.is_dir():
        if artifact_files(model) is not None:
            return "native"
        if model.suffix == SUFFIX:
            raise AdafuseError(f"{model}: not a native artifact (no {MANIFEST} of format adafuse-native in it; "
                               "`convert --backend native` writes one)")
        return "onnx-dir"
    if model.suffix == ".engine":
        if not model.is_file():
            raise AdafuseError(f"{model}: engine file not found")
        return "engine"
    if not model.exists():
        raise AdafuseError(f"{model}: model file or directory not found")
    if model.suffix == ".onnx":
        return "onnx-file"
    hint = " (for an engine, name the .engine file, not its .json manifest)" if model.suffix == ".json" else ""
    raise AdafuseError(f"{model}: expected an ONNX export directory, a decoder .onnx file, a .engine file or a native "
                       f"artifact directory, found a file named '*{model.suffix}'{hint}")


def _stores_fp8(model: Path, kind: str) -> bool:
    from ..fp8_twin import stores_fp8
    from ..trt.manifest import manifest_path

    if kind == "engine":  # the manifest says (its ONNX export may be absent until the engine is opened)
        from ..inputs import read_json

        data = read_json(manifest_path(Path(model)))
        engine = data.get("engine") if isinstance(data, dict) else None
        return isinstance(engine, dict) and engine.get("weights") == "fp8_e4m3"
    return stores_fp8(Path(model))


@click.command(short_help="Compare an export or engine with the PyTorch reference.")
@ckpt_argument
@click.argument("model", type=click.Path(path_type=Path))
@format_option
@base_option
@click.option("--prompt-ids", "prompt_ids", multiple=True,
              help="Prompt token ids, comma-separated; repeat for several prompts [default: 1,2,...,8].")
@click.option("--steps", default=DEFAULT_STEPS, show_default=True, type=click.IntRange(0, 10000), help="Greedy decode steps after the prefill.")
@click.option("--atol", type=click.FloatRange(0), default=None, callback=_finite,
              help="Absolute tolerance (default per dtype: 1e-4 float32, 2e-2 float16, 0.15 bfloat16).")
@click.option("--rtol", type=click.FloatRange(0), default=None, callback=_finite,
              help="Relative tolerance (default per dtype: 1e-3, 2e-2, 5e-2).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plugin-ops", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Plugin-flavour ONNX only: run the adafuse nodes with numpy (cpu) or the plugins' CUDA kernels "
                   "(cuda); auto picks cuda when torch sees a GPU.")
@device_option(("auto", "cpu", "cuda"), "auto",
               "ONNX models: ONNX Runtime's execution provider (cuda needs onnxruntime-gpu; it runs with TF32 "
               "off so float32 graphs keep float32 accuracy); auto picks cuda when available.")
@click.option("--runtime", type=click.Choice(["python", "cpp"]), default="python", show_default=True,
              help="Engines: run through TensorRT's Python API (python) or the C++ runtime's C API (cpp: "
                   "libadafuse_runtime.so from runtime/, found through $ADAFUSE_RUNTIME_LIB). Native artifacts: cpp "
                   "only (the native backend, on a GPU, with --strategy).")
@click.option("--strategy", type=click.Choice(["fused", "switch"]), default="fused", show_default=True,
              help="Native artifacts (--runtime cpp): the native backend's strategy: fused (the routed fused linear "
                   "kernel) or switch (each decode token's experts merged into the weights; pre-gated artifacts of "
                   "--max-batch 1; with FP8 weights the merged weights are 16-bit, beside the FP8 ones).")
@click.option("--reference", "mode", type=click.Choice(["full", "layerwise"]), default="full", show_default=True,
              help="full: the reference holds every weight; layerwise: it reads one layer's weights at a time and "
                   "ONNX Runtime keeps its weights in the memory-mapped data file (models that do not fit twice "
                   "in memory; same comparison). docs/large-models.md")
@click.option("--half-tolerance", type=click.Choice(["measured", "fixed"]), default="measured", show_default=True,
              help="float16/bfloat16 models: measured judges them against the float32 reference, each output's atol "
                   "max(--atol, 2 x the same-dtype reference's own distance from float32), expert ids exact against "
                   "the same-dtype reference (runs a second reference: twice the time with --reference layerwise); "
                   "fixed compares with the same-dtype reference under --atol/--rtol only (one reference: faster, but blind to what the half dtype itself costs).")
@click.option("--min-greedy-agreement", type=click.FloatRange(0, 1), default=None,
              help="FP8-weights models (convert --weights fp8: a native artifact or an ONNX export): fail when the quantization's greedy agreement "
                   "(the model's FP8 twin against the unquantized reference, over every prompt position and decode "
                   "step) is below this fraction. Without it that agreement and the logits' max abs diff are reported "
                   "only; the runtime is judged against the FP8 twin (the reference with the model's FP8 projection "
                   "weights dequantized) by the bounds above.")
def validate(ckpt, model, fmt, base, prompt_ids, steps, atol, rtol, as_json, plugin_ops, device, runtime, strategy,
             mode, half_tolerance, min_greedy_agreement):
    """Compare MODEL with the PyTorch reference of CKPT. MODEL is one of: an `export-onnx` output directory
    (or `convert`'s ENGINE.onnx/), its decoder .onnx file, a `convert` ENGINE.engine file (its ENGINE.json
    manifest beside it; needs TensorRT and a GPU), or a `convert --backend native` OUT.native directory (with
    --runtime cpp: the C++ runtime's native backend; needs a GPU). A native artifact or ONNX export with FP8 weights
    is judged against its FP8 twin, the quantization's own effect reported besides (see --min-greedy-agreement).

    Exit status 0 when every output is within tolerance, 1 when one is not, 2 on bad input.
    """
    import_torch()
    from ..converters import load_checkpoint
    from ..validate import report_lines, open_model_runner, validate as run_validate

    prompts = [parse_ids(p) for p in prompt_ids] or None
    c = load_checkpoint(ckpt, fmt, base)
    kind = _model_kind(model)
    if kind == "native" and runtime != "cpp":
        raise AdafuseError(f"{model} is a native artifact: the C++ runtime's native backend runs it (add --runtime cpp)")
    if strategy != "fused" and kind != "native":
        raise AdafuseError(f"--strategy {strategy}: chooses the native backend's strategy; {model} is not a native "
                           "artifact (an engine's strategy is fixed when it is built: convert --strategy)")
    if kind not in ("engine", "native"):  # engines are run by TensorRT (runners/tensorrt.py), native artifacts by the runtime
        import_onnx()
    if min_greedy_agreement is not None and not _stores_fp8(model, kind):
        raise AdafuseError(f"--min-greedy-agreement: {model} does not hold FP8 weights (it applies to a native artifact "
                           "or an ONNX export of `convert --weights fp8`)")
    for p in prompts or ():
        if len(p) + steps > c.model.max_position_embeddings:
            raise AdafuseError(f"--prompt-ids ({len(p)} tokens) + --steps {steps} exceed the model's context of "
                               f"{c.model.max_position_embeddings} positions (max_position_embeddings in {c.path})")
    from ..runners import open_runner

    if kind in ("engine", "native"):
        runner = open_runner(model, runtime="cpp", **({"strategy": strategy} if kind == "native" else {})) \
            if runtime == "cpp" else None
    else:
        if runtime == "cpp":
            raise AdafuseError(f"--runtime cpp: {model} is an ONNX export; the C++ runtime runs .engine files and "
                               "native artifacts")
        runner = open_model_runner(model, mode, plugin_ops=plugin_ops, device=device)
    import sys

    # each compared step, as it completes, on a terminal's stderr (stdout keeps the report, --json clean)
    progress = (lambda line: emit(f"  {line}", err=True)) if sys.stderr.isatty() else None
    report = run_validate(c, model, prompts, steps, atol, rtol, runner=runner, mode=mode, half_tolerance=half_tolerance,
                          log=progress, min_greedy_agreement=min_greedy_agreement)
    if as_json:
        click.echo(json.dumps(report, indent=2))  # JSON escapes control characters itself
    else:
        for line in report_lines(report):
            emit(line)
    if not report["passed"]:
        q = report.get("quantization") or {}
        if all(o["passed"] for o in report["outputs"]) and not q.get("passed", True):
            raise ValidationFailed(f"validation failed: the FP8 quantization's greedy agreement "
                                   f"{100 * q['greedy_agreement']['fraction']:.1f}% is below --min-greedy-agreement "
                                   f"{q['min_greedy_agreement']} (the runtime is within tolerance of the FP8 twin)")
        failed = [o["name"] for o in report["outputs"] if not o["passed"]]
        raise ValidationFailed(f"validation failed: {len(failed)} output(s) out of tolerance ({', '.join(failed[:4])}"
                               f"{', ...' if len(failed) > 4 else ''})")
