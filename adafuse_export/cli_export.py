"""`export-onnx` and `validate` commands (registered on the main group by importing this module)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import click

from .cli import _import_torch, base_option, ckpt_argument, cli, format_option, parse_ids
from .errors import AdafuseError, missing_dependency
from .outputs import claim, is_onnx_export


class ValidationFailed(click.ClickException):
    """Outputs out of tolerance: exit status 1 (bad input exits 2 through AdafuseError)."""

    exit_code = 1

    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)


def _import_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise missing_dependency("onnx", "onnx") from None


@cli.command("export-onnx")
@ckpt_argument
@click.argument("out_dir", type=click.Path(path_type=Path))
@format_option
@base_option
@click.option("--flavour", type=click.Choice(["portable", "plugin"]), default="portable", show_default=True,
              help="portable: adapters in standard ONNX ops (ONNX Runtime, TensorRT-RTX); "
                   "plugin: one adafuse::AdafuseLoraLinear (or, with --strategy switch, AdafuseSwitchLinear) node per "
                   "routed site (TensorRT + plugin library).")
@click.option("--strategy", type=click.Choice(["fused", "switch"]), default=None,
              help="Plugin flavour only: the op of every adapter site, AdafuseLoraLinear (fused, the default) or "
                   "AdafuseSwitchLinear (switch); same fields and inputs. See docs/engine-path.md.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Weight and activation dtype (routers, norms and softmax stay float32).")
@click.option("--external-data-threshold", type=click.IntRange(0), default=None, metavar="BYTES",
              help="Write weights to <graph>.onnx.data when they exceed this many bytes [default: 2e9].")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT_DIR.")
def export_onnx_cmd(ckpt, out_dir, fmt, base, flavour, strategy, dtype, external_data_threshold, force):
    """Write ONNX graphs for CKPT into OUT_DIR: decoder.onnx, pregate.onnx, routes.safetensors, manifest.json.

    The directory appears complete or not at all (built in a temporary directory next to it, then renamed).
    """
    _import_torch()
    _import_onnx()
    from .converters import load_checkpoint
    from .onnx.export import EXTERNAL_DATA_THRESHOLD, export_onnx

    c = load_checkpoint(ckpt, fmt, base)
    claim(out_dir, option="OUT_DIR", inputs=c.inputs, force=force, ours=is_onnx_export, directory=True)
    threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
    manifest = export_onnx(c, out_dir, flavour, dtype, force, threshold, strategy, progress=True)
    for graph, info in manifest["graphs"].items():
        extra = f" + {info['external_data']}" if info["external_data"] else ""
        click.echo(f"{graph:<8} {out_dir / info['file']}{extra}: "
                   f"{len(info['inputs'])} inputs, {len(info['outputs'])} outputs")
    if manifest["routes"]:
        click.echo(f"routes   {out_dir / manifest['routes']['file']}: routing table {manifest['routes']['expert_ids'][0]}")
    click.echo(f"wrote {flavour} {dtype} ONNX export to {out_dir}")


def _finite(ctx, param, value):
    if value is not None and not math.isfinite(value):
        raise AdafuseError(f"--{param.name}: expected a finite non-negative number, found {value}")
    return value


def _model_kind(model: Path) -> str:
    """What validate accepts (the one truth that --help, the README and docs/onnx-graphs.md state)."""
    model = Path(model)
    if model.is_dir():
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
    raise AdafuseError(f"{model}: expected an ONNX export directory, a decoder .onnx file or a .engine file, "
                       f"found a file named '*{model.suffix}'{hint}")


@cli.command()
@ckpt_argument
@click.argument("model", type=click.Path(path_type=Path))
@format_option
@base_option
@click.option("--prompt-ids", "prompt_ids", multiple=True,
              help="Prompt token ids, comma-separated; repeat for several prompts [default: 1,2,...,8].")
@click.option("--steps", default=8, show_default=True, type=click.IntRange(0, 10000), help="Greedy decode steps after the prefill.")
@click.option("--atol", type=click.FloatRange(0), default=None, callback=_finite,
              help="Absolute tolerance (default per dtype: 1e-4 float32, 2e-2 float16, 0.15 bfloat16).")
@click.option("--rtol", type=click.FloatRange(0), default=None, callback=_finite,
              help="Relative tolerance (default per dtype: 1e-3, 2e-2, 5e-2).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plugin-ops", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Plugin-flavour ONNX only: run the adafuse nodes with numpy (cpu) or the plugins' CUDA kernels "
                   "(cuda); auto picks cuda when torch sees a GPU.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="ONNX models: ONNX Runtime's execution provider (cuda needs onnxruntime-gpu; it runs with TF32 "
                   "off so float32 graphs keep float32 accuracy); auto picks cuda when available.")
@click.option("--runtime", type=click.Choice(["python", "cpp"]), default="python", show_default=True,
              help="Engines only: run through TensorRT's Python API (python) or the C++ runtime's C API (cpp: "
                   "libadafuse_runtime.so from runtime/, found through $ADAFUSE_RUNTIME_LIB).")
@click.option("--reference", "mode", type=click.Choice(["full", "layerwise"]), default="full", show_default=True,
              help="full: the reference holds every weight; layerwise: it reads one layer's weights at a time and "
                   "ONNX Runtime keeps its weights in the memory-mapped data file (models that do not fit twice "
                   "in memory; same comparison). docs/large-models.md")
def validate(ckpt, model, fmt, base, prompt_ids, steps, atol, rtol, as_json, plugin_ops, device, runtime, mode):
    """Compare MODEL with the PyTorch reference of CKPT. MODEL is one of: an `export-onnx` output directory
    (or `convert`'s ENGINE.onnx/), its decoder .onnx file, or a `convert` ENGINE.engine file (its ENGINE.json
    manifest beside it; needs TensorRT and a GPU).

    Exit status 0 when every output is within tolerance, 1 when one is not, 2 on bad input.
    """
    _import_torch()
    from .converters import load_checkpoint
    from .validate import format_report, open_model_runner, validate as run_validate

    prompts = [parse_ids(p) for p in prompt_ids] or None
    c = load_checkpoint(ckpt, fmt, base)
    kind = _model_kind(model)
    if kind != "engine":  # engines are run by TensorRT (runners/tensorrt.py)
        _import_onnx()
    for p in prompts or ():
        if len(p) + steps > c.model.max_position_embeddings:
            raise AdafuseError(f"--prompt-ids ({len(p)} tokens) + --steps {steps} exceed the model's context of "
                               f"{c.model.max_position_embeddings} positions (max_position_embeddings in {c.path})")
    from .runners import open_runner

    if kind == "engine":
        runner = open_runner(model, runtime="cpp") if runtime == "cpp" else None
    else:
        if runtime == "cpp":
            raise AdafuseError(f"--runtime cpp: {model} is an ONNX export; the C++ runtime runs .engine files")
        runner = open_model_runner(model, mode, plugin_ops=plugin_ops, device=device)
    report = run_validate(c, model, prompts, steps, atol, rtol, runner=runner, mode=mode)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not report["passed"]:
        failed = [o["name"] for o in report["outputs"] if not o["passed"]]
        raise ValidationFailed(f"validation failed: {len(failed)} output(s) out of tolerance ({', '.join(failed[:4])}"
                               f"{', ...' if len(failed) > 4 else ''})")
