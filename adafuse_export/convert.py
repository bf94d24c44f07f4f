"""`convert`: checkpoint -> ONNX -> TensorRT engine, with a manifest, atomically.

Outputs for `convert ckpt/ out.engine`:
  out.engine   the serialized engine
  out.json     the engine manifest (tensors, profiles, routing, plugin, SHA-256 of every file)
  out.onnx/    the ONNX export it was built from, with the pre-gate (pregate.onnx,
               routes.safetensors) and the export manifest

Everything is staged in a temporary directory beside out.engine and renamed into place at the
end (out.json last, so its presence means a complete conversion); a failure or Ctrl-C leaves
previous outputs untouched and no temporary files.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import AdafuseError
from .outputs import _umask, claim_engine_outputs


def output_paths(engine: Path) -> dict[str, Path]:
    return {"engine": engine, "manifest": engine.with_suffix(".json"), "onnx": engine.with_suffix(".onnx")}


def convert(ckpt_path: Path, engine: Path, *, fmt: str | None = None, base: Path | None = None, backend: str = "auto",
            dtype: str = "float32", max_batch: int = 1, max_seq: int = 2048, force: bool = False,
            validate_onnx: bool = True, plugin_library: Path | None = None, timing_cache: Path | None = None,
            strategy: str | None = None, log=print) -> dict:
    from .converters import load_checkpoint
    from .onnx.export import export_onnx
    from .trt.backends import INSTALL, select_backend
    from .trt.build import build_engine
    from .trt.manifest import make_manifest, write_manifest

    engine = Path(engine)
    outs = output_paths(engine)
    parent = engine.parent if str(engine.parent) else Path(".")
    if engine.suffix != ".engine":
        raise AdafuseError(f"{engine}: the output name must end in .engine (found '{engine.suffix or 'no suffix'}')")
    if not parent.is_dir():
        state = "is not a directory" if parent.exists() else "does not exist"
        raise AdafuseError(f"{engine}: output directory {parent} {state}")
    t0 = time.time()

    def stage(n: int, text: str):
        log(f"[{n}/4 {time.time() - t0:6.1f}s] {text}")

    stage(1, f"reading {ckpt_path}")
    ckpt = load_checkpoint(ckpt_path, fmt, base)
    claim_engine_outputs(outs, ckpt.inputs, force, timing_cache)
    log(f"         {ckpt.format}: {ckpt.model.family}, {ckpt.model.num_layers} layers, routing {ckpt.adapter.routing}, "
        f"{ckpt.adapter.num_experts} experts, top-{ckpt.adapter.top_k}")
    try:
        chosen = select_backend(backend)
    except AdafuseError:
        if backend != "auto":
            raise
        chosen = None  # auto with no TensorRT: still export and validate the ONNX, then say what to install
    flavour = chosen.flavour if chosen else "portable"
    if chosen and chosen.name == "tensorrt":
        plugin_library = plugin_library or (Path(os.environ["ADAFUSE_PLUGIN_LIB"]) if os.environ.get("ADAFUSE_PLUGIN_LIB") else None)
        if plugin_library is None or not plugin_library.is_file():
            raise AdafuseError(f"--plugin-lib {plugin_library or '(not given)'}: full TensorRT needs the adafuse plugin library "
                               "(build it with cmake -S plugins -B build/plugins && cmake --build build/plugins)")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{engine.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise AdafuseError(f"{engine}: cannot write in {parent}: {e.strerror or e}") from None
    try:
        stage(2, f"exporting {flavour} ONNX ({dtype})")
        onnx_dir = staging / "onnx"
        onnx_manifest = export_onnx(ckpt, onnx_dir, flavour, dtype, strategy=strategy)
        if validate_onnx:  # the plugin flavour too: its adafuse nodes run as ONNX Runtime custom ops
            stage(3, f"validating the {flavour} ONNX export against the PyTorch reference (ONNX Runtime)")
            report = _validate(ckpt, onnx_dir)
            if report is not None and not report["passed"]:
                failed = [o["name"] for o in report["outputs"] if not o["passed"]]
                raise AdafuseError(f"{engine}: the ONNX export does not match the reference ({', '.join(failed)}); "
                                   "run adafuse-export validate for the full report")
        else:
            stage(3, "skipping ONNX Runtime validation")
        if chosen is None:
            _place(staging, outs, with_engine=False)
            raise AdafuseError(f"no TensorRT installed, so no engine was built; the validated ONNX export is in {outs['onnx']}. "
                               f"To build engines install {INSTALL['tensorrt-rtx']} or {INSTALL['tensorrt']}")
        stage(4, f"building the engine with {chosen.name} {chosen.version} (max batch {max_batch}, max seq {max_seq})")
        blob, io = build_engine(chosen, onnx_dir / "decoder.onnx", dtype=dtype, max_batch=max_batch, max_seq=max_seq,
                                plugin_library=plugin_library, timing_cache=timing_cache, log=lambda s: log(f"         {s}"))
        (staging / "engine").write_bytes(blob)
        manifest = make_manifest(engine_file=staging / "engine", engine_name=engine.name, onnx_dir=onnx_dir,
                                 onnx_dir_name=outs["onnx"].name, onnx_manifest=onnx_manifest, backend=chosen, io=io,
                                 dtype=dtype, max_batch=max_batch, max_seq=max_seq, checkpoint=ckpt)
        write_manifest(manifest, staging / "manifest.json")
        _place(staging, outs, with_engine=True)
        log(f"wrote {engine} ({len(blob) / 2**20:.1f} MiB), {outs['manifest'].name}, {outs['onnx'].name}/ "
            f"in {time.time() - t0:.1f}s")
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _validate(ckpt, onnx_dir: Path):
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    from .validate import validate

    return validate(ckpt, onnx_dir / "decoder.onnx", steps=4)


def _place(staging: Path, outs: dict[str, Path], with_engine: bool) -> None:
    """Rename staged outputs into place; the manifest goes last."""
    umask = _umask()
    onnx_dir = staging / "onnx"
    os.chmod(onnx_dir, 0o777 & ~umask)
    trash = staging / "replaced"
    trash.mkdir()
    moves = [(onnx_dir, outs["onnx"])]
    if with_engine:
        moves += [(staging / "engine", outs["engine"]), (staging / "manifest.json", outs["manifest"])]
    for src, dst in moves:
        if src.is_file():
            os.chmod(src, 0o666 & ~umask)
        if dst.exists() or dst.is_symlink():
            os.replace(dst, trash / dst.name)
        os.replace(src, dst)
