"""`convert`: checkpoint -> ONNX -> TensorRT engine, with a manifest, atomically.

Outputs for `convert ckpt/ out.engine`:
  out.engine   the serialized engine
  out.json     the engine manifest (tensors, profiles, routing, plugin, SHA-256 of every file)
  out.onnx/    the ONNX export it was built from, with the pre-gate (pregate.onnx,
               routes.safetensors) and the export manifest

Everything is staged in a temporary directory beside out.engine and renamed into place at the
end (out.json last, so its presence means a complete conversion); a failure or Ctrl-C leaves
previous outputs untouched and no temporary files. A run killed outright (SIGKILL, the OOM
killer) leaves its staging directory; the next run on the same output removes it (staging.py).

Before stage 1 the memory and disk each stage needs are estimated from the checkpoint's headers
(resources.py) and compared with what the machine has: a stage that would not fit is refused
with the option that would, and an engine build that would not fit is announced up front: the
run then stops after validation and keeps the validated ONNX.
"""
from __future__ import annotations

import gc
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import installation
from .errors import AdafuseError
from .outputs import claim_engine_outputs, move_into_place, write_errors

VALIDATE_MODES = ("full", "layerwise", "off")
DEFAULT_MAX_SEQ = 2048


def output_paths(engine: Path) -> dict[str, Path]:
    return {"engine": engine, "manifest": engine.with_suffix(".json"), "onnx": engine.with_suffix(".onnx")}


@dataclass
class Plan:
    """What one conversion will do, settled before any weight is read."""

    ckpt: Any  # Checkpoint
    engine: Path
    outs: dict[str, Path]
    backend: Any  # trt.backends.Backend, or None: no TensorRT installed
    flavour: str
    dtype: str
    max_batch: int
    max_seq: int
    validate: str  # VALIDATE_MODES
    validate_dtype: str | None  # the dtype of the graph validated in place of `dtype` (bfloat16 -> float32), or None
    build_refused: str | None  # why the engine build will not run here (memory), or None
    strategy: str | None
    plugin_library: Path | None
    timing_cache: Path | None
    version_compatible: bool = False  # --version-compatible: an engine for TensorRT's lean runtime
    weights: str = "dtype"  # or "fp8": the projections' base weights FP8 e4m3 (the export, its validation, the engine)
    kv_update: str = "copy"  # or "in-place" (TensorRT >= 10.15: onnx.builder KV_UPDATES), from the backend's version


class Stages:
    """Numbered stage headers with elapsed time; detail lines indented under them."""

    def __init__(self, log: Callable[[str], Any], total: int = 4):
        self.log, self.t0, self.total = log, time.time(), total

    def __call__(self, n: int, text: str) -> None:
        self.log(f"[{n}/{self.total} {time.time() - self.t0:6.1f}s] {text}")

    def detail(self, text: str) -> None:
        self.log(f"         {text}")

    @property
    def elapsed(self) -> float:
        return time.time() - self.t0


