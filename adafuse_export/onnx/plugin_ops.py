"""The one place that defines the adafuse custom ops (the TensorRT plugin contract).

A routed adapter site in a "plugin"-flavour graph is ONE node of one of two op types, which share
every field, input and output and differ only in how the plugin computes the same result
(`--strategy`, STRATEGIES):

    fused   AdafuseLoraLinear    the routed fused linear: W x and the LoRA term in one pass
    switch  AdafuseSwitchLinear  merges the row's experts into a private copy of W when the route
                                 changes, then a plain GEMV (batch-1 decode; more rows: fused path)

    y = OP(x, W, A, B, expert_ids, gates[, bias][, weight_scale])     domain "adafuse", version 1
    y = x W^T (+ bias) + scale * sum_j gates[..., j] * B[ids[..., j]] (A[ids[..., j]] x)

Inputs (positions are part of the contract, see INPUTS):
    x [..., in] float, W [out, in], A [E, rank, in], B [E, out, rank],
    expert_ids [..., top_k] int32, gates [..., top_k] float32, bias [out] (only if has_bias),
    weight_scale [out] float32 (only if weight_dtype is 1: then W is float8e4m3fn and the base term is
    (x W^T) * weight_scale, adafuse_kernels.h ADAFUSE_WEIGHT_FP8_E4M3; the fused strategy only)
Output: y [..., out], dtype of x.
Attributes: exactly FIELDS, which mirror the TensorRT plugins' PluginFieldCollection
(plugins/adafuseLoraLinearPlugin, plugins/adafuseSwitchLinearPlugin). weight_dtype came after the first
seven: a serialized plugin without it reads as weight_dtype 0 (the plugins' fields of before), and a plugin
library of before refuses an FP8 W (its type is not x's) instead of misreading it.

Expert ids contract: every expert_ids value is in [0, num_experts). The kernels do not check it
on the device (that would cost a host sync per layer); the ids are in range by construction
(TopK over num_experts router outputs, or a routing table checked with `check_expert_ids`
when it is written and when a runner loads it), and the runtimes that feed ids validate them.

Kernel limits (plugins/kernels/include/adafuse_kernels.h, mirrored in MAX_TOP_K, MAX_EXPERTS,
MAX_RANK; tests/test_plugin_contract.py keeps them equal to the header): a node has
top_k <= 8, num_experts <= 256, rank <= 4096. The builder puts at most MAX_TOP_K experts per row
in a node and adds the rest of a wider mixture (LoRAMoE's dense router over more than 8 experts)
with standard ONNX ops, which is exact (the mixture is a sum); experts or rank beyond the kernels'
limits are refused at export (`check_limits`), naming the portable flavour that has no limit.
"""
from __future__ import annotations

from ..errors import AdafuseError

STRATEGIES = {"fused": "AdafuseLoraLinear", "switch": "AdafuseSwitchLinear"}  # --strategy -> op type / plugin name
DEFAULT_STRATEGY = "fused"  # 0.97x the cuBLAS dense step on the H200, switch 16.3 ms/step when routes change (docs/gpu-runtime.md)
OP_TYPE = STRATEGIES[DEFAULT_STRATEGY]
OP_TYPES = tuple(STRATEGIES.values())
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
    ("weight_dtype", "int"),
)
INPUTS: tuple[str, ...] = ("x", "W", "A", "B", "expert_ids", "gates", "bias", "weight_scale")
# named input positions (as the plugin's kX_INDEX constants); weight_scale follows the inputs before it
X, W, A, B, EXPERT_IDS, GATES, BIAS = range(7)
# weight_dtype field: adafuse_kernels.h adafuse_weight_dtype, by the weights' stored form (weights.WEIGHT_FORMATS)
WEIGHT_DTYPES = {"dtype": 0, "fp8_e4m3": 1}
WEIGHT_AS_DTYPE, WEIGHT_FP8_E4M3 = WEIGHT_DTYPES["dtype"], WEIGHT_DTYPES["fp8_e4m3"]
# fields a plugin may be created without (the plugins read them as these values: fields serialized before they existed)
FIELD_DEFAULTS = {"weight_dtype": WEIGHT_AS_DTYPE}


def nb_inputs(has_bias: int, weight_dtype: int) -> int:
    """The node's input count: x .. gates, then bias when has_bias, then weight_scale when W is FP8."""
    return 6 + int(bool(has_bias)) + int(weight_dtype == WEIGHT_FP8_E4M3)


def weight_scale_index(has_bias: int) -> int:
    """The position of weight_scale (FP8 W only): after the bias when there is one."""
    return 6 + int(bool(has_bias))
# adafuse_kernels.h: ADAFUSE_MAX_TOP_K, ADAFUSE_LORA_MAX_EXPERTS, ADAFUSE_LORA_MAX_RANK
MAX_TOP_K, MAX_EXPERTS, MAX_RANK = 8, 256, 4096


