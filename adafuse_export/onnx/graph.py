"""A small helper over onnx.helper for building graphs node by node with numpy/torch initializers."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
ELEM_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
              TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.BOOL: "bool"}


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def tensor_proto(name: str, t) -> TensorProto:
    """A TensorProto from a torch tensor or numpy array (bfloat16 through raw bytes)."""
    import torch

    if isinstance(t, torch.Tensor):
        t = t.detach().contiguous().cpu()
        if t.dtype == torch.bfloat16:
            proto = TensorProto()
            proto.name = name
            proto.data_type = TensorProto.BFLOAT16
            proto.dims.extend(t.shape)
            proto.raw_data = t.view(torch.int16).numpy().tobytes()
            return proto
        t = t.numpy()
    return numpy_helper.from_array(np.ascontiguousarray(t), name)


class Graph:
    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, dtype
        self.elem = ELEM[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._consts: dict = {}
        self._memo: dict = {}

    # ---- names, inputs, outputs ------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def input(self, name: str, elem: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, value: str, elem: int, shape: list) -> str:
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
        self.initializers.append(tensor_proto(name, t))
        return name

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

    def cast(self, x: str, to_elem: int, from_elem: int) -> str:
        return x if to_elem == from_elem else self.op("Cast", [x], to=to_elem)

    def model(self, opset_imports: dict[str, int] | None = None, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        imports = [helper.make_opsetid("", OPSET)]
        for domain, version in (opset_imports or {}).items():
            imports.append(helper.make_opsetid(domain, version))
        model = helper.make_model(graph, opset_imports=imports, producer_name="adafuse-export")
        model.ir_version = 8  # opset 17 era; readable by ONNX Runtime >= 1.13 and TensorRT 8.6+
        for k, v in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, str(v)
        return model
