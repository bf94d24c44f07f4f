"""Build a serialized engine from an exported ONNX decoder.

Two optimisation profiles: 0 = prefill (1..max_seq new tokens per row), 1 = decode (one new token per row).
Rows carry their own lengths (onnx/contract.py: past_lengths, seq_lens), so both profiles take any past
lengths; the KV cache axis is 1..max_seq, tuned for max_seq (the runtime binds its whole cache, one row per
slot), or max_seq itself where the graph fixes it (an in-place cache: onnx.builder KV_UPDATES). A service selects
the profile per step; the manifest lists them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import AdafuseError
from ..inputs import read_bytes
from ..onnx import contract
from ..outputs import write_bytes
from .backends import Backend

MAX_TIMING_CACHE_BYTES = 1 << 30

PREFILL, DECODE = 0, 1


def profile_shapes(name: str, shape: tuple[int, ...], max_batch: int, max_seq: int) -> dict[str, list[list[int]]]:
    """min/opt/max of one input for both profiles. Dynamic axes: batch (0), seq or the cache's length (2 for KV)."""
    def dims(batch: int, seq: int, cache: int) -> list[int]:
        out = []
        for axis, d in enumerate(shape):
            if d != -1:
                out.append(d)
            elif axis == 0:
                out.append(batch)
            elif name.startswith(contract.PAST_PREFIX):
                out.append(cache)
            else:
                out.append(seq)
        return out
    return {
        "prefill": [dims(1, 1, 1), dims(max_batch, max(1, max_seq // 2), max_seq), dims(max_batch, max_seq, max_seq)],
        "decode": [dims(1, 1, 1), dims(max_batch, 1, max_seq), dims(max_batch, 1, max_seq)],
    }


def builder_config(backend: Backend, builder: Any, dtype: str, version_compatible: bool = False,
                   weights: str = "dtype") -> Any:
    """The builder config; a float32 engine computes in float32 (TensorRT's default TF32 matmuls
    differ from float32 by about 1e-3, beyond validate's float32 tolerance). version_compatible: an engine for
    TensorRT's lean runtime (VERSION_COMPATIBLE: lean-runtime operators only), whose plan leaves the lean runtime
    out (EXCLUDE_LEAN_RUNTIME: about 100 MB less per engine, and no host code in the plan); the adafuse runtime
    loads libnvinfer_lean itself. FP8 weights: a weakly typed network needs the FP8 flag for its float8 tensors
    (a strongly typed one takes the graph's types)."""
    config = builder.create_builder_config()
    if dtype == "float32":
        config.clear_flag(backend.trt.BuilderFlag.TF32)
    if version_compatible:
        if not backend.kind.version_compatible:
            raise AdafuseError(version_compatible_refusal(backend.kind))
        config.set_flag(backend.trt.BuilderFlag.VERSION_COMPATIBLE)
        config.set_flag(backend.trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    if weights == "fp8" and not backend.kind.strongly_typed and hasattr(backend.trt.BuilderFlag, "FP8"):
        config.set_flag(backend.trt.BuilderFlag.FP8)
    return config


def version_compatible_refusal(kind) -> str:
    """Why --version-compatible is refused for a backend kind (trt.backends.BackendKind) that cannot build it."""
    return (f"--version-compatible: {kind.title} engines are not version compatible (only --backend tensorrt builds "
            "engines for TensorRT's lean runtime)")


def attach_timing_cache(backend: Backend, config: Any, path: Path | None, log: Callable[[str], None]) -> Any:
    """The timing cache read from `path` and attached to `config` (None without one). A cache that
    TensorRT refuses (another TensorRT version or GPU) is an error, never silently replaced."""
    if path is None:
        return None
    if not backend.kind.timing_cache:
        log(f"--timing-cache {path}: not used ({backend.kind.title} has no timing cache); the file is left unchanged")
        return None
    try:
        data = read_bytes(path, "TensorRT timing cache", MAX_TIMING_CACHE_BYTES) if path.exists() else b""
    except AdafuseError as e:
        raise AdafuseError(f"--timing-cache {e}") from None
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise AdafuseError(f"--timing-cache {path}: {backend.name} {backend.version} refused this timing cache "
                           "(written by another TensorRT version or GPU); delete it or name a new file")
    return cache


def _collecting_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps every message (info and up) instead of printing it: the parser's and
    builder's warnings are about TensorRT's choices (e.g. "Make sure input input_ids has Int64 binding"),
    nothing a user can act on, so they go to a log file and only errors are shown."""
    class Collector(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.messages.append((severity, msg))

    return Collector()


def _write_log(trt: Any, logger: Any, log_file: Path | None, shown_as: Path | None,
               log: Callable[[str], None]) -> None:
    errors = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR)
    for severity, msg in logger.messages:
        if severity in errors:
            log(f"{'' if msg.startswith('[') else '[TensorRT] '}{msg}")
    if log_file is not None:
        log_file.write_text("".join(f"[{str(sev).split('.')[-1]}] {msg}\n" for sev, msg in logger.messages))
        warnings = sum(1 for sev, _ in logger.messages if sev == trt.ILogger.Severity.WARNING)
        log(f"builder log: {len(logger.messages)} messages ({warnings} warnings) in {shown_as or log_file}")


def build_engine(backend: Backend, onnx_path: Path, *, dtype: str, max_batch: int, max_seq: int, weights: str = "dtype",
                 plugin_library: Path | None = None, timing_cache: Path | None = None,
                 log: Callable[[str], None] = print, log_file: Path | None = None,
                 log_shown_as: Path | None = None, version_compatible: bool = False) -> tuple[bytes, dict]:
    """(serialized engine, engine description for the manifest). TensorRT's own messages go to `log_file`
    (named `log_shown_as` to the user: its final place); its errors are shown through `log`."""
    trt = backend.trt
    if max_batch < 1 or max_seq < 2:
        raise AdafuseError(f"--max-batch must be >= 1 and --max-seq >= 2, found {max_batch} and {max_seq}")
    logger = _collecting_logger(trt)
    try:
        return _build(backend, logger, onnx_path, dtype=dtype, weights=weights, max_batch=max_batch, max_seq=max_seq,
                      plugin_library=plugin_library, timing_cache=timing_cache, log=log,
                      version_compatible=version_compatible)
    finally:
        _write_log(trt, logger, log_file, log_shown_as, log)


def _build(backend: Backend, logger: Any, onnx_path: Path, *, dtype: str, weights: str, max_batch: int, max_seq: int,
           plugin_library: Path | None, timing_cache: Path | None, log: Callable[[str], None],
           version_compatible: bool = False) -> tuple[bytes, dict]:
    trt = backend.trt
    builder = trt.Builder(logger)
    if plugin_library is not None:
        registry = builder.get_plugin_registry() if hasattr(builder, "get_plugin_registry") else trt.get_plugin_registry()
        if registry.load_library(str(plugin_library)) is None:
            raise AdafuseError(f"{plugin_library}: TensorRT could not load the plugin library")
    flags = 0
    if backend.kind.strongly_typed:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise AdafuseError(f"{onnx_path}: {backend.name} could not parse the ONNX graph: {errors}")
    config = builder_config(backend, builder, dtype, version_compatible, weights)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    profiles: dict[str, dict[str, list[list[int]]]] = {"prefill": {}, "decode": {}}
    built = [builder.create_optimization_profile(), builder.create_optimization_profile()]
    for t in inputs:
        shapes = profile_shapes(t.name, tuple(t.shape), max_batch, max_seq)
        for index, kind in ((PREFILL, "prefill"), (DECODE, "decode")):
            built[index].set_shape(t.name, *shapes[kind])
            profiles[kind][t.name] = shapes[kind]
    for p in built:
        config.add_optimization_profile(p)
    cache = attach_timing_cache(backend, config, timing_cache, log)
    log(f"building {backend.name} {backend.version} {'version-compatible ' if version_compatible else ''}engine "
        f"({len(inputs)} inputs, 2 profiles) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise AdafuseError(f"{onnx_path}: {backend.name} failed to build an engine (its errors are above, its whole "
                           "log in the builder log)")
    if cache is not None and timing_cache is not None:
        write_bytes(timing_cache, bytes(cache.serialize()))  # atomic: a failed write keeps the old cache
    io = {
        "inputs": [{"name": t.name, "dtype": str(t.dtype).split(".")[-1].lower(), "shape": list(t.shape)} for t in inputs],
        "outputs": [{"name": network.get_output(i).name, "dtype": str(network.get_output(i).dtype).split(".")[-1].lower(),
                     "shape": list(network.get_output(i).shape)} for i in range(network.num_outputs)],
        "profiles": [{"index": PREFILL, "name": "prefill", "shapes": profiles["prefill"]},
                     {"index": DECODE, "name": "decode", "shapes": profiles["decode"]}],
    }
    return bytes(serialized), io