def op_type(strategy: str) -> str:
    """The op type (= TensorRT plugin name) of a --strategy."""
    if strategy not in STRATEGIES:
        raise AdafuseError(f"--strategy '{strategy}' is unknown (expected one of {', '.join(STRATEGIES)})")
    return STRATEGIES[strategy]


def check_limits(where: str, *, num_experts: int, rank: int,
                 remedy: str = "export with --flavour portable (standard ONNX ops) for this checkpoint") -> None:
    """Refuse an adapter site the plugin kernels cannot run (top_k is split by the builder instead)."""
    for what, value, limit, macro in (("experts", num_experts, MAX_EXPERTS, "ADAFUSE_LORA_MAX_EXPERTS"),
                                      ("rank", rank, MAX_RANK, "ADAFUSE_LORA_MAX_RANK")):
        if value > limit:
            raise AdafuseError(f"{where}: {what} is {value}, but the adafuse plugin kernels take at most {limit} "
                               f"({macro}); {remedy}")


def check_expert_ids(ids, num_experts: int, where: str) -> None:
    """Every id in [0, num_experts) (the contract above); `ids` is any integer array."""
    import numpy as np

    ids = np.asarray(ids)
    bad = ids[(ids < 0) | (ids >= num_experts)]
    if bad.size:
        raise AdafuseError(f"{where}: expert id {int(bad.flat[0])} is out of range [0, {num_experts}) "
                           f"({bad.size} of {ids.size} ids); the adapter kernels would read outside the expert weights")


def make_node(inputs: list[str], output: str, name: str, *, in_features: int, out_features: int,
              num_experts: int, rank: int, top_k: int, scale: float, has_bias: bool, strategy: str = DEFAULT_STRATEGY,
              weight_dtype: int = WEIGHT_AS_DTYPE):
    """A NodeProto of the strategy's op type; inputs in INPUTS order (bias only if has_bias, weight_scale only
    with weight_dtype WEIGHT_FP8_E4M3)."""
    from onnx import helper

    fields = dict(in_features=in_features, out_features=out_features, num_experts=num_experts, rank=rank,
                  top_k=top_k, scale=scale, has_bias=int(bool(has_bias)), weight_dtype=weight_dtype)
    expected = nb_inputs(has_bias, weight_dtype)
    op = op_type(strategy)
    if weight_dtype not in WEIGHT_DTYPES.values():
        raise ValueError(f"{op} node '{name}': weight_dtype {weight_dtype}, expected one of {sorted(WEIGHT_DTYPES.values())}")
    if weight_dtype == WEIGHT_FP8_E4M3 and strategy != "fused":
        raise ValueError(f"{op} node '{name}': FP8 weights run with the fused strategy only")
    if len(inputs) != expected:
        raise ValueError(f"{op} node '{name}': {len(inputs)} inputs, expected {expected}")
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"{op} node '{name}': top_k {top_k} outside [1, {MAX_TOP_K}] (the builder splits wider mixtures)")
    node = helper.make_node(op, inputs, [output], name=name, domain=DOMAIN)
    # in the plugin's field order (helper.make_node would sort them by name)
    node.attribute.extend(helper.make_attribute(k, float(fields[k]) if kind == "float" else int(fields[k]))
                          for k, kind in FIELDS)
    return node


def node_fields(node) -> dict:
    """Read a node's plugin fields back, checking they are exactly FIELDS with the right kinds."""
    from onnx import AttributeProto

    where = f"{node.op_type} node '{node.name}'"
    if node.op_type not in OP_TYPES or node.domain != DOMAIN:
        raise AdafuseError(f"{where}: op {node.domain}::{node.op_type}, expected {DOMAIN}::{' or '.join(OP_TYPES)}")
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
    expected = nb_inputs(out["has_bias"], out["weight_dtype"])
    if len(node.input) != expected:
        raise AdafuseError(f"{where}: {len(node.input)} inputs, expected {expected} (has_bias {out['has_bias']}, "
                           f"weight_dtype {out['weight_dtype']})")
    return out


def check_roundtrip(node, expected: dict) -> None:
    """The node's attributes equal `expected` (a FIELDS dict; a field of FIELD_DEFAULTS may be left out), field by field."""
    got = node_fields(node)
    for name, kind in FIELDS:
        want = expected[name] if name in expected else FIELD_DEFAULTS[name]
        ok = abs(got[name] - float(want)) <= 1e-6 * max(1.0, abs(float(want))) if kind == "float" else got[name] == int(want)
        if not ok:
            raise AdafuseError(f"{node.op_type} node '{node.name}': field '{name}' is {got[name]}, expected {want}")
