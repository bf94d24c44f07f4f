"""The one place that defines the AdafuseLoraLinear custom op (the TensorRT plugin contract).

A routed adapter site in a "plugin"-flavour graph is ONE node:

    y = AdafuseLoraLinear(x, W, A, B, expert_ids, gates[, bias])     domain "adafuse", version 1
    y = x W^T (+ bias) + scale * sum_j gates[..., j] * B[ids[..., j]] (A[ids[..., j]] x)

Inputs (positions are part of the contract, see INPUTS):
    x [..., in] float, W [out, in], A [E, rank, in], B [E, out, rank],
    expert_ids [..., top_k] int32, gates [..., top_k] float32, bias [out] (only if has_bias)
Output: y [..., out], dtype of x.
Attributes: exactly FIELDS, which mirror the TensorRT plugin's PluginFieldCollection
(plugins/adafuseLoraLinearPlugin).
"""
from __future__ import annotations

from ..errors import AdafuseError

OP_TYPE = "AdafuseLoraLinear"
DOMAIN = "adafuse"
DOMAIN_VERSION = 1
PLUGIN_VERSION = "1"

# (field name, kind) in the plugin's field order; kind is "int" or "float"
FIELDS: tuple[tuple[str, str], ...] = (
    ("in_features", "int"),
    ("out_features", "int"),
    ("num_experts", "int"),
    ("rank", "int"),
    ("top_k", "int"),
    ("scale", "float"),
    ("has_bias", "int"),
)
INPUTS: tuple[str, ...] = ("x", "W", "A", "B", "expert_ids", "gates", "bias")
OUTPUTS: tuple[str, ...] = ("y",)
# named input positions (as the plugin's kX_INDEX constants)
X, W, A, B, EXPERT_IDS, GATES, BIAS = range(7)


def make_node(inputs: list[str], output: str, name: str, *, in_features: int, out_features: int,
              num_experts: int, rank: int, top_k: int, scale: float, has_bias: bool):
    """An AdafuseLoraLinear NodeProto; inputs in INPUTS order (bias last, only if has_bias)."""
    from onnx import helper

    fields = dict(in_features=in_features, out_features=out_features, num_experts=num_experts, rank=rank,
                  top_k=top_k, scale=scale, has_bias=int(bool(has_bias)))
    expected = len(INPUTS) if has_bias else len(INPUTS) - 1
    if len(inputs) != expected:
        raise ValueError(f"{OP_TYPE} node '{name}': {len(inputs)} inputs, expected {expected}")
    node = helper.make_node(OP_TYPE, inputs, [output], name=name, domain=DOMAIN)
    # in the plugin's field order (helper.make_node would sort them by name)
    node.attribute.extend(helper.make_attribute(k, float(fields[k]) if kind == "float" else int(fields[k]))
                          for k, kind in FIELDS)
    return node


def node_fields(node) -> dict:
    """Read a node's plugin fields back, checking they are exactly FIELDS with the right kinds."""
    from onnx import AttributeProto

    where = f"{OP_TYPE} node '{node.name}'"
    if node.op_type != OP_TYPE or node.domain != DOMAIN:
        raise AdafuseError(f"{where}: op {node.domain}::{node.op_type}, expected {DOMAIN}::{OP_TYPE}")
    found = {a.name: a for a in node.attribute}
    names = [n for n, _ in FIELDS]
    if sorted(found) != sorted(names):
        raise AdafuseError(f"{where}: attributes {sorted(found)}, expected exactly {names}")
    out = {}
    for name, kind in FIELDS:
        a = found[name]
        want = AttributeProto.FLOAT if kind == "float" else AttributeProto.INT
        if a.type != want:
            raise AdafuseError(f"{where}: attribute '{name}' has type {AttributeProto.AttributeType.Name(a.type)}, expected {kind}")
        out[name] = a.f if kind == "float" else a.i
    expected = len(INPUTS) if out["has_bias"] else len(INPUTS) - 1
    if len(node.input) != expected:
        raise AdafuseError(f"{where}: {len(node.input)} inputs, expected {expected} (has_bias {out['has_bias']})")
    return out


def check_roundtrip(node, expected: dict) -> None:
    """The node's attributes equal `expected` (a FIELDS dict), field by field."""
    got = node_fields(node)
    for name, kind in FIELDS:
        want = expected[name]
        ok = abs(got[name] - float(want)) <= 1e-6 * max(1.0, abs(float(want))) if kind == "float" else got[name] == int(want)
        if not ok:
            raise AdafuseError(f"{OP_TYPE} node '{node.name}': field '{name}' is {got[name]}, expected {want}")