def convert(ckpt_path: Path, engine: Path, *, fmt: str | None = None, base: Path | None = None, backend: str = "auto",
            dtype: str = "float32", max_batch: int = 1, max_seq: int | None = None, force: bool = False,
            validate: str = "layerwise", plugin_library: Path | None = None, timing_cache: Path | None = None,
            strategy: str | None = None, weights: str = "dtype", version_compatible: bool = False,
            kv_update: str = "auto", log=print) -> dict:
    """validate: full (the reference holds every weight), layerwise (one layer at a time), off.
    max_seq: None for the model's max_position_embeddings, at most DEFAULT_MAX_SEQ.
    weights: 'dtype', or 'fp8': FP8 base weights (native_artifact.WEIGHT_FORMATS in a native artifact; float8e4m3fn
    initializers with DequantizeLinear, or FP8 inputs of the plugin nodes, in the ONNX export and the engine).
    version_compatible: a full-TensorRT engine for TensorRT's lean runtime (trt/build.py builder_config).
    kv_update: 'auto' (the backend's Backend.kv_update), 'copy', or 'in-place' (refused where the backend cannot)."""
    from .staging import make_staging, remove_stale_stagings
    from .trt.backends import KINDS
    from .trt.build import version_compatible_refusal

    if validate not in VALIDATE_MODES:
        raise AdafuseError(f"--validate {validate}: expected one of {', '.join(VALIDATE_MODES)}")
    if kv_update not in ("auto", "copy", "in-place"):
        raise AdafuseError(f"--kv-update {kv_update}: expected one of auto, copy, in-place")
    if backend == "native":
        if kv_update != "auto":
            raise AdafuseError(f"--kv-update {kv_update}: not an option of --backend native (its runtime owns one cache "
                               "per sequence slot and writes it in place)")
        if version_compatible:
            raise AdafuseError("--version-compatible: not an option of --backend native (it builds no TensorRT engine; "
                               "only --backend tensorrt builds engines for TensorRT's lean runtime)")
        return convert_native(ckpt_path, Path(engine), fmt=fmt, base=base, dtype=dtype, max_batch=max_batch,
                              max_seq=max_seq, force=force, plugin_library=plugin_library, timing_cache=timing_cache,
                              strategy=strategy, weights=weights, log=log)
    if version_compatible and backend in KINDS and not KINDS[backend].version_compatible:
        raise AdafuseError(version_compatible_refusal(KINDS[backend]))
    from .native_artifact import check_weight_dtype

    check_weight_dtype(dtype, weights)
    engine = Path(engine)
    outs = output_paths(engine)
    _check_outputs(engine)
    stages = Stages(log)
    remove_stale_stagings(engine, log=stages.detail)
    stages(1, f"reading {ckpt_path}")
    plan = plan_conversion(ckpt_path, engine, outs, fmt=fmt, base=base, backend=backend, dtype=dtype,
                           max_batch=max_batch, max_seq=max_seq, validate=validate, plugin_library=plugin_library,
                           timing_cache=timing_cache, strategy=strategy, force=force, stages=stages, weights=weights,
                           version_compatible=version_compatible, kv_update=kv_update)
    try:
        staging = make_staging(engine)
    except OSError as e:
        raise AdafuseError(f"{engine}: cannot write in {engine.parent}: {e.strerror or e}") from None
    try:
        with write_errors(engine, staging):  # every staged write (the engine's too): a full disk is one line
            onnx_manifest = export_stage(plan, staging, stages)
            validate_stage(plan, staging, stages)
            if plan.backend is None or plan.build_refused:
                _place(staging, outs, with_engine=False)
                raise AdafuseError(_no_engine_message(plan))
            return build_stage(plan, staging, onnx_manifest, stages)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_outputs(engine: Path) -> None:
    """The output's name and folder; what is in the way is claimed once the checkpoint's inputs are known."""
    parent = engine.parent if str(engine.parent) else Path(".")
    if engine.suffix != ".engine":
        hint = "; --backend native writes a .native artifact" if engine.suffix == ".native" else ""
        raise AdafuseError(f"{engine}: the output name must end in .engine (found '{engine.suffix or 'no suffix'}'){hint}")
    if not parent.is_dir():
        state = "is not a directory" if parent.exists() else "does not exist"
        raise AdafuseError(f"{engine}: output directory {parent} {state}")


