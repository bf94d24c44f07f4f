"""A small helper over onnx.helper for building graphs node by node with numpy/torch initializers.

Weights can be *deferred*: the builder records name, dtype, shape and a producer (which reads the
checkpoint tensor when called), so a whole graph is built before any weight byte is read. The
exporter then knows the exact initializer bytes up front and either materialises them inline
(small models, one .onnx file) or streams them one at a time into `<graph>.onnx.data`
(ExternalData): peak memory is then about one tensor, not the model.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..weights import torch_dtype  # noqa: F401  (re-exported: the graph modules import it from here)

OPSET = 17
# FP8 weights (builder weights="fp8"): DequantizeLinear takes float8e4m3fn from opset 19 (ONNX Runtime's CPU
# provider runs it there, TensorRT parses it); the graphs without FP8 keep opset 17.
FP8_OPSET = 19
# The in-place KV cache update (builder kv_update "in-place"): TensorScatter is opset 24 (ONNX 1.19, IR 12), which
# ONNX Runtime runs on the CPU (1.32 here) and TensorRT's parser imports from 10.15 on (as IKVCacheUpdateLayer).
KV_IN_PLACE_OPSET = 24
IR_VERSIONS = {OPSET: 8, FP8_OPSET: 9, KV_IN_PLACE_OPSET: 12}  # the IR version of each opset's release
ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
FP8 = TensorProto.FLOAT8E4M3FN
ELEM_SIZES = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, FP8: 1}
ELEM_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
              TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.BOOL: "bool",
              FP8: "float8e4m3fn"}




def tensor_proto(name: str, t, proto: TensorProto | None = None) -> TensorProto:
    """A TensorProto from a torch tensor or numpy array (raw bytes), filled into `proto` when given
    (e.g. graph.initializer.add(), which saves a copy of the bytes)."""
    import torch

    proto = TensorProto() if proto is None else proto
    if isinstance(t, torch.Tensor):
        t = t.detach().contiguous().cpu()
        if t.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn):
            proto.name = name
            proto.data_type = _elem_of(t)
            proto.dims.extend(t.shape)
            proto.raw_data = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # little-endian, as ONNX wants
            return proto
        t = t.numpy()
    proto.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(t), name))
    return proto


def _elem_of(t) -> int:
    import torch

    return {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
            torch.float8_e4m3fn: FP8, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32, torch.bool: TensorProto.BOOL}[t.dtype]


@dataclass
class Deferred:
    """A weight not read yet: `produce()` returns a torch tensor of exactly this dtype and shape."""
    elem: int
    shape: tuple[int, ...]
    produce: Callable[[], object]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ELEM_SIZES[self.elem]

    def tensor(self, name: str):
        t = self.produce()
        if _elem_of(t) != self.elem or tuple(t.shape) != tuple(self.shape):
            raise RuntimeError(f"initializer '{name}': producer gave {t.dtype} {list(t.shape)}, "
                               f"declared {ELEM_NAMES.get(self.elem, self.elem)} {list(self.shape)}")
        return t


class ExternalData:
    """Appends tensors to one external-data file, each at an offset aligned to `align` bytes (so
    ONNX Runtime can memory-map them), and returns TensorProtos that reference them
    (data_location EXTERNAL with location/offset/length; no raw_data is kept)."""

    ALIGN = 4096

    def __init__(self, path: Path, align: int = ALIGN):
        self.path, self.location, self.align = Path(path), Path(path).name, align
        self.offset = 0
        self._f = open(self.path, "wb")

    def add(self, name: str, t) -> TensorProto:
        import torch

        t = t.detach().contiguous().cpu()
        pad = -self.offset % self.align
        if pad:
            self._f.write(b"\0" * pad)
            self.offset += pad
        data = t.reshape(-1).view(torch.uint8).numpy() if t.dtype != torch.bool else t.reshape(-1).numpy()
        length = t.numel() * t.element_size()
        if length:
            self._f.write(memoryview(data))  # straight from the tensor's memory, no bytes copy
        proto = TensorProto()
        proto.name = name
        proto.data_type = _elem_of(t)
        proto.dims.extend(t.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(length))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.offset += length
        return proto

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._f.closed:
            self._f.close()


class Graph:
    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype
        self.elem = ELEM[dtype]
        self.nodes: list[onnx.NodeProto] = []
        # inline constants as TensorProtos; weights as (name, Deferred or tensor) until model()
        self.initializers: list = []
        self.opset_imports: dict[str, int] = {}
        self.metadata: dict[str, str] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._consts: dict = {}
        self._memo: dict = {}
        self.opset = OPSET  # FP8_OPSET with FP8 weights, KV_IN_PLACE_OPSET with TensorScatter (model() writes it)

    # ---- names, inputs, outputs ------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, value: str, elem: int, shape: list) -> str:
        """Declares `value` a graph output named `name`: through an Identity, unless its node already named it so."""
        if value != name:
            self.op("Identity", [value], out=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    # ---- nodes ---------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], n_out: int = 1, out: str | list[str] | None = None,
           domain: str = "", hint: str | None = None, **attrs):
        if out is None:
            outs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        else:
            outs = [out] if isinstance(out, str) else list(out)
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(f"/{hint or op_type}"),
                                           domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def add_node(self, node: onnx.NodeProto) -> str:
        self.nodes.append(node)
        return node.output[0]

    def memo(self, key, make):
        """Emit a value once per key (e.g. a base projection shared by MixLoRA expert slots)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    # ---- initializers and constants -------------------------------------------------
    def init(self, name: str, t) -> str:
        """A weight initializer: a torch tensor / numpy array, or a Deferred read later."""
        self.initializers.append((name, t))
        return name

    def initializer_bytes(self) -> int:
        """Bytes of every initializer (weights and constants), known without reading any weight."""
        total = 0
        for entry in self.initializers:
            if isinstance(entry, TensorProto):
                total += len(entry.raw_data)
            else:
                t = entry[1]
                total += t.nbytes if isinstance(t, Deferred) else (t.numel() * t.element_size() if hasattr(t, "numel") else t.nbytes)
        return total

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def const_of(self, value: float, dtype: str) -> str:
        """A scalar in a float dtype by name (float32/float16/bfloat16)."""
        import torch

        t = torch.tensor(value, dtype=torch_dtype(dtype))
        key = (dtype, float(value))
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(tensor_proto(name, t))
            self._consts[key] = name
        return self._consts[key]

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        """ReduceMean/ReduceMax over `axes`: an attribute up to opset 17, an input from opset 18."""
        if self.opset >= 18:
            return self.op(op_type, [x, self.const(axes)], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)

    def cast(self, x: str, to_elem: int, from_elem: int) -> str:
        return x if to_elem == from_elem else self.op("Cast", [x], to=to_elem)

    def model(self, external: ExternalData | None = None) -> onnx.ModelProto:
        """The ModelProto. Weights are read here, one at a time: inline (raw_data) without `external`,
        else appended to its file as they are produced and released at once; constants stay inline."""
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, [])
        for entry in self.initializers:
            if isinstance(entry, TensorProto):
                graph.initializer.append(entry)
                continue
            name, t = entry
            if isinstance(t, Deferred):
                t = t.tensor(name)
            if external is not None:
                import torch

                graph.initializer.append(external.add(name, t if isinstance(t, torch.Tensor) else torch.from_numpy(np.asarray(t))))
            else:
                tensor_proto(name, t, graph.initializer.add())
            del t
        imports = [helper.make_opsetid("", self.opset)]
        for domain, version in self.opset_imports.items():
            imports.append(helper.make_opsetid(domain, version))
        model = helper.make_model(graph, opset_imports=imports, producer_name="adafuse-export")
        # opset 17: IR 8, readable by ONNX Runtime >= 1.13 and TensorRT 8.6+; opset 19 (FP8): IR 9, ONNX Runtime >= 1.16;
        # opset 24 (in-place KV cache): IR 12
        model.ir_version = IR_VERSIONS[self.opset]
        for k, v in self.metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, str(v)
        return model
