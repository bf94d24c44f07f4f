"""ONNX Runtime sessions for plugin-flavour graphs: the adafuse custom ops as Python ops.

ONNX Runtime's C/C++ headers ship with no package here, so the ops are Python functions
registered through onnxruntime-extensions (`onnx_op`), whose "domain::op_type" names put them
straight in the graph's own domain `adafuse`. Measured on onnxruntime-extensions 0.15.2:
  - an exception raised inside a Python op, or a float16/bfloat16 tensor handed to one, aborts the
    whole process (std::terminate), so the ops never raise and only ever see float32;
  - FLOAT attributes reach the op as text with 6 significant digits, and the op is not told which
    node it runs for;
  - one kernel per (op_type, input types) and a fixed input count (no optional inputs).
Hence `PluginGraph` prepares a session copy of the graph, in memory (the file is untouched):
every adafuse node keeps its op_type, domain, inputs, output and attributes and gains
  - an `adafuse_site` attribute: the key of the node's fields as read here from the node exactly as
    TensorRT's ONNX parser passes them (plugin_op_impl.parser_fields), its name and dtype;
  - Cast-to-float32 on x, W, A, B, bias and a Cast back to the node's dtype on y (exact: float16 and
    bfloat16 widen to float32 exactly, and the op rounds its result to the node's dtype first);
  - an empty float32 tensor as input 6 when it has no bias;
  - with FP8 weights (weight_dtype 1), W is DequantizeLinear(W, weight_scale) along the output channels in
    float32 instead of a Cast (each element q * scale rounded once to float32), and the op keeps 7 inputs.
An op that fails records its message (naming the node) and returns NaN; `PluginGraph.run` raises it.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from onnx import TensorProto, helper

from ..errors import AdafuseError, missing_dependency
from ..onnx import plugin_ops
from .plugin_op_impl import DESCRIPTIONS, IMPLEMENTATIONS, LinearFields, check_inputs, cuda_kernels, parser_fields

SITE_ATTR = "adafuse_site"
NO_BIAS = "adafuse_ort.no_bias"
CHOICES = ("auto", "cpu", "cuda")
_ELEM: dict[str, int] = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


@dataclass
class _Site:
    name: str
    op_type: str
    fields: LinearFields
    dtype: str
    compute: Callable[..., np.ndarray]
    errors: list[str] = field(default_factory=list)  # shared by every site of one PluginGraph


_SITES: dict[int, _Site] = {}
_site_ids = itertools.count(1)
_registered = False


def _op(x, W, A, B, ids, gates, bias, **attrs) -> np.ndarray:
    """The body of every registered op. It must not raise (see the module docstring): a failure is
    recorded for PluginGraph.run and the output is NaN."""
    site = _SITES[int(attrs[SITE_ATTR])]  # ids come from PluginGraph only, which outlives its session
    f = site.fields
    try:
        # ONNX Runtime's own reading of the attributes (scale as 6-digit text) must be this node's
        seen = {k: int(attrs[k]) for k, kind in plugin_ops.FIELDS if kind == "int"}
        if seen != {k: getattr(f, k) for k in seen} or abs(float(attrs["scale"]) - f.scale) > 5e-6 * abs(f.scale):
            raise ValueError(f"ONNX Runtime passed fields {dict(attrs)}, the node has {f}")
        check_inputs(f, x, W, A, B, ids, gates, bias)
        return site.compute(f, x, W, A, B, ids, gates, bias, site.dtype)
    except Exception as e:  # noqa: BLE001 - raised by PluginGraph.run after the session returns
        site.errors.append(f"{site.op_type} node '{site.name}': {e}")
        return np.full(x.shape[:-1] + (f.out_features,) if x.ndim else (f.out_features,), np.nan, np.float32)


def _register() -> str:
    """Register the ops once per process; returns the extension library to load into sessions."""
    global _registered
    try:
        import onnxruntime_extensions as ortx
    except ImportError:
        raise missing_dependency("onnxruntime-extensions", "onnx") from None
    if not _registered:
        P = ortx.PyCustomOpDef
        attrs = {SITE_ATTR: P.dt_int64}
        attrs.update({k: P.dt_int64 if kind == "int" else P.dt_float for k, kind in plugin_ops.FIELDS})
        f32 = P.dt_float
        for op_type in plugin_ops.OP_TYPES:
            ortx.onnx_op(op_type=f"{plugin_ops.DOMAIN}::{op_type}", inputs=[f32, f32, f32, f32, P.dt_int32, f32, f32],
                         outputs=[f32], attrs=attrs)(_op)
        _registered = True
    return ortx.get_library_path()


def _forget(site_ids: tuple[int, ...]) -> None:
    for i in site_ids:
        _SITES.pop(i, None)


def resolve_choice(choice: str) -> str:
    """--plugin-ops auto|cpu|cuda -> cpu or cuda (auto: cuda when torch sees a GPU); cuda loads the
    kernels (building them with nvcc once) so a missing toolchain is reported here."""
    if choice not in CHOICES:
        raise AdafuseError(f"--plugin-ops '{choice}' is unknown (expected one of {', '.join(CHOICES)})")
    if choice == "cpu":
        return "cpu"
    import torch

    gpu = torch.cuda.is_available()
    if choice == "auto" and not gpu:
        return "cpu"
    if not gpu:
        raise AdafuseError("--plugin-ops cuda: torch sees no CUDA GPU here; use --plugin-ops cpu")
    from ..kernels import AdafuseKernelError, KernelBuildError

    try:
        cuda_kernels()
    except (KernelBuildError, AdafuseKernelError) as e:
        raise AdafuseError(f"--plugin-ops {choice}: the adafuse CUDA kernels are not available ({e}); "
                           f"use --plugin-ops cpu") from None
    return "cuda"


def _elem_types(model) -> dict[str, int]:
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.value_info)
                  if v.type.HasField("tensor_type")})
    return types


def _session_nodes(node, site_id: int, fields: LinearFields, dtype: str) -> list:
    """The node as the session runs it: float32 Casts in, the op tagged with its site, a Cast back out."""
    inputs, nodes = list(node.input), []
    fp8 = fields.weight_dtype == plugin_ops.WEIGHT_FP8_E4M3
    if fp8:
        w_scale = inputs.pop(plugin_ops.weight_scale_index(fields.has_bias))
    for pos in (plugin_ops.X, plugin_ops.W, plugin_ops.A, plugin_ops.B, plugin_ops.BIAS)[: 5 if fields.has_bias else 4]:
        cast = f"adafuse_ort/{site_id}/{plugin_ops.INPUTS[pos]}"
        if pos == plugin_ops.W and fp8:
            nodes.append(helper.make_node("DequantizeLinear", [inputs[pos], w_scale], [cast], name=cast, axis=0))
        else:
            nodes.append(helper.make_node("Cast", [inputs[pos]], [cast], name=cast, to=_ELEM["float32"]))
        inputs[pos] = cast
    if not fields.has_bias:
        inputs.append(NO_BIAS)
    y32 = f"adafuse_ort/{site_id}/y"
    op = helper.make_node(node.op_type, inputs, [y32], name=node.name, domain=node.domain)
    op.attribute.extend(node.attribute)
    op.attribute.append(helper.make_attribute(SITE_ATTR, site_id))
    return nodes + [op, helper.make_node("Cast", [y32], list(node.output), name=f"{y32}/cast", to=_ELEM[dtype])]


class PluginGraph:
    """A plugin-flavour ModelProto prepared for an ONNX Runtime session (see the module docstring)."""

    def __init__(self, model, path: Path, choice: str = "auto"):
        self.path = Path(path)
        self.library = _register()
        self.implementation = resolve_choice(choice)
        self.errors: list[str] = []
        types = _elem_types(model)
        self.model = type(model)()
        self.model.CopyFrom(model)
        del self.model.graph.node[:]
        sites: dict[int, _Site] = {}
        for node in model.graph.node:
            if node.domain != plugin_ops.DOMAIN:
                self.model.graph.node.append(node)
                continue
            if node.op_type not in plugin_ops.OP_TYPES:
                raise AdafuseError(f"{self.path}: node '{node.name}' is {node.domain}::{node.op_type}, which no adafuse "
                                   f"plugin implements (known: {', '.join(plugin_ops.OP_TYPES)})")
            try:
                fields = parser_fields(node)
            except AdafuseError as e:
                raise AdafuseError(f"{self.path}: {e}") from None
            site_id = next(_site_ids)
            sites[site_id] = _Site(node.name, node.op_type, fields, self._dtype(node, fields, types),
                                   IMPLEMENTATIONS[self.implementation], self.errors)
            self.model.graph.node.extend(_session_nodes(node, site_id, fields, sites[site_id].dtype))
        self.model.graph.initializer.append(helper.make_tensor(NO_BIAS, _ELEM["float32"], [0], []))
        self.nodes = len(sites)
        self.op_types = sorted({s.op_type for s in sites.values()})
        _SITES.update(sites)
        weakref.finalize(self, _forget, tuple(sites))

    def _dtype(self, node, fields: LinearFields, types: dict[str, int]) -> str:
        """The node's dtype: W's, which A, B and bias must share (the plugin's format rule); with FP8 W
        (float8e4m3fn, its scales float32), A's."""
        names = {v: k for k, v in _ELEM.items()}
        w = types.get(node.input[plugin_ops.W], TensorProto.UNDEFINED)
        where = f"{self.path}: {node.op_type} node '{node.name}'"
        if fields.weight_dtype == plugin_ops.WEIGHT_FP8_E4M3:
            scale = node.input[plugin_ops.weight_scale_index(fields.has_bias)]
            for pos, name, want in ((plugin_ops.W, node.input[plugin_ops.W], TensorProto.FLOAT8E4M3FN),
                                    (plugin_ops.weight_scale_index(fields.has_bias), scale, TensorProto.FLOAT)):
                found = types.get(name, TensorProto.UNDEFINED)
                if found != want:
                    raise AdafuseError(f"{where}: input {pos} ({plugin_ops.INPUTS[7 if name == scale else pos]}) "
                                       f"'{name}' expected {TensorProto.DataType.Name(want)} (weight_dtype 1), found "
                                       f"{TensorProto.DataType.Name(found)}")
            w = types.get(node.input[plugin_ops.A], TensorProto.UNDEFINED)
        if w not in names:
            raise AdafuseError(f"{where}: input 1 (W) '{node.input[plugin_ops.W]}' expected float32, float16 or bfloat16, "
                               f"found {TensorProto.DataType.Name(w)}")
        for pos in (plugin_ops.A, plugin_ops.B, plugin_ops.BIAS)[: 3 if fields.has_bias else 2]:
            found = types.get(node.input[pos], w)
            if found != w:
                raise AdafuseError(f"{where}: input {pos} ({plugin_ops.INPUTS[pos]}) expected the dtype of W "
                                   f"({names[w]}), found {TensorProto.DataType.Name(found)}")
        return names[w]

    @property
    def description(self) -> str:
        import onnxruntime_extensions

        return (f"{self.nodes} {plugin_ops.DOMAIN} nodes ({', '.join(self.op_types)}) as onnxruntime-extensions "
                f"{onnxruntime_extensions.__version__} Python ops, {DESCRIPTIONS[self.implementation]}")

    def configure(self, options) -> None:
        """Register the ops with `options` and point them at the graph's external data folder (sessions
        are made from the prepared model's bytes, which have no folder of their own)."""
        options.register_custom_ops_library(self.library)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.path.parent))

    def session_source(self, options) -> bytes:
        """The prepared model for InferenceSession, with `options` configured."""
        self.configure(options)
        return self.model.SerializeToString()

    def run(self, session, output_names: list[str], feeds: dict) -> list:
        """session.run, raising the first op failure (naming its node) as an AdafuseError."""
        self.errors.clear()
        try:
            outs = session.run(output_names, feeds)
        except Exception:
            if not self.errors:
                raise
            outs = []
        if self.errors:
            raise AdafuseError(f"{self.path}: {self.errors[0]}"
                               + (f" (and {len(self.errors) - 1} more node failure(s))" if len(self.errors) > 1 else ""))
        return outs
