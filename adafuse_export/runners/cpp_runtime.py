"""The C++ runtime (runtime/, libadafuse_runtime.so) driven through its C API with ctypes.

`Engine` is the binding of one engine handle: a TensorRT engine or a native artifact (`convert --backend
native`, run by the native backend with the project's CUDA kernels; `open_native` opens one with a strategy),
prefill / decode / in-flight step as numpy calls. It is the one GPU decode path of `run --device cuda`,
`validate --runtime cpp` and benchmarks/h200_decode.py. `CppRuntimeRunner` puts an Engine behind the runner
interface, so `validate` compares the path a C++ service links with the PyTorch reference through the same
tolerances and report. It needs what the runtime needs: an NVIDIA GPU, and for TensorRT engines full TensorRT 10
(libnvinfer.so.10) and for plugin engines the plugin library ($ADAFUSE_PLUGIN_LIB). The manifest checks, the
routing table and the sampler need none of these and are exposed here too (`verify_manifest`, `RoutingTable`,
`Sampler`).

The library is found at $ADAFUSE_RUNTIME_LIB, else in the installed package (the wheel ships it), else by the
loader's usual search (after `cmake --install`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
from pathlib import Path

import numpy as np

from ..errors import AdafuseError
from ..trt.manifest import manifest_meta
from .base import ModelInfo, Runner, StepResult

LIBRARY_NAME = "libadafuse_runtime.so"

_i32, _i64, _f32 = ctypes.c_int32, ctypes.c_int64, ctypes.c_float
_p = ctypes.c_void_p


class _Sampling(ctypes.Structure):
    _fields_ = [("temperature", _f32), ("top_k", _i32), ("top_p", _f32), ("seed", ctypes.c_uint64)]


class _OpenOptions(ctypes.Structure):
    _fields_ = [("engine_path", ctypes.c_char_p), ("tensorrt_library", ctypes.c_char_p),
                ("plugin_library", ctypes.c_char_p), ("device", _i32), ("cuda_graphs", _i32),
                ("strategy", ctypes.c_char_p)]  # native artifacts: b"fused" (None) or b"switch"


class _StepRow(ctypes.Structure):
    """runtime.h's adafuse_step_row: one sequence's part of an in-flight step."""
    _fields_ = [("slot", _i32), ("start", _i32), ("count", _i32), ("all_logits", _i32)]


# name -> (restype, argtypes) of every C function used here
_SIGNATURES: dict[str, tuple[object, list]] = {
    "adafuse_last_error": (ctypes.c_char_p, []),
    "adafuse_version": (ctypes.c_char_p, []),
    "adafuse_plugin_version": (ctypes.c_char_p, []),
    "adafuse_manifest_open": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(_p)]),
    "adafuse_manifest_json": (ctypes.c_char_p, [_p]),
    "adafuse_manifest_free": (None, [_p]),
    "adafuse_routes_open": (ctypes.c_int, [ctypes.c_char_p, ctypes.POINTER(_p)]),
    "adafuse_routes_shape": (None, [_p, ctypes.POINTER(_i64), ctypes.POINTER(_i32)]),
    "adafuse_routes_lookup": (ctypes.c_int, [_p, _p, ctypes.c_size_t, _p, _p]),
    "adafuse_routes_free": (None, [_p]),
    "adafuse_sampler_create": (ctypes.c_int, [ctypes.POINTER(_Sampling), ctypes.POINTER(_p)]),
    "adafuse_sampler_next": (ctypes.c_int, [_p, _p, _i64, ctypes.POINTER(_i64)]),
    "adafuse_sampler_free": (None, [_p]),
    "adafuse_engine_open": (ctypes.c_int, [ctypes.POINTER(_OpenOptions), ctypes.POINTER(_p)]),
    "adafuse_engine_limits": (None, [_p, ctypes.POINTER(_i32), ctypes.POINTER(_i32), ctypes.POINTER(_i64)]),
    "adafuse_engine_free": (None, [_p]),
    "adafuse_prefill": (ctypes.c_int, [_p, _p, _i32, _i32, _p, _p, _p]),
    "adafuse_decode": (ctypes.c_int, [_p, _p, _i32, _p, _p, _p]),
    "adafuse_past_length": (_i32, [_p]),
    "adafuse_step": (ctypes.c_int, [_p, _p, ctypes.POINTER(_StepRow), _i32, _p, _p, _p]),
    "adafuse_step_limits": (None, [_p, ctypes.POINTER(_i32), ctypes.POINTER(_i32)]),
    "adafuse_slot_length": (_i32, [_p, _i32]),
    "adafuse_kv_shape": (None, [_p, ctypes.POINTER(_i32), ctypes.POINTER(_i32), ctypes.POINTER(_i32)]),
    "adafuse_read_kv": (ctypes.c_int, [_p, _i32, _i32, _p]),
    "adafuse_last_step_gpu_time": (ctypes.c_int, [_p, ctypes.POINTER(ctypes.c_double)]),
}

_loaded: dict[str, ctypes.CDLL] = {}


def load_library(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """The runtime library: `path`, else $ADAFUSE_RUNTIME_LIB, else the package's, else the loader's search."""
    from .. import installation

    name = str(path or os.environ.get("ADAFUSE_RUNTIME_LIB") or installation.runtime_library()
               or ctypes.util.find_library("adafuse_runtime") or LIBRARY_NAME)
    if name not in _loaded:
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            raise AdafuseError(f"{name}: cannot load the C++ runtime ({e}); this installation does not ship it "
                               "(`adafuse-export doctor` tells why): build it on the GPU machine with "
                               "runtime/tools/build_on_gpu.sh (runtime/README.md) and set ADAFUSE_RUNTIME_LIB to the "
                               "libadafuse_runtime.so it prints") from None
        missing = [fn for fn in _SIGNATURES if not hasattr(lib, fn)]
        if missing:  # e.g. $ADAFUSE_RUNTIME_LIB naming an unrelated library
            raise AdafuseError(f"{name}: not the adafuse C++ runtime (it has no '{missing[0]}' entry point); set "
                               "ADAFUSE_RUNTIME_LIB to runtime/'s libadafuse_runtime.so")
        for fn, (restype, argtypes) in _SIGNATURES.items():
            getattr(lib, fn).restype = restype
            getattr(lib, fn).argtypes = argtypes
        _loaded[name] = lib
    return _loaded[name]


def _check(lib: ctypes.CDLL, status: int) -> None:
    if status != 0:
        raise AdafuseError(lib.adafuse_last_error().decode("utf-8", "replace"))


def _ptr(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


def verify_manifest(engine: Path | str, check_files: bool = True, library: str | None = None) -> dict:
    """The engine's manifest after the C++ runtime's checks (those of trt.manifest.verify_engine)."""
    lib = load_library(library)
    handle = _p()
    _check(lib, lib.adafuse_manifest_open(str(engine).encode(), int(check_files), ctypes.byref(handle)))
    try:
        return json.loads(lib.adafuse_manifest_json(handle).decode("utf-8"))
    finally:
        lib.adafuse_manifest_free(handle)


class RoutingTable:
    """A routing table (`export-routes` output, or an engine's routes_file) looked up by the C++ runtime."""

    def __init__(self, path: Path | str, library: str | None = None):
        self.lib = lib = load_library(library)
        self.handle = _p()
        _check(lib, lib.adafuse_routes_open(str(path).encode(), ctypes.byref(self.handle)))
        vocab, k = _i64(), _i32()
        lib.adafuse_routes_shape(self.handle, ctypes.byref(vocab), ctypes.byref(k))
        self.vocab, self.top_k = vocab.value, k.value

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(expert ids int32, gates float32) of shape ids.shape + (k,)."""
        flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        experts = np.empty((flat.size, self.top_k), np.int32)
        gates = np.empty((flat.size, self.top_k), np.float32)
        _check(self.lib, self.lib.adafuse_routes_lookup(self.handle, _ptr(flat), flat.size, _ptr(experts), _ptr(gates)))
        shape = tuple(np.shape(ids)) + (self.top_k,)
        return experts.reshape(shape), gates.reshape(shape)

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.adafuse_routes_free(self.handle)


class Sampler:
    """The C++ runtime's token sampler (greedy when temperature is 0)."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 library: str | None = None):
        self.lib = lib = load_library(library)
        self.handle = _p()
        options = _Sampling(temperature, top_k, top_p, seed)
        _check(lib, lib.adafuse_sampler_create(ctypes.byref(options), ctypes.byref(self.handle)))

    def next(self, logits: np.ndarray) -> int:
        row = np.ascontiguousarray(logits, dtype=np.float32).reshape(-1)
        token = _i64()
        _check(self.lib, self.lib.adafuse_sampler_next(self.handle, _ptr(row), row.size, ctypes.byref(token)))
        return token.value

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.adafuse_sampler_free(self.handle)


NATIVE_STRATEGIES = ("fused", "switch")  # adafuse_open_options.strategy of a native artifact (native_backend.cpp)


def is_native_artifact(path: Path | str) -> bool:
    """A native artifact (`convert --backend native`): a directory whose manifest.json says format adafuse-native."""
    from ..native_artifact import artifact_files

    return Path(path).is_dir() and artifact_files(Path(path)) is not None


def native_manifest(artifact: Path | str) -> dict:
    """The artifact's manifest.json (read after adafuse_engine_open has checked it in full)."""
    from ..inputs import read_json
    from ..native_artifact import MANIFEST

    data = read_json(Path(artifact) / MANIFEST)
    if not isinstance(data, dict):
        raise AdafuseError(f"{Path(artifact) / MANIFEST}: expected a JSON object, found {type(data).__name__}")
    return data


def native_top_k(manifest: dict) -> int:
    """Routes the native backend reports per token: the pre-gate's top-k (a table or in-decoder), else 0."""
    r = manifest["routing"]
    return int(r["top_k"]) if r["kind"] == "pregate" else 0


class Engine:
    """One engine handle of the C API: a TensorRT engine (OUT.engine) or a native artifact (OUT.native/, the native
    backend), its limits, and its steps as numpy calls. top_k: routes per token it reports (0: none; the
    caller knows it from the manifest). Close it (or use it as a context manager) to free the device memory."""

    def __init__(self, path: Path | str, *, top_k: int, strategy: str | None = None, cuda_graphs: bool = True,
                 device: int = 0, library: str | None = None, tensorrt_library: str | None = None,
                 plugin_library: str | None = None):
        self.path, self.top_k = Path(path), top_k
        self.lib = lib = load_library(library)
        options = _OpenOptions(str(path).encode(), tensorrt_library.encode() if tensorrt_library else None,
                               plugin_library.encode() if plugin_library else None, device, int(cuda_graphs),
                               strategy.encode() if strategy else None)
        self.handle = _p()
        _check(lib, lib.adafuse_engine_open(ctypes.byref(options), ctypes.byref(self.handle)))
        batch, seq, vocab = _i32(), _i32(), _i64()
        lib.adafuse_engine_limits(self.handle, ctypes.byref(batch), ctypes.byref(seq), ctypes.byref(vocab))
        self.max_batch, self.max_seq, self.vocab = batch.value, seq.value, vocab.value
        layers, heads, dim = _i32(), _i32(), _i32()
        lib.adafuse_kv_shape(self.handle, ctypes.byref(layers), ctypes.byref(heads), ctypes.byref(dim))
        self.layers, self.kv_heads, self.head_dim = layers.value, heads.value, dim.value
        in_flight, step_tokens = _i32(), _i32()
        lib.adafuse_step_limits(self.handle, ctypes.byref(in_flight), ctypes.byref(step_tokens))
        self.in_flight, self.max_step_tokens = bool(in_flight.value), step_tokens.value

    def _routes(self, tokens: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not self.top_k:
            return None, None
        return np.empty((tokens, self.top_k), np.int32), np.empty((tokens, self.top_k), np.float32)

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Starts a batch from ids [B, S]: (logits [B, S, vocab] float32, expert ids and gates [B, S, top_k] or None)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2:
            raise AdafuseError(f"input ids must be [batch, seq], found shape {list(ids.shape)}")
        b, s = ids.shape
        logits = np.full((b, s, self.vocab), np.nan, np.float32)  # a value the runtime never wrote shows as NaN
        experts, gates = self._routes(b * s)
        _check(self.lib, self.lib.adafuse_prefill(self.handle, _ptr(ids), b, s, _ptr(logits), _ptr(experts), _ptr(gates)))
        shape = (b, s, self.top_k)
        return logits, None if experts is None else experts.reshape(shape), None if gates is None else gates.reshape(shape)

    def decode(self, ids: np.ndarray, logits: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """One token per sequence, ids [B]: (logits [B, vocab], expert ids and gates [B, top_k] or None).
        logits: a C-contiguous float32 [B, vocab] to fill instead of a new array (benchmarks: no allocation)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        b = ids.shape[0]
        if logits is None:
            logits = np.empty((b, self.vocab), np.float32)
        elif logits.dtype != np.float32 or logits.shape != (b, self.vocab) or not logits.flags.c_contiguous:
            raise ValueError(f"logits must be C-contiguous float32 [{b}, {self.vocab}]")
        experts, gates = self._routes(b)
        _check(self.lib, self.lib.adafuse_decode(self.handle, _ptr(ids), b, _ptr(logits), _ptr(experts), _ptr(gates)))
        return logits, experts, gates

    def step(self, rows: list[tuple[int, int, list[int]]], all_logits: bool = False) -> list[np.ndarray]:
        """An in-flight step (adafuse_step): rows of (slot, start, new tokens) -> each row's logits, [count, vocab]
        with all_logits, else [vocab] (its last position)."""
        table = (_StepRow * len(rows))(*[_StepRow(slot, start, len(toks), int(all_logits)) for slot, start, toks in rows])
        ids = np.array([t for _, _, toks in rows for t in toks], np.int64)
        counts = [len(toks) if all_logits else 1 for _, _, toks in rows]
        logits = np.empty((sum(counts), self.vocab), np.float32)
        _check(self.lib, self.lib.adafuse_step(self.handle, _ptr(ids), table, len(rows), _ptr(logits), None, None))
        out, row = [], 0
        for n in counts:
            out.append(logits[row:row + n] if all_logits else logits[row])
            row += n
        return out

    def generate(self, prompt: list[int], max_new_tokens: int) -> tuple[list[int], np.ndarray, np.ndarray | None]:
        """Greedy decoding of one prompt: (tokens, the prompt's logits [1, S, vocab], its expert ids [1, S, top_k] or None)."""
        logits, experts, _ = self.prefill(np.asarray([prompt]))
        tokens: list[int] = []
        last = logits[0, -1]
        while len(tokens) < max_new_tokens:
            tokens.append(int(last.argmax()))
            if len(tokens) < max_new_tokens:
                last = self.decode(np.asarray(tokens[-1:]))[0][0]
        return tokens, logits, experts

    def last_step_gpu_ms(self) -> float:
        """GPU time of the last prefill, decode or step (adafuse_last_step_gpu_time: CUDA events around its work)."""
        ms = ctypes.c_double()
        _check(self.lib, self.lib.adafuse_last_step_gpu_time(self.handle, ctypes.byref(ms)))
        return ms.value

    @property
    def past_length(self) -> int:
        return int(self.lib.adafuse_past_length(self.handle))

    def slot_length(self, slot: int) -> int:
        return int(self.lib.adafuse_slot_length(self.handle, slot))

    def read_kv(self, layer: int, value: bool, batch: int) -> np.ndarray:
        """One layer's cached keys (value False) or values as float32 [batch, kv_heads, past_length, head_dim]."""
        kv = np.empty((batch, self.kv_heads, self.past_length, self.head_dim), np.float32)
        _check(self.lib, self.lib.adafuse_read_kv(self.handle, layer, int(value), _ptr(kv)))
        return kv

    def close(self) -> None:
        if getattr(self, "handle", None):
            self.lib.adafuse_engine_free(self.handle)
            self.handle = _p()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def open_native(artifact: Path | str, strategy: str = "fused", cuda_graphs: bool = True, device: int = 0,
                library: str | None = None) -> Engine:
    """A native artifact opened by the native backend with `strategy` (NATIVE_STRATEGIES)."""
    if strategy not in NATIVE_STRATEGIES:
        raise AdafuseError(f"strategy '{strategy}' is not one of the native backend's ({', '.join(NATIVE_STRATEGIES)})")
    engine = Engine(artifact, top_k=0, strategy=strategy, cuda_graphs=cuda_graphs, device=device, library=library)
    engine.top_k = native_top_k(native_manifest(artifact))  # the manifest is read once the runtime has checked it
    return engine


def native_meta(manifest: dict) -> dict[str, str]:
    """The native manifest's routing contract as the "adafuse.*" metadata validate.check_compatible compares."""
    from ..native_artifact import FORMAT, VERSION
    from ..summary import routing_metadata

    r = manifest["routing"]
    return {"adafuse.format": f"{FORMAT}/{VERSION}", "adafuse.dtype": manifest["model"]["dtype"],
            "adafuse.weights": manifest["model"].get("weights", "dtype"),
            **routing_metadata({**r, "routing": r["kind"]}), "adafuse.checkpoint_sha256": manifest["source"]["index_sha256"]}


class CppRuntimeRunner(Runner):
    """An engine (TensorRT 10 + GPU) or a native artifact (the native backend, GPU) run by the C++ runtime through
    its C API."""

    name = "cpp-runtime"

    def __init__(self, engine: Path | str, library: str | None = None, tensorrt_library: str | None = None,
                 plugin_library: str | None = None, strategy: str = "fused"):
        engine = Path(engine)
        if is_native_artifact(engine):
            self.engine = open_native(engine, strategy, library=library)
            manifest = native_manifest(engine)
            dtype, meta = manifest["model"]["dtype"], native_meta(manifest)
            routes_file = manifest["routing"]["routes_file"]
            what = f"native backend, {strategy}"
        else:
            manifest = verify_manifest(engine, library=library)
            inputs = {t["name"] for t in manifest["tensors"]["inputs"]}
            outputs = {t["name"] for t in manifest["tensors"]["outputs"]}
            # Routes are fed from the table (inputs) or chosen by a pre-gate inside the decoder (outputs).
            top_k = int(manifest["routing"]["top_k"]) if "expert_ids" in inputs | outputs else 0
            self.engine = Engine(engine, top_k=top_k, library=library, tensorrt_library=tensorrt_library,
                                 plugin_library=plugin_library)
            dtype, meta = manifest["engine"]["dtype"], manifest_meta(manifest)
            routes_file = manifest["routing"]["routes_file"] if "expert_ids" in inputs else None
            what = "TensorRT"
        e = self.engine
        self.lib = e.lib
        self.max_batch, self.max_seq = e.max_batch, e.max_seq
        self.info = ModelInfo(model=engine, num_layers=e.layers, vocab_size=e.vocab, kv_heads=e.kv_heads,
                              head_dim=e.head_dim, needs_routes=routes_file is not None, dtype=dtype, meta=meta,
                              description=f"adafuse C++ runtime {self.lib.adafuse_version().decode()} ({what}), {dtype}")
        self._batch = 0
        base = engine if engine.is_dir() else engine.parent
        self.table = RoutingTable(base / routes_file, library) if routes_file is not None else None

    @property
    def past_length(self) -> int:
        return self.engine.past_length

    def routes(self, input_ids):
        return None if self.table is None else self.table.lookup(np.asarray(input_ids))

    def _present(self) -> dict[str, np.ndarray]:
        return {f"present.{layer}.{kind}": self.engine.read_kv(layer, value, self._batch)
                for layer in range(self.info.num_layers) for value, kind in ((False, "key"), (True, "value"))}

    def prefill(self, input_ids):
        logits, experts, gates = self.engine.prefill(input_ids)
        self._batch = logits.shape[0]
        return StepResult(logits, self._present(), experts, gates)

    def decode(self, input_ids):
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] != 1:
            raise AdafuseError(f"input ids must be [batch, 1], found shape {list(ids.shape)}")
        logits, experts, gates = self.engine.decode(ids.reshape(-1))
        return StepResult(logits[:, None], self._present(), None if experts is None else experts[:, None],
                          None if gates is None else gates[:, None])

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.close()
