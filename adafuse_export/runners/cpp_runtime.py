"""The C++ runtime (runtime/, libadafuse_runtime.so) driven through its C API with ctypes.

`CppRuntimeRunner` runs an engine with the same code a C++ service links, so `validate` compares
that path with the PyTorch reference through the same tolerances and report. It needs what the
runtime needs: full TensorRT 10 (libnvinfer.so.10), an NVIDIA GPU, and for plugin engines the
plugin library ($ADAFUSE_PLUGIN_LIB). The manifest checks, the routing table and the sampler need
none of these and are exposed here too (`verify_manifest`, `RoutingTable`, `Sampler`).

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
                               "(`adafuse-export doctor` tells why): build it as runtime/README.md says and set "
                               "ADAFUSE_RUNTIME_LIB to its libadafuse_runtime.so") from None
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


class CppRuntimeRunner(Runner):
    """An engine run by the C++ runtime (TensorRT 10 + GPU) through its C API."""

    name = "cpp-runtime"

    def __init__(self, engine: Path | str, library: str | None = None, tensorrt_library: str | None = None,
                 plugin_library: str | None = None):
        engine = Path(engine)
        self.lib = lib = load_library(library)
        manifest = verify_manifest(engine, library=library)
        options = _OpenOptions(str(engine).encode(), tensorrt_library.encode() if tensorrt_library else None,
                               plugin_library.encode() if plugin_library else None, 0, 1)
        self.handle = _p()
        _check(lib, lib.adafuse_engine_open(ctypes.byref(options), ctypes.byref(self.handle)))
        batch, seq, vocab = _i32(), _i32(), _i64()
        lib.adafuse_engine_limits(self.handle, ctypes.byref(batch), ctypes.byref(seq), ctypes.byref(vocab))
        layers, heads, dim = _i32(), _i32(), _i32()
        lib.adafuse_kv_shape(self.handle, ctypes.byref(layers), ctypes.byref(heads), ctypes.byref(dim))
        inputs = {t["name"] for t in manifest["tensors"]["inputs"]}
        outputs = {t["name"] for t in manifest["tensors"]["outputs"]}
        # Routes are fed from the table (inputs) or chosen by a pre-gate inside the decoder (outputs).
        self.top_k = int(manifest["routing"]["top_k"]) if "expert_ids" in inputs | outputs else 0
        self.max_batch, self.max_seq = batch.value, seq.value
        dtype = manifest["engine"]["dtype"]
        self.info = ModelInfo(model=engine, num_layers=layers.value, vocab_size=vocab.value, kv_heads=heads.value,
                              head_dim=dim.value, needs_routes="expert_ids" in inputs, dtype=dtype,
                              meta=manifest_meta(manifest),
                              description=f"adafuse C++ runtime {lib.adafuse_version().decode()} (TensorRT), {dtype}")
        self._batch = 0
        self.table = (RoutingTable(engine.parent / manifest["routing"]["routes_file"], library)
                      if self.info.needs_routes else None)

    @property
    def past_length(self) -> int:
        return int(self.lib.adafuse_past_length(self.handle))

    def routes(self, input_ids):
        return None if self.table is None else self.table.lookup(np.asarray(input_ids))

    def _present(self) -> dict[str, np.ndarray]:
        b, t = self._batch, self.past_length
        out = {}
        for layer in range(self.info.num_layers):
            for value, kind in ((0, "key"), (1, "value")):
                kv = np.empty((b, self.info.kv_heads, t, self.info.head_dim), np.float32)
                _check(self.lib, self.lib.adafuse_read_kv(self.handle, layer, value, _ptr(kv)))
                out[f"present.{layer}.{kind}"] = kv
        return out

    def _step(self, ids: np.ndarray, prefill: bool) -> StepResult:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or (not prefill and ids.shape[1] != 1):
            raise AdafuseError(f"input ids must be [batch, {'seq' if prefill else 1}], found shape {list(ids.shape)}")
        b, s = ids.shape
        logits = np.empty((b, s, self.info.vocab_size or 0), np.float32)
        experts = np.empty((b, s, self.top_k), np.int32) if self.top_k else None
        gates = np.empty((b, s, self.top_k), np.float32) if self.top_k else None
        if prefill:
            status = self.lib.adafuse_prefill(self.handle, _ptr(ids), b, s, _ptr(logits), _ptr(experts), _ptr(gates))
        else:
            status = self.lib.adafuse_decode(self.handle, _ptr(ids), b, _ptr(logits), _ptr(experts), _ptr(gates))
        _check(self.lib, status)
        self._batch = b
        return StepResult(logits, self._present(), experts, gates)

    def prefill(self, input_ids):
        return self._step(input_ids, True)

    def decode(self, input_ids):
        return self._step(input_ids, False)

    def close(self) -> None:
        if getattr(self, "handle", None):
            self.lib.adafuse_engine_free(self.handle)
            self.handle = _p()

    def __del__(self):
        self.close()
