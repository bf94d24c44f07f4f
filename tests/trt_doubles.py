"""Test doubles of the TensorRT runtime objects the TensorRT runner drives, for machines that cannot
run an engine (no GPU here; TensorRT-RTX engines do not run on the H200).

Each double mirrors one real `tensorrt_rtx` class (DOUBLES: double -> real class name): its method
names and parameter names are asserted against the real bindings in test_tensorrt_runner.py, so the
doubles cannot drift from the API. They record every call in a shared `calls` list (call order),
and can be told to return False/None from a named method (error paths).

RecordingTrtEngine stands for the engine `convert` built: its tensors (names, modes, dtypes,
dynamic shapes) and profiles come from that engine's ONNX export and manifest, and its context
executes that very ONNX graph with ONNX Runtime on the memory at the addresses it was given, so a
runner bug in shapes, dtypes, addresses or KV plumbing changes the numbers validate compares.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

# ONNX Runtime type -> (TensorRT DataType member, numpy dtype)
_ORT_TYPES = {"tensor(float)": ("FLOAT", np.float32), "tensor(float16)": ("HALF", np.float16),
              "tensor(int64)": ("INT64", np.int64), "tensor(int32)": ("INT32", np.int32)}


def _memory(address: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """The host memory at `address` as a writable array (the doubles run on CPU tensors)."""
    count = int(np.prod(shape))
    if count == 0:
        return np.zeros(shape, dtype)
    raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


class RecordingStream:
    """torch.cuda.Stream: a handle, wait_stream, synchronize."""

    def __init__(self, calls: list, handle: int = 7):
        self.calls, self.handle = calls, handle

    @property
    def cuda_stream(self) -> int:
        return self.handle

    def wait_stream(self, stream) -> None:
        self.calls.append(("wait_stream", stream.cuda_stream))

    def synchronize(self) -> None:
        self.calls.append(("synchronize",))


class RecordingTrtEngine:
    """ICudaEngine over the ONNX export and manifest of an engine built by `convert`."""

    def __init__(self, trt, onnx_decoder: Path, manifest: dict, calls: list, fail: str | None = None):
        import onnxruntime as ort

        self.trt, self.calls, self.fail = trt, calls, fail
        self.session = ort.InferenceSession(str(onnx_decoder), providers=["CPUExecutionProvider"])
        self.io = {}  # name -> (mode, DataType member, numpy dtype, dims with symbols)
        for mode, values in ((trt.TensorIOMode.INPUT, self.session.get_inputs()),
                             (trt.TensorIOMode.OUTPUT, self.session.get_outputs())):
            for v in values:
                member, np_dtype = _ORT_TYPES[v.type]
                self.io[v.name] = (mode, member, np_dtype, list(v.shape))
        self.names = list(self.io)
        self.profiles = [p["shapes"] for p in manifest["profiles"]]

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str):
        return self.io[name][0]

    def get_tensor_dtype(self, name: str):
        return getattr(self.trt.DataType, self.io[name][1])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self.io[name][3])

    def create_execution_context(self, strategy=None):
        self.calls.append(("create_execution_context",))
        return None if self.fail == "create_execution_context" else RecordingTrtContext(self)


class RecordingTrtContext:
    """IExecutionContext: profile, input shapes (checked against the profile as TensorRT does),
    tensor addresses; execute_async_v3 runs the ONNX graph on the memory at those addresses."""

    def __init__(self, engine: RecordingTrtEngine):
        self.engine, self.calls = engine, engine.calls
        self.profile: int | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def _result(self, method: str) -> bool:
        return self.engine.fail != method

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        self.calls.append(("set_optimization_profile_async", profile_index, stream_handle))
        self.profile = profile_index
        return self._result("set_optimization_profile_async")

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        self.calls.append(("set_input_shape", name, tuple(shape)))
        lo, _, hi = self.engine.profiles[self.profile][name]
        if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False  # outside the profile, as TensorRT refuses it
        self.shapes[name] = tuple(shape)
        return self._result("set_input_shape")

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.calls.append(("set_tensor_address", name))
        if memory == 0:
            return False  # TensorRT needs allocated memory even for an empty binding
        self.addresses[name] = memory
        return self._result("set_tensor_address")

    def _symbols(self) -> dict[str, int]:
        sizes = {}
        for name, shape in self.shapes.items():
            for d, n in zip(self.engine.io[name][3], shape):
                if isinstance(d, str):
                    sizes[d] = n
        return sizes

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        self.calls.append(("get_tensor_shape", name))
        if name in self.shapes:
            return self.shapes[name]
        sizes = self._symbols()
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.engine.io[name][3])

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.calls.append(("execute_async_v3", stream_handle))
        io = self.engine.io
        feeds = {n: _memory(self.addresses[n], s, io[n][2]).copy() for n, s in self.shapes.items()}
        names = [n for n in self.engine.names if io[n][0] == self.engine.trt.TensorIOMode.OUTPUT]
        for name, value in zip(names, self.engine.session.run(names, feeds)):
            _memory(self.addresses[name], self.get_tensor_shape(name), io[name][2])[...] = value
        return self._result("execute_async_v3")


class RecordingTrtRuntime:
    """Runtime: deserialize_cuda_engine gives the RecordingTrtEngine it was made for; load_runtime (the lean runtime
    of a version-compatible engine) records the path and gives a runtime of the same engine, or None (refused)."""

    def __init__(self, logger, engine: RecordingTrtEngine | None = None, calls: list | None = None,
                 loads: bool = True):
        self.logger, self.engine, self.calls, self.loads = logger, engine, calls if calls is not None else [], loads

    def deserialize_cuda_engine(self, serialized_engine: bytes):
        self.engine_bytes = len(serialized_engine)
        self.calls.append(("deserialize_cuda_engine", self))
        return self.engine

    def load_runtime(self, path: str):
        self.calls.append(("load_runtime", path))
        return RecordingTrtRuntime(self.logger, self.engine, self.calls) if self.loads else None


class RecordingPluginRegistry:
    """IPluginRegistry: load_library returns a handle, or None as TensorRT does on failure."""

    def __init__(self, calls: list, handle: object | None = None):
        self.calls, self.handle = calls, handle

    def load_library(self, plugin_path: str):
        self.calls.append(("load_library", plugin_path))
        return self.handle


class RecordingTimingCacheConfig:
    """IBuilderConfig's timing-cache methods (TensorRT-RTX's are no-ops, so refusal is simulated)."""

    def __init__(self, calls: list, accepts: bool):
        self.calls, self.accepts = calls, accepts

    def create_timing_cache(self, serialized_timing_cache: bytes):
        self.calls.append(("create_timing_cache", bytes(serialized_timing_cache)))
        return object()

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        self.calls.append(("set_timing_cache", ignore_mismatch))
        return self.accepts


DOUBLES = {RecordingTrtEngine: "ICudaEngine", RecordingTrtContext: "IExecutionContext",
           RecordingTrtRuntime: "Runtime", RecordingPluginRegistry: "IPluginRegistry",
           RecordingTimingCacheConfig: "IBuilderConfig"}
