"""TensorRT runner over a `convert` output (engine + manifest + ONNX directory).

Checks the manifest first (engine hash, plugin version), then needs a runtime and a GPU the
engine was built for: full TensorRT (+ the plugin library, shipped or $ADAFUSE_PLUGIN_LIB, for plugin engines) or
TensorRT-RTX (compute capability 8.0, 8.6, 8.9, 12.x). Device buffers are torch CUDA tensors.
Profile 0 runs prefill (empty past), profile 1 decode steps (see adafuse_export.trt.build). An engine whose
manifest says engine.kv_in_place gets each present.{l} bound to the memory of past_key_values.{l} (one cache).

Everything about the engine's tensors (names, dtypes, KV layout, the shapes of outputs) is read
from the deserialized engine itself, not assumed: a pre-gate-in-decoder engine outputs int32
expert_ids and float32 gates beside float32 logits and KV caches in the model dtype.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import AdafuseError
from ..inputs import confine
from ..onnx import contract
from ..trt.backends import BackendKind, builders_for
from ..trt.build import DECODE, PREFILL
from ..trt.manifest import manifest_meta, manifest_path, verify_engine
from .base import ModelInfo, Runner, StepResult, read_routes

# TensorRT DataType member -> torch dtype name (the dtypes an adafuse engine's tensors can have)
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def torch_dtype(trt: Any, data_type: Any):
    """The torch dtype of a TensorRT DataType; an AdafuseError for one no adafuse engine uses (FP8, FP4, ...)."""
    import torch

    for member, name in TORCH_DTYPES.items():
        if data_type == getattr(trt.DataType, member):
            return getattr(torch, name)
    raise AdafuseError(f"engine tensor dtype {data_type} has no torch equivalent here "
                       f"(expected one of {', '.join(TORCH_DTYPES)})")


@dataclass
class Placement:
    """Where the runner's buffers live and which stream runs the engine. On a GPU: the current CUDA
    device, a stream of the runner's own and torch's current stream (where inputs are made)."""

    device: Any  # torch.device
    stream: Any  # torch.cuda.Stream: .cuda_stream, .wait_stream(other), .synchronize()
    current_stream: Callable[[], Any]


def open_cuda(engine: Path, backend: BackendKind) -> Placement:
    """The GPU an engine needs, or an AdafuseError saying why there is none here."""
    import torch

    if not torch.cuda.is_available():
        raise AdafuseError(f"{engine}: running a TensorRT engine needs an NVIDIA GPU, and none is visible here "
                           f"(validate the ONNX export in {engine.with_suffix('.onnx')} instead)")
    cc = torch.cuda.get_device_capability()
    if not backend.runs_on_capability(*cc):
        raise AdafuseError(f"{engine}: {backend.title} engines run on {backend.gpus}; this GPU is {cc[0]}.{cc[1]} "
                           f"(build with --backend {' or '.join(builders_for(*cc))} for it)")
    device = torch.device("cuda", torch.cuda.current_device())
    return Placement(device, torch.cuda.Stream(device), torch.cuda.current_stream)


def load_plugin_library(trt: Any, engine: Path, plugin: dict) -> None:
    """Register the plugin library an engine names ($ADAFUSE_PLUGIN_LIB, else the package's) before deserializing it."""
    from .. import installation

    found = installation.plugin_library()
    lib = str(found) if found else None
    if not lib or not Path(lib).is_file():
        raise AdafuseError(f"{engine}: this engine uses the {plugin['library']} plugin library "
                           f"({plugin['name']}), which this installation does not ship; set ADAFUSE_PLUGIN_LIB to its path")
    if trt.get_plugin_registry().load_library(lib) is None:
        named = f"ADAFUSE_PLUGIN_LIB={lib}" if os.environ.get("ADAFUSE_PLUGIN_LIB") else lib
        raise AdafuseError(f"{named}: TensorRT could not load this plugin library "
                           "(not a TensorRT plugin library, built for another TensorRT, or already loaded; "
                           "see the TensorRT log above)")


LEAN_FOLDERS = ("tensorrt_lean_libs", "tensorrt_libs")  # pip's lean wheel, then the full wheel (it ships one too)


def lean_runtime_library(engine: Path, version: str) -> Path:
    """TensorRT's lean runtime library for a version-compatible engine built by TensorRT `version`: pip's
    tensorrt_lean_libs or tensorrt_libs (the C++ runtime's search, for this interpreter's packages)."""
    from importlib import util

    name = f"libnvinfer_lean.so.{version.split('.')[0]}"
    for folder in LEAN_FOLDERS:
        spec = util.find_spec(folder)
        if spec is not None and spec.origin is not None and (Path(spec.origin).parent / name).is_file():
            return Path(spec.origin).parent / name
    raise AdafuseError(f"{engine}: a version-compatible engine runs on TensorRT's lean runtime ({name}), found in none of "
                       f"this Python's {' or '.join(LEAN_FOLDERS)} (pip install tensorrt-lean-cu12-libs=={version} or "
                       f"tensorrt-lean-cu13-libs=={version})")


def engine_runtime(trt: Any, logger: Any, engine: Path, built: dict) -> list[Any]:
    """The runtimes that deserialize `engine`, the one to deserialize with last (each must outlive the engine). A
    version-compatible plan leaves the lean runtime out (EXCLUDE_LEAN_RUNTIME): TensorRT runs it on the lean
    runtime of the same version, loaded through IRuntime::loadRuntime."""
    runtime = trt.Runtime(logger)
    if not built.get("version_compatible"):
        return [runtime]
    library = lean_runtime_library(engine, built["backend_version"])
    lean = runtime.load_runtime(str(library))
    if lean is None:
        raise AdafuseError(f"{engine}: TensorRT could not load its lean runtime {library} (see the TensorRT log above)")
    return [runtime, lean]


class EngineSession:
    """One execution context of a deserialized engine: sets the profile, input shapes and addresses,
    allocates every output from the engine's own dtype and the context's resolved shape, and runs
    on `placement.stream` after the inputs' stream. Each TensorRT call's result is checked."""

    def __init__(self, trt: Any, engine: Any, placement: Placement, where: Path):
        self.trt, self.engine, self.placement, self.where = trt, engine, placement, where
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        self.shapes = {n: tuple(engine.get_tensor_shape(n)) for n in names}  # -1 marks a dynamic axis
        self.context = engine.create_execution_context()
        if self.context is None:
            raise AdafuseError(f"{where}: TensorRT could not create an execution context (out of GPU memory?)")
        self._placeholder: Any = None  # the address of empty tensors (the prefill's zero-length past)

    def _address(self, t: Any) -> int:
        """An empty tensor has no memory (data_ptr 0), but TensorRT wants an allocated address even for
        an empty binding (developer guide, "Empty Tensors")."""
        if t.numel():
            return t.data_ptr()
        if self._placeholder is None:
            import torch

            self._placeholder = torch.empty(256, dtype=torch.uint8, device=self.placement.device)
        return self._placeholder.data_ptr()

    def _check(self, ok: bool, call: str) -> None:
        if not ok:
            raise AdafuseError(f"{self.where}: TensorRT refused {call} (see the TensorRT log above)")

    def run(self, feed: dict[str, Any], profile: int, aliases: dict[str, str] | None = None) -> dict[str, Any]:
        """aliases: output -> the input whose memory it is bound to (an in-place KV cache: the engine writes present.{l}
        where it reads past_key_values.{l}); the output returned is that input's tensor."""
        import torch

        ctx, stream = self.context, self.placement.stream
        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise AdafuseError(f"{self.where}: engine input '{missing[0]}' is not fed (fed: {', '.join(feed)})")
        self._check(ctx.set_optimization_profile_async(profile, stream.cuda_stream),
                    f"optimization profile {profile}")
        for name in self.inputs:
            t = feed[name]
            if t.dtype != self.dtypes[name]:
                raise AdafuseError(f"{self.where}: engine input '{name}' is {self.dtypes[name]}, "
                                   f"the runner made {t.dtype}")
            self._check(ctx.set_input_shape(name, tuple(t.shape)),
                        f"input '{name}' of shape {list(t.shape)} (outside profile {profile}'s range?)")
            self._check(ctx.set_tensor_address(name, self._address(t)), f"the address of input '{name}'")
        outputs = {}
        aliases = aliases or {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise AdafuseError(f"{self.where}: output '{name}' has unresolved shape {list(shape)} "
                                   "after all input shapes were set")
            if name in aliases:
                same = feed[aliases[name]]
                if tuple(same.shape) != shape or same.dtype != self.dtypes[name]:
                    raise AdafuseError(f"{self.where}: output '{name}' is {self.dtypes[name]} {list(shape)}, so it cannot "
                                       f"share the memory of input '{aliases[name]}' ({same.dtype} {list(same.shape)})")
                outputs[name] = same
            else:
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.placement.device)
            self._check(ctx.set_tensor_address(name, self._address(outputs[name])), f"the address of output '{name}'")
        stream.wait_stream(self.placement.current_stream())  # the inputs were written on torch's stream
        self._check(ctx.execute_async_v3(stream.cuda_stream), "execute_async_v3")
        stream.synchronize()
        return outputs


def engine_model_info(engine: Path, manifest: dict, session: EngineSession, description: str) -> ModelInfo:
    """The runner contract from the engine's own tensors and the manifest's routing metadata."""
    past = [n for n in session.inputs if n.startswith("past_key_values.") and n.endswith(".key")]
    if "past_key_values.0.key" not in session.shapes or "logits" not in session.outputs:
        raise AdafuseError(f"{engine}: not an adafuse decoder engine (inputs {', '.join(session.inputs)}; "
                           f"outputs {', '.join(session.outputs)})")
    k0, logits = session.shapes["past_key_values.0.key"], session.shapes["logits"]
    return ModelInfo(model=engine, num_layers=len(past), vocab_size=logits[-1] if logits[-1] > 0 else None,
                     kv_heads=k0[1], head_dim=k0[3], needs_routes="expert_ids" in session.inputs,
                     # the engine's own KV tensor type, never the manifest's claim: the dtype picks validate's tolerance
                     dtype=str(session.dtypes["past_key_values.0.key"]).removeprefix("torch."),
                     meta=manifest_meta(manifest), description=description)


def check_in_place_cache(engine: Path, session: EngineSession, max_seq: int) -> None:
    """An engine whose manifest says kv_in_place: every present.{l} of its past's dtype and shape, the cache axis fixed
    at max_seq (TensorRT's in-place layer needs a static one); else refused in one line naming the tensor."""
    for past in (n for n in session.inputs if n.startswith(contract.PAST_PREFIX)):
        present = contract.PRESENT_PREFIX + past[len(contract.PAST_PREFIX):]
        shape, dtype = session.shapes[past], session.dtypes[past]
        if len(shape) != 4 or shape[2] != max_seq:
            raise AdafuseError(f"{engine}: input '{past}' has shape {list(shape)}: an in-place cache (engine.kv_in_place) "
                               f"needs a static cache axis of max_seq {max_seq} positions; convert the model again")
        if present not in session.outputs or session.shapes[present] != shape or session.dtypes[present] != dtype:
            found = (f"{session.dtypes[present]} {list(session.shapes[present])}" if present in session.outputs
                     else "missing")
            raise AdafuseError(f"{engine}: output '{present}' is {found}, input '{past}' is {dtype} {list(shape)}: an "
                               "in-place cache (engine.kv_in_place) needs them equal; convert the model again")


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, engine: Path | str):
        import torch

        from ..trt.backends import select_backend

        engine = Path(engine)
        self.manifest = manifest = verify_engine(engine)
        built = manifest["engine"]
        backend = select_backend(built["backend"])
        self.placement = placement = open_cuda(engine, backend.kind)
        trt = backend.trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        if manifest.get("plugin"):
            load_plugin_library(trt, engine, manifest["plugin"])
        self.runtimes = engine_runtime(trt, self.logger, engine, built)  # must outlive the engine
        cuda_engine = self.runtimes[-1].deserialize_cuda_engine(engine.read_bytes())
        if cuda_engine is None:
            raise AdafuseError(f"{engine}: {backend.name} {backend.version} could not deserialize the engine "
                               f"(built with {built['backend']} {built['backend_version']})")
        self.session = EngineSession(trt, cuda_engine, placement, engine)
        device_name = torch.cuda.get_device_name(placement.device) if placement.device.type == "cuda" else "cpu"
        self.info = engine_model_info(engine, manifest, self.session,
                                      f"{backend.name} {backend.version} on {device_name}, {built['dtype']}")
        self.torch = torch
        self.table = None
        if self.info.needs_routes:
            self.table = self._load_routes(engine, manifest)
        self.max_seq = int(built["max_seq"])  # the profiles' bound on past + new tokens
        # engine.kv_in_place: present.{l} bound to the memory of past_key_values.{l} (one cache, updated in place)
        self.kv_in_place = bool(built.get("kv_in_place"))
        if self.kv_in_place:
            check_in_place_cache(engine, self.session, self.max_seq)
        self.past: dict[str, Any] = {}
        self.length = 0

    def _load_routes(self, engine: Path, manifest: dict):
        routes = manifest["routing"].get("routes_file")
        if not routes:
            raise AdafuseError(f"{engine}: the engine takes expert ids but its manifest names no routing table")
        path = confine(engine.parent, routes, manifest_path(engine))
        # the ids this runner gathers and feeds to the adapter plugins: in range, or the kernels read out of bounds
        ids, gates = read_routes(path, manifest["routing"]["num_experts"], self.info.vocab_size)
        device = self.placement.device
        return self.torch.as_tensor(ids).to(device), self.torch.as_tensor(gates).float().to(device)

    @property
    def past_length(self) -> int:
        return self.length

    def _ids(self, input_ids: np.ndarray):
        ids = self.torch.as_tensor(np.asarray(input_ids, dtype=np.int64), device=self.placement.device)
        vocab = self.info.vocab_size
        if ids.ndim != 2:
            raise AdafuseError(f"input ids must be [batch, seq], found shape {list(ids.shape)}")
        if vocab is not None and bool(((ids < 0) | (ids >= vocab)).any()):
            raise AdafuseError(f"a token id is out of the vocabulary [0, {vocab}) of {self.info.model}")
        return ids

    def routes(self, input_ids):
        if self.table is None:
            return None
        ids = self._ids(input_ids)
        return self.table[0][ids].cpu().numpy(), self.table[1][ids].cpu().numpy()

    def _run(self, input_ids: np.ndarray, profile: int) -> StepResult:
        torch, session = self.torch, self.session
        ids = self._ids(input_ids)
        b, s = ids.shape
        if self.length + s > self.max_seq:
            raise AdafuseError(f"{self.info.model}: {self.length} cached + {s} new tokens exceed the engine's max seq "
                               f"{self.max_seq} (its profiles; rebuild with convert --max-seq)")
        device = self.placement.device
        # the engine's contract (onnx/contract.py): one length per row, here the same for all; the cache is bound
        # whole ([b, kv, max_seq, d], zeros where nothing is written yet), as the C++ runtime binds it (an in-place
        # engine's present to the same tensor)
        feed = {contract.INPUT_IDS: ids, contract.PAST_LENGTHS: torch.full((b,), self.length, dtype=torch.int64, device=device),
                contract.SEQ_LENS: torch.full((b,), s, dtype=torch.int64, device=device)}
        if self.table is not None:
            feed[contract.EXPERT_IDS] = self.table[0][ids].contiguous()
            feed[contract.GATES] = self.table[1][ids].contiguous()
        for name in session.inputs:
            if name.startswith(contract.PAST_PREFIX):
                present = contract.PRESENT_PREFIX + name[len(contract.PAST_PREFIX):]
                _, kv, _, d = session.shapes[name]
                feed[name] = self.past.get(present, torch.zeros(b, kv, self.max_seq, d, device=device, dtype=session.dtypes[name]))
        aliases = {contract.PRESENT_PREFIX + n[len(contract.PAST_PREFIX):]: n
                   for n in session.inputs if n.startswith(contract.PAST_PREFIX)} if self.kv_in_place else None
        outputs = session.run(feed, profile, aliases)
        self.past = {n: t for n, t in outputs.items() if n.startswith(contract.PRESENT_PREFIX)}
        self.length += s
        result = StepResult(outputs[contract.LOGITS].float().cpu().numpy(),
                            {n: t[:, :, :self.length].float().cpu().numpy() for n, t in self.past.items()})
        routed = outputs if "expert_ids" in outputs else feed if self.table is not None else None
        if routed is not None:
            result.expert_ids = routed["expert_ids"].to(torch.int32).cpu().numpy()
            result.gates = routed["gates"].float().cpu().numpy()
        return result

    def prefill(self, input_ids):
        self.past, self.length = {}, 0
        return self._run(input_ids, PREFILL)

    def decode(self, input_ids):
        if not self.past:
            raise AdafuseError("decode() called before prefill()")
        return self._run(input_ids, DECODE)
