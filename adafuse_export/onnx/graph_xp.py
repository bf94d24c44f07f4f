"""The ONNX graph as an array namespace (families/features.py's `xp`): values are graph values that know their
element type, and each operation on them adds nodes to the Graph. The feature definitions then build the
same computation in the exported graphs as they run in the PyTorch reference."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .graph import Graph

F32, BOOL = TensorProto.FLOAT, TensorProto.BOOL
_DTYPE_NAMES: dict[int, str] = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}


class Value:
    """A graph value and its ONNX element type; Python numbers combined with it take that type."""
    __slots__ = ("xp", "name", "elem")

    def __init__(self, xp: GraphNamespace, name: str, elem: int):
        self.xp, self.name, self.elem = xp, name, elem

    def _operand(self, other) -> Value:
        return other if isinstance(other, Value) else self.xp.scalar(other, self.elem)

    def _binary(self, op: str, other, reverse: bool = False, elem: int | None = None) -> Value:
        b = self._operand(other)
        a, b = (b, self) if reverse else (self, b)
        return Value(self.xp, self.xp.g.op(op, [a.name, b.name]), self.elem if elem is None else elem)

    def __add__(self, other):
        return self._binary("Add", other)

    def __radd__(self, other):
        return self._binary("Add", other, reverse=True)

    def __sub__(self, other):
        return self._binary("Sub", other)

    def __rsub__(self, other):
        return self._binary("Sub", other, reverse=True)

    def __mul__(self, other):
        return self._binary("Mul", other)

    def __rmul__(self, other):
        return self._binary("Mul", other, reverse=True)

    def __truediv__(self, other):
        return self._binary("Div", other)

    def __gt__(self, other):
        return self._binary("Greater", other, elem=BOOL)

    def __neg__(self):
        return self.xp.unary("Neg", self)


class GraphNamespace:
    """features.Namespace over a Graph."""
    float32 = F32

    def __init__(self, g: Graph):
        self.g = g
        self._constants: set[str] = set()

    def value(self, name: str, elem: int) -> Value:
        return Value(self, name, elem)

    def scalar(self, v: float, elem: int) -> Value:
        if elem in _DTYPE_NAMES and elem != F32:
            return Value(self, self.g.const_of(v, _DTYPE_NAMES[elem]), elem)
        return Value(self, self.g.const(v, np.float32 if elem == F32 else np.int64), elem)

    def unary(self, op: str, x: Value, **attrs) -> Value:
        return Value(self, self.g.op(op, [x.name], **attrs), x.elem)

    def cast(self, x: Value, dtype: int) -> Value:
        return Value(self, self.g.cast(x.name, dtype, x.elem), dtype)

    def dtype(self, x: Value) -> int:
        return x.elem

    def constant(self, tensor, name: str, like) -> Value:
        """An initializer, added once per name."""
        if name not in self._constants:
            self._constants.add(name)
            self.g.init(name, tensor)
        return Value(self, name, F32)

    def rsqrt(self, x: Value) -> Value:
        return self.unary("Reciprocal", self.unary("Sqrt", x))

    def mean_last(self, x: Value) -> Value:
        return Value(self, self.g.reduce("ReduceMean", x.name, [-1]), x.elem)

    def amax_last(self, x: Value) -> Value:
        return Value(self, self.g.reduce("ReduceMax", x.name, [-1]), x.elem)

    def tanh(self, x: Value) -> Value:
        return self.unary("Tanh", x)

    def cos(self, x: Value) -> Value:
        return self.unary("Cos", x)

    def sin(self, x: Value) -> Value:
        return self.unary("Sin", x)

    def silu(self, x: Value) -> Value:
        return x * self.unary("Sigmoid", x)

    def gelu_tanh(self, x: Value) -> Value:
        from ..families.features import gelu_tanh_formula

        return gelu_tanh_formula(self, x)  # ONNX's Gelu (with approximate="tanh") is opset 20; the graphs are 17

    def where(self, cond: Value, a: Value, b: Value) -> Value:
        return Value(self, self.g.op("Where", [cond.name, a.name, b.name]), a.elem)

    def unsqueeze_last(self, x: Value) -> Value:
        return Value(self, self.g.op("Unsqueeze", [x.name, self.g.const([-1])]), x.elem)

    def cat_last(self, xs: list[Value]) -> Value:
        return Value(self, self.g.op("Concat", [x.name for x in xs], axis=-1), xs[0].elem)

    def split_last(self, x: Value, sizes: list[int]) -> list[Value]:
        outs = self.g.op("Split", [x.name, self.g.const(sizes)], n_out=len(sizes), axis=-1)
        return [Value(self, o, x.elem) for o in outs]
