"""The decoder's tensor contract is written once (adafuse_export/onnx/contract.py): the C++ runtime's header is
generated from it, and every exported graph declares exactly its tensors."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from adafuse_export.converters import load_checkpoint
from adafuse_export.onnx import contract
from adafuse_export.onnx.export import export_onnx
from adafuse_export.onnx.graph import ELEM_NAMES
from adafuse_export.trt.build import profile_shapes

ROOT = Path(__file__).resolve().parents[1]
# the manifest's dtype spelling (trt/manifest.py, runtime/src/manifest.h) of the graph's element types
MANIFEST_DTYPES = {"float32": "float", "int64": "int64", "int32": "int32"}


def test_the_cpp_header_is_generated_from_the_contract():
    header = ROOT / "runtime" / "src" / "decoder_contract.h"
    assert header.read_text() == contract.cpp_header(), (
        "runtime/src/decoder_contract.h is stale: python -m adafuse_export.onnx.contract > runtime/src/decoder_contract.h")


@pytest.mark.parametrize("kind, routes", [("pregate", "routes_in"), ("pregate-ffn", "routes_out"), ("mola", None)])
def test_exported_graphs_declare_the_contract(kind, routes, example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs[kind])
    export_onnx(ckpt, tmp_path / "onnx", "portable", "float32")
    graph = onnx.load(str(tmp_path / "onnx" / "decoder.onnx"), load_external_data=False).graph
    layers, m = ckpt.model.num_layers, ckpt.model
    fixed = {"kv_heads": m.num_kv_heads, "head_dim": m.head_dim, "vocab": m.vocab_size, "top_k": ckpt.adapter.top_k}
    for io, values in (("input", graph.input), ("output", graph.output)):
        want = []
        for t in contract.TENSORS:
            if t.io != io or t.when not in ("always", "per_layer", routes):
                continue
            names = [t.name.format(l=l) for l in range(layers)] if t.when == "per_layer" else [t.name]
            want += [(n, t.dtype, tuple(fixed.get(a, a) for a in t.shape)) for n in names]
        got = []
        for v in values:
            tt = v.type.tensor_type
            dtype = "model" if v.name.startswith((contract.PAST_PREFIX, contract.PRESENT_PREFIX)) else \
                MANIFEST_DTYPES[ELEM_NAMES[tt.elem_type]]
            axes = tuple(d.dim_param or d.dim_value for d in tt.shape.dim)
            got.append((v.name, dtype, axes))
        assert sorted(got) == sorted(want), io


def test_engine_profiles_bind_the_whole_cache():
    """Both profiles take a cache of max_seq positions (the C++ backend binds it whole), lengths per row [batch]."""
    kv = profile_shapes(contract.past_name(0, False), (-1, 2, -1, 16), 4, 64)
    assert [s[2] for p in ("prefill", "decode") for s in kv[p]] == [1, 64, 64, 1, 64, 64]
    lens = profile_shapes(contract.SEQ_LENS, (-1,), 4, 64)
    assert lens["prefill"] == [[1], [4], [4]] and lens["decode"] == [[1], [4], [4]]
    ids = profile_shapes(contract.INPUT_IDS, (-1, -1), 4, 64)
    assert ids["prefill"][2] == [4, 64] and ids["decode"][2] == [4, 1]