def plan_conversion(ckpt_path: Path, engine: Path, outs: dict[str, Path], *, fmt, base, backend: str, dtype: str,
                    max_batch: int, max_seq: int | None, validate: str, plugin_library: Path | None,
                    timing_cache: Path | None, strategy: str | None, force: bool, stages: Stages,
                    weights: str = "dtype", version_compatible: bool = False, kv_update: str = "auto") -> Plan:
    """Stage 1: read the checkpoint's headers, pick the backend, settle validation, check resources."""
    from . import resources
    from .converters import load_checkpoint
    from .trt.backends import TensorRTVersionRefused, select_backend
    from .trt.build import version_compatible_refusal

    ckpt, max_seq = _open_checkpoint(ckpt_path, fmt, base, max_seq, stages,
                                     lambda c: claim_engine_outputs(outs, c.inputs, force, timing_cache))
    try:
        chosen = select_backend(backend)
    except TensorRTVersionRefused:
        raise  # a TensorRT is installed, of the wrong major: said, not taken for "none installed"
    except AdafuseError:
        if backend != "auto":
            raise
        chosen = None  # auto with no TensorRT: still export and validate the ONNX, then say what to install
    if version_compatible and chosen and not chosen.kind.version_compatible:  # --backend auto found only TensorRT-RTX
        raise AdafuseError(version_compatible_refusal(chosen.kind) + "; install full TensorRT or drop --version-compatible")
    flavour = chosen.flavour if chosen else "portable"
    if chosen and chosen.kind.plugin_library:
        plugin_library = plugin_library or installation.plugin_library()
        if plugin_library is None or not plugin_library.is_file():
            raise AdafuseError(f"--plugin-lib {plugin_library or '(not given)'}: {chosen.kind.title} needs the adafuse plugin "
                               f"library {chosen.kind.plugin_library}, which this installation does not ship (`adafuse-export "
                               "doctor` tells why); build it with `cmake --preset release && cmake --build --preset release`")
    validate_dtype = None
    if validate != "off" and dtype == "bfloat16" and not onnxruntime_runs_bfloat16():
        validate_dtype = "float32"
        stages.detail("this ONNX Runtime has no bfloat16 CPU kernels: stage 3 validates the float32 graph exported from "
                      "the same checkpoint (the same graph in another dtype); bfloat16 itself is validated only on a GPU "
                      "(adafuse-export validate CKPT OUT.onnx with onnxruntime-gpu). --validate off skips this")
    needs = resources.estimate(ckpt, dtype, validate, validate_dtype, build=chosen is not None)
    suggestions = {"validate": ("--validate layerwise would need about "
                                f"{resources.estimate(ckpt, dtype, 'layerwise', validate_dtype, False)[-1].memory / 2**30:.1f} GiB"
                                if validate == "full" else "") + "; --validate off skips the check"}
    parent = engine.parent if str(engine.parent) else Path(".")
    refused = resources.check(needs, parent, suggestions, log=stages.detail)
    build_refused = refused[0] if refused else None
    if build_refused:
        stages.detail(f"the engine build will not fit here ({build_refused}): convert stops after "
                      + ("validation and keeps the validated ONNX" if validate != "off" else "the export and keeps the ONNX"))
    if weights == "fp8" and flavour == "plugin":
        from .native_artifact import check_weight_format

        check_weight_format(ckpt, dtype, weights)  # the plugin's FP8 kernels: in_features % 16 == 0
    supported = chosen.kv_update if chosen else "copy"
    if kv_update == "in-place" and supported != "in-place":
        what = f"{chosen.name} {chosen.version}" if chosen else "no TensorRT installed"
        raise AdafuseError(f"--kv-update in-place: {what} cannot update a cache in place (its parser must import "
                           "TensorScatter as IKVCacheUpdateLayer: full TensorRT 10.15 or newer); use --kv-update copy or auto")
    kv_update = supported if kv_update == "auto" else kv_update
    if chosen and kv_update == "in-place":
        stages.detail(f"{chosen.name} {chosen.version} updates the KV cache in place: the decoder writes it with TensorScatter "
                      f"into a static cache of {max_seq} positions")
    return Plan(ckpt, engine, outs, chosen, flavour, dtype, max_batch, max_seq, validate, validate_dtype, build_refused,
                strategy, plugin_library, timing_cache, version_compatible, weights, kv_update)


def _open_checkpoint(ckpt_path: Path, fmt: str | None, base: Path | None, max_seq: int | None, stages: Any,
                     claim_outputs: Callable[[Any], object]) -> tuple[Any, int]:
    """Read and check the checkpoint, claim the outputs (nothing is written before this), say what was read,
    settle --max-seq: the start every convert backend shares."""
    from .converters import load_checkpoint

    ckpt = load_checkpoint(ckpt_path, fmt, base)
    ckpt.require_exportable()
    claim_outputs(ckpt)
    m = ckpt.model
    stages.detail(f"{ckpt.format}: {m.family}, {m.num_layers} layers, routing {ckpt.adapter.routing}, "
                  f"{ckpt.adapter.num_experts} experts, top-{ckpt.adapter.top_k}")
    return ckpt, _settle_max_seq(ckpt, max_seq)


def _settle_max_seq(ckpt, max_seq: int | None) -> int:
    """The model's positions are trained up to max_position_embeddings: a longer context is refused."""
    limit = ckpt.model.max_position_embeddings
    if max_seq is None:
        return min(DEFAULT_MAX_SEQ, limit)
    if max_seq > limit:
        raise AdafuseError(f"--max-seq {max_seq}: {ckpt.path} has max_position_embeddings {limit} (config.json); "
                           f"positions beyond it are untrained, so the engine would accept contexts the model cannot "
                           f"handle; pass --max-seq {limit} or less")
    return max_seq


def onnxruntime_runs_bfloat16() -> bool:
    """Whether this ONNX Runtime's CPU provider executes a bfloat16 elementwise op (the RMSNorm's Mul)."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return False
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])
    model = helper.make_model(helper.make_graph([helper.make_node("Mul", ["x", "x"], ["y"])], "probe", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # NOT_IMPLEMENTED: no kernel
        return False
    return True


def export_stage(plan: Plan, staging: Path, stages: Stages) -> dict:
    """Stage 2: the ONNX export (with progress on large weights)."""
    from .onnx.export import export_onnx

    form = plan.dtype if plan.weights == "dtype" else f"{plan.dtype}, FP8 e4m3 base weights"
    stages(2, f"exporting {plan.flavour} ONNX ({form})")
    return export_onnx(plan.ckpt, staging / "onnx", plan.flavour, plan.dtype, strategy=plan.strategy, progress=True,
                       weights=plan.weights, **_kv_form(plan))


def _kv_form(plan: Plan) -> dict:
    """export_onnx's KV cache arguments for the plan: an in-place cache is static, max_seq positions (what the engine binds)."""
    return {"kv_update": plan.kv_update, "cache_len": plan.max_seq if plan.kv_update == "in-place" else None}


def validate_stage(plan: Plan, staging: Path, stages: Stages) -> dict | None:
    """Stage 3: the export against the PyTorch reference in ONNX Runtime; prints the summary, refuses on failure."""
    if plan.validate == "off":
        stages(3, "skipping ONNX Runtime validation")
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        stages(3, "skipping ONNX Runtime validation: onnxruntime is not installed (pip install 'adafuse-export[onnx]')")
        return None
    from .onnx.export import export_onnx
    from .validate import DEFAULT_STEPS, failed_outputs, summary
    from .validate import validate as run_validation

    onnx_dir = staging / "onnx"
    target = plan.validate_dtype or plan.dtype
    # the plugin flavour too: its adafuse nodes run as ONNX Runtime custom ops
    stages(3, f"validating the {plan.flavour} ONNX export against the PyTorch reference (ONNX Runtime, {plan.validate} reference"
              + (f", float32 twin of the {plan.dtype} graph" if plan.validate_dtype else "") + ")")
    stages.detail(f"a quick check: the default prompt and {CONVERT_STEPS} decode steps, the {plan.validate} reference "
                  f"(`validate` defaults to {DEFAULT_STEPS} steps and the full reference; pass --validate off to skip)")
    if plan.validate_dtype:
        onnx_dir = staging / f"onnx-{target}"
        # FP8: the float32 graph holds the same e4m3 bytes (quantized from the plan's dtype), dequantized to float32
        export_onnx(plan.ckpt, onnx_dir, plan.flavour, target, strategy=plan.strategy, progress=True,
                    weights=plan.weights, quantize_from=plan.dtype, **_kv_form(plan))
    try:
        report = run_validation(plan.ckpt, onnx_dir / "decoder.onnx", steps=CONVERT_STEPS, mode=plan.validate,
                                log=stages.detail)
    except AdafuseError as e:  # name the output the user will have, not the staging directory
        raise AdafuseError(str(e).replace(str(onnx_dir), str(plan.outs["onnx"])) + "; nothing was written. "
                           "--validate off builds without this check") from None
    finally:
        if plan.validate_dtype:
            shutil.rmtree(onnx_dir, ignore_errors=True)
    for line in summary(report):
        stages.detail(line)
    if not report["passed"]:
        raise AdafuseError(f"{plan.engine}: the ONNX export does not match the reference ({failed_outputs(report)}); "
                           "nothing was written. Run adafuse-export export-onnx and validate for the full report, "
                           "or pass --validate off to build anyway")
    return report


CONVERT_STEPS = 4  # decode steps of convert's check: each is minutes for a 7B on a CPU


def build_stage(plan: Plan, staging: Path, onnx_manifest: dict, stages: Stages) -> dict:
    """Stage 4: the engine and its manifest, then every output renamed into place."""
    from .outputs import BUILD_LOG
    from .progress import heartbeat
    from .trt.build import build_engine
    from .trt.manifest import make_manifest, write_manifest

    chosen, outs, onnx_dir = plan.backend, plan.outs, staging / "onnx"
    # validation's references and sessions die in reference cycles that only the collector frees: without this the
    # builder ran beside them (measured on a 162M Qwen3: 1.7 GiB of the build stage's 2.7 GiB peak)
    gc.collect()
    stages(4, f"building the engine with {chosen.name} {chosen.version} (max batch {plan.max_batch}, max seq {plan.max_seq})")
    with heartbeat(stages.detail, f"building the {chosen.name} engine"):
        blob, io = build_engine(chosen, onnx_dir / "decoder.onnx", dtype=plan.dtype, weights=plan.weights,
                                max_batch=plan.max_batch,
                                max_seq=plan.max_seq, plugin_library=plan.plugin_library, timing_cache=plan.timing_cache,
                                log=stages.detail, log_file=onnx_dir / BUILD_LOG, log_shown_as=outs["onnx"] / BUILD_LOG,
                                version_compatible=plan.version_compatible)
    (staging / "engine").write_bytes(blob)
    manifest = make_manifest(engine_file=staging / "engine", engine_name=plan.engine.name, onnx_dir=onnx_dir,
                             onnx_dir_name=outs["onnx"].name, onnx_manifest=onnx_manifest, backend=chosen, io=io,
                             dtype=plan.dtype, max_batch=plan.max_batch, max_seq=plan.max_seq, checkpoint=plan.ckpt,
                             weights=plan.weights, version_compatible=plan.version_compatible,
                             kv_in_place=plan.kv_update == "in-place")
    write_manifest(manifest, staging / "manifest.json")
    _place(staging, outs, with_engine=True)
    stages.log(f"wrote {plan.engine} ({len(blob) / 2**20:.1f} MiB), {outs['manifest'].name}, {outs['onnx'].name}/ "
               f"in {stages.elapsed:.1f}s")
    return manifest


def _no_engine_message(plan: Plan) -> str:
    from .trt.backends import install_hint

    what = "validated " if plan.validate != "off" else ""
    if plan.build_refused:
        return (f"the engine was not built: {plan.build_refused}; the {what}ONNX export is in {plan.outs['onnx']}. "
                f"Build the engine on a machine with more memory (the same command)")
    return (f"no TensorRT installed, so no engine was built; the {what}ONNX export is in {plan.outs['onnx']}. "
            f"To build engines install {install_hint()}")


def _place(staging: Path, outs: dict[str, Path], with_engine: bool) -> None:
    """Rename the staged outputs into place, the manifest last; what they replace goes into the
    staging directory's `replaced/`, removed with it."""
    staged = {"onnx": staging / "onnx", "engine": staging / "engine", "manifest": staging / "manifest.json"}
    names = ("onnx", "engine", "manifest") if with_engine else ("onnx",)
    move_into_place([(staged[n], outs[n]) for n in names], staging / "replaced")


def convert_native(ckpt_path: Path, out: Path, *, fmt: str | None, base: Path | None, dtype: str, max_batch: int,
                   max_seq: int | None, force: bool, plugin_library: Path | None, timing_cache: Path | None,
                   strategy: str | None, weights: str = "dtype", log=print) -> dict:
    """`convert --backend native`: the checkpoint as a native artifact OUT.native/ (native_artifact.py), staged beside it
    and renamed into place at the end, as the engine outputs are. Returns its manifest."""
    from . import native_artifact
    from .outputs import claim
    from .staging import make_staging, remove_stale_stagings

    for value, option, why in ((plugin_library, "--plugin-lib", "it runs no TensorRT plugin"),
                               (timing_cache, "--timing-cache", "it builds no TensorRT engine"),
                               (strategy, "--strategy", "the native runtime chooses fused or switch when it opens the artifact")):
        if value is not None:
            raise AdafuseError(f"{option}: not an option of --backend native ({why})")
    native_artifact.check_weight_dtype(dtype, weights)
    parent = out.parent if str(out.parent) else Path(".")
    if out.suffix != native_artifact.SUFFIX:
        raise AdafuseError(f"{out}: the output name of --backend native must end in {native_artifact.SUFFIX} (a directory; "
                           f"found '{out.suffix or 'no suffix'}')")
    if not parent.is_dir():
        raise AdafuseError(f"{out}: output directory {parent} {'is not a directory' if parent.exists() else 'does not exist'}")
    stages = Stages(log, total=3)
    remove_stale_stagings(out, log=stages.detail)
    stages(1, f"reading {ckpt_path}")
    ckpt, max_seq = _open_checkpoint(ckpt_path, fmt, base, max_seq, stages,
                                     lambda c: claim(out, option="ENGINE", inputs=c.inputs, force=force,
                                                     ours=native_artifact.artifact_files, directory=True))
    try:
        staging = make_staging(out)
    except OSError as e:
        raise AdafuseError(f"{out}: cannot write in {parent}: {e.strerror or e}") from None
    try:
        with write_errors(out, staging):
            form = dtype if weights == "dtype" else f"{dtype}, FP8 e4m3 base weights"
            stages(2, f"writing the native artifact ({form}, kernel ABI {native_artifact.ABI_VERSION})")
            (staging / "native").mkdir()
            manifest = native_artifact.write_artifact(ckpt, staging / "native", dtype, max_batch, max_seq, log=stages.detail,
                                                      weights=weights)
            stages(3, "placing it (adafuse-serve / adafuse-generate / the C API run it on an NVIDIA GPU: "
                      "runtime/README.md)")
            size = sum(p.stat().st_size for p in (staging / "native").iterdir())
            move_into_place([(staging / "native", out)], staging / "replaced")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stages.log(f"wrote {out}/ ({size / 2**20:.1f} MiB: {', '.join(sorted(manifest['files']))}, {native_artifact.MANIFEST}) "
               f"in {stages.elapsed:.1f}s")
    return manifest
