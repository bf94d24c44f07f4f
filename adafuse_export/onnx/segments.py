"""Cut an exported decoder graph into per-layer subgraphs, so ONNX Runtime can run (and map the weights
of) one layer at a time.

Segments, in order: 0 the prologue (embeddings, rotary tables, route inputs), 1..L one per decoder
layer, L+1 the head (final norm, lm_head). Every node goes to the latest segment among those of its
inputs, where a segment is given by
  - a weight named for layer l (`model.layers.{l}.*`, adapter `layers.{l}.*`): segment l+1;
  - `model.norm.weight`, `lm_head.weight`: the head; a tied head reads the embeddings, so its final
    norm is what puts it there;
  - a graph input `past_key_values.{l}.*`: segment l+1; every other graph input: segment 0.
Other initializers (embeddings, constants, the pre-gate) and the nodes computing only from them
belong to no segment: each segment that reads them takes its own copy (an initializer then still
points at the same external data, so nothing is duplicated on disk or read twice in one segment).
A segment's inputs are the graph inputs and earlier segments' values it reads; its outputs are the
values later segments read and the graph outputs it produces. Running the segments in order with
those values carried between them computes exactly the nodes of the whole graph.

Segment models are made from the graph header (onnx.load(load_external_data=False)): initializers
keep their external-data references, relative to the decoder's folder. Their inputs are declared
with the dtypes of the values fed to them (known once the first step has run the earlier segments).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import AdafuseError

_PAST = re.compile(r"past_key_values\.(\d+)\.")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
HEAD_WEIGHTS = ("model.norm.weight", "lm_head.weight")


@dataclass
class Segment:
    name: str
    nodes: list = field(default_factory=list)  # NodeProtos, in graph order
    initializers: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def split_layers(model, num_layers: int) -> list[Segment]:
    """The segments of a decoder ModelProto (header only is enough) with `num_layers` layers."""
    g = model.graph
    head = num_layers + 1
    inits = {t.name: t for t in g.initializer}
    seg_of: dict[str, int | None] = {}  # tensor -> segment, None: free (constants and what derives from them)
    for v in g.input:
        m = _PAST.match(v.name)
        seg_of[v.name] = int(m.group(1)) + 1 if m else 0
    for name in inits:
        m = _LAYER.search(name)
        seg_of[name] = int(m.group(1)) + 1 if m else head if name in HEAD_WEIGHTS else None
    producer: dict[str, int] = {}
    node_seg: list[int | None] = []
    for i, node in enumerate(g.node):
        if any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
            raise AdafuseError(f"node '{node.name}' ({node.op_type}) has a subgraph: the decoder cannot be cut into layers")
        segs: list[int] = []
        for t in node.input:
            if not t:
                continue
            if t not in seg_of:
                raise AdafuseError(f"node '{node.name}' reads '{t}' before any node produces it: the graph is not in "
                                   f"topological order")
            owner = seg_of[t]
            if owner is not None:
                segs.append(owner)
        s = max(segs) if segs else None
        if s is not None and s > head:
            raise AdafuseError(f"node '{node.name}' belongs to segment {s}, beyond the {num_layers} layers")
        node_seg.append(s)
        for t in node.output:
            seg_of[t] = s
            producer[t] = i

    segments = [Segment("prologue")] + [Segment(f"layer {l}") for l in range(num_layers)] + [Segment("head")]
    for s, seg in enumerate(segments):
        members = {i for i, ns in enumerate(node_seg) if ns == s}
        # free nodes this segment reads, transitively
        stack = [t for i in members for t in g.node[i].input if t and seg_of.get(t, 0) is None and t in producer]
        while stack:
            i = producer[stack.pop()]
            if i not in members:
                members.add(i)
                stack += [t for t in g.node[i].input if t and seg_of.get(t, 0) is None and t in producer]
        seg.nodes = [g.node[i] for i in sorted(members)]
        made = {t for n in seg.nodes for t in n.output}
        read = list(dict.fromkeys(t for n in seg.nodes for t in n.input if t))
        seg.initializers = [t for t in read if t in inits and t not in made]
        seg.inputs = [t for t in read if t not in inits and t not in made]

    graph_outputs = {o.name for o in g.output}
    read_later: set[str] = set(graph_outputs)
    for index in reversed(range(len(segments))):
        seg = segments[index]  # copies of free nodes are not its own: each reader computes them
        seg.outputs = [t for n in seg.nodes for t in n.output if t in read_later and seg_of[t] == index]
        read_later |= set(seg.inputs)
    empty = [seg.name for seg in segments if not seg.nodes]
    if empty:
        raise AdafuseError(f"the {', '.join(empty)} segment has no nodes: the decoder cannot be cut into layers")
    missing = graph_outputs - {t for seg in segments for t in seg.outputs}
    if missing:
        raise AdafuseError(f"graph outputs {', '.join(sorted(missing))} are computed from constants alone: "
                           f"the decoder cannot be cut into layers")
    return segments


def segment_model(model, seg: Segment, input_types: Mapping[str, int]):
    """A runnable ModelProto for `seg`: its nodes, its initializers (external references kept), inputs
    declared with `input_types` (ONNX element types of the values fed), outputs typed by ONNX Runtime."""
    from onnx import helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    inputs = [helper.make_tensor_value_info(t, input_types[t], None) for t in seg.inputs]
    outputs = [helper.make_empty_tensor_value_info(t) for t in seg.outputs]
    graph = helper.make_graph(seg.nodes, f"{g.name}/{seg.name}", inputs, outputs, [inits[t] for t in seg.initializers])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub
