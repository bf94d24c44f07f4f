"""Plugin-flavour export: --strategy fused|switch picks the op of every adapter site, the manifests
record it, the kernels' limits are the header's and are enforced at export, and a mixture wider
than the kernels' top-k is split exactly (checked by executing the graph, custom ops included, with
ONNX's reference evaluator against the PyTorch reference)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from adafuse_export.converters import load_checkpoint
from adafuse_export.errors import AdafuseError
from adafuse_export.examples import make_example
from adafuse_export.onnx import plugin_ops
from adafuse_export.onnx.export import export_onnx
from adafuse_export.trt.backends import Backend
from adafuse_export.trt.manifest import make_manifest, manifest_meta, verify_engine, write_manifest

HEADER = Path(__file__).resolve().parents[1] / "plugins" / "kernels" / "include" / "adafuse_kernels.h"


def test_limits_are_the_kernel_headers():
    defines = dict(re.findall(r"^#define (ADAFUSE_\w+) (\d+)\b", HEADER.read_text(), re.M))
    assert int(defines["ADAFUSE_MAX_TOP_K"]) == plugin_ops.MAX_TOP_K
    assert int(defines["ADAFUSE_LORA_MAX_EXPERTS"]) == plugin_ops.MAX_EXPERTS
    assert int(defines["ADAFUSE_LORA_MAX_RANK"]) == plugin_ops.MAX_RANK


def _adapter_nodes(path: Path) -> list:
    return [n for n in onnx.load(str(path / "decoder.onnx")).graph.node if n.domain == plugin_ops.DOMAIN]


@pytest.mark.parametrize("strategy, op", [(None, "AdafuseLoraLinear"), ("fused", "AdafuseLoraLinear"),
                                          ("switch", "AdafuseSwitchLinear")])
def test_strategy_picks_the_op_and_is_recorded(strategy, op, example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs["pregate"])
    manifest = export_onnx(ckpt, tmp_path / "p", "plugin", "float32", strategy=strategy)
    nodes = _adapter_nodes(tmp_path / "p")
    assert len(nodes) == 2 * 7 and {n.op_type for n in nodes} == {op}
    for n in nodes:  # one field contract for both ops
        fields = plugin_ops.node_fields(n)
        assert [a.name for a in n.attribute] == [name for name, _ in plugin_ops.FIELDS]
        assert (fields["num_experts"], fields["rank"], fields["top_k"], fields["has_bias"]) == (4, 8, 2, 0)
        assert fields["scale"] == pytest.approx(2.0)  # lora_alpha 16 / r 8
        assert n.name.endswith(f"/{op}") and len(n.input) == 6
    assert manifest["custom_ops"]["op_type"] == op and manifest["custom_ops"]["strategy"] == (strategy or "fused")
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "p" / "decoder.onnx"), load_external_data=False).metadata_props}
    assert meta["adafuse.strategy"] == (strategy or "fused")


def test_engine_manifest_records_the_plugin(example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs["mola"])
    onnx_dir = tmp_path / "m.onnx"
    onnx_manifest = export_onnx(ckpt, onnx_dir, "plugin", "float16", strategy="switch")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"serialized engine bytes")  # full TensorRT builds plugin engines; none here
    io = {"inputs": [], "outputs": [], "profiles": []}
    manifest = make_manifest(engine_file=engine, engine_name=engine.name, onnx_dir=onnx_dir, onnx_dir_name=onnx_dir.name,
                             onnx_manifest=onnx_manifest, backend=Backend("tensorrt", None, "10.14"), io=io,
                             dtype="float16", max_batch=1, max_seq=64, checkpoint=ckpt)
    assert manifest["plugin"]["name"] == "AdafuseSwitchLinear" and manifest["plugin"]["strategy"] == "switch"
    write_manifest(manifest, engine.with_suffix(".json"))
    assert verify_engine(engine)["plugin"]["name"] == "AdafuseSwitchLinear"
    assert manifest_meta(manifest)["adafuse.strategy"] == "switch"
    manifest["plugin"]["name"] = "AdafuseBogusLinear"
    write_manifest(manifest, engine.with_suffix(".json"))
    with pytest.raises(AdafuseError, match="engine needs plugin 'AdafuseBogusLinear', this adafuse-export provides "
                                           "AdafuseLoraLinear and AdafuseSwitchLinear"):
        verify_engine(engine)


def test_bad_strategy_is_a_clear_error(cli, example_dirs, tmp_path):
    ckpt = load_checkpoint(example_dirs["pregate"])
    with pytest.raises(AdafuseError, match="--strategy 'merge' is unknown \\(expected one of fused, switch\\)"):
        export_onnx(ckpt, tmp_path / "a", "plugin", strategy="merge")
    r = cli("export-onnx", example_dirs["pregate"], tmp_path / "b", "--strategy", "switch")
    assert r.code == 2 and r.err.strip().splitlines() == [
        "error: --strategy switch: only the plugin flavour has plugin nodes to choose (export-onnx --flavour plugin, "
        "convert --backend tensorrt); found flavour 'portable'"]
    assert not (tmp_path / "b").exists()
    r = cli("export-onnx", example_dirs["pregate"], tmp_path / "c", "--flavour", "plugin", "--strategy", "merge")
    assert r.code == 2 and "'merge' is not one of 'fused', 'switch'" in r.err
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is installed by .ci/run")
    r = cli("convert", example_dirs["pregate"], tmp_path / "d.engine", "--backend", "tensorrt-rtx", "--strategy", "switch")
    assert r.code == 2 and "--strategy switch: only the plugin flavour has plugin nodes to choose" in r.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("num_experts, r, what", [(257, 4, "experts is 257"), (4, 4097, "rank is 4097")])
def test_kernel_limits_are_refused_at_export(num_experts, r, what, tmp_path):
    make_example(tmp_path / "ckpt", "mola", num_experts=num_experts, r=r)
    ckpt = load_checkpoint(tmp_path / "ckpt")
    limit = {"experts": "256 (ADAFUSE_LORA_MAX_EXPERTS)", "rank": "4096 (ADAFUSE_LORA_MAX_RANK)"}[what.split()[0]]
    with pytest.raises(AdafuseError, match=re.escape(f"{tmp_path / 'ckpt'}: adapter site layers.0.q_proj: "
                                                     f"{what}, but the adafuse plugin kernels take at most {limit}; "
                                                     "export with --flavour portable")):
        export_onnx(ckpt, tmp_path / "out", "plugin")
    assert not (tmp_path / "out").exists()
    export_onnx(ckpt, tmp_path / "portable", "portable")  # the option the message names works


def test_expert_id_contract():
    plugin_ops.check_expert_ids(np.array([[0, 3], [2, 1]]), 4, "table")
    with pytest.raises(AdafuseError, match=r"table: expert id -1 is out of range \[0, 4\) \(2 of 4 ids\)"):
        plugin_ops.check_expert_ids(np.array([[0, -1], [4, 1]]), 4, "table")


def test_routing_table_producers_check_ids(cli, example_dirs, tmp_path, monkeypatch):
    from adafuse_export import native_artifact
    from adafuse_export.reference import model as reference_model

    real = reference_model.routing_table

    def off_by_one(*args, **kwargs):
        ids, gates = real(*args, **kwargs)
        return ids + 1, gates  # expert 3 of 4 becomes 4

    monkeypatch.setattr(reference_model, "routing_table", off_by_one)
    r = cli("export-routes", example_dirs["pregate"], tmp_path / "r.safetensors")
    assert r.code == 2 and r.err.startswith(f"error: {example_dirs['pregate']}: routing table 'expert_ids': expert id 4 "
                                            "is out of range [0, 4)")
    assert list(tmp_path.iterdir()) == []
    ckpt = load_checkpoint(example_dirs["pregate"])
    (tmp_path / "a.native").mkdir()
    with pytest.raises(AdafuseError, match=r"routing table 'expert_ids': expert id 4 is out of range \[0, 4\)"):
        native_artifact.write_artifact(ckpt, tmp_path / "a.native", "float32", max_batch=1, max_seq=16)


def _custom_op(name: str):
    """An op of the plugin contract for onnx.reference, in float64 (the formula of plugin_ops)."""
    from onnx.reference.op_run import OpRun

    def _run(self, x, W, A, B, ids, gates, bias=None, **fields):
        assert ids.shape[-1] == self.top_k <= plugin_ops.MAX_TOP_K and ids.min() >= 0 and ids.max() < self.num_experts
        x64 = x.astype(np.float64)
        y = x64 @ W.astype(np.float64).T + (0 if bias is None else bias)
        for j in range(ids.shape[-1]):
            e = ids[..., j]
            t = np.einsum("nri,ni->nr", A[e].astype(np.float64), x64)
            y = y + self.scale * gates[..., j:j + 1] * np.einsum("nor,nr->no", B[e].astype(np.float64), t)
        return (y.astype(x.dtype),)

    return type(name, (OpRun,), {"op_domain": plugin_ops.DOMAIN, "_run": _run})


@pytest.mark.parametrize("strategy", ["fused", "switch"])
def test_dense_mixture_wider_than_the_kernels_is_split_exactly(strategy, tmp_path):
    from onnx.reference import ReferenceEvaluator

    from adafuse_export.runners.reference import ReferenceRunner

    make_example(tmp_path / "ckpt", "loramoe", num_experts=12, seed=3)  # dense router: top-k = 12 > 8
    ckpt = load_checkpoint(tmp_path / "ckpt")
    export_onnx(ckpt, tmp_path / "p", "plugin", "float32", strategy=strategy)
    nodes = _adapter_nodes(tmp_path / "p")
    assert nodes and all(plugin_ops.node_fields(n)["top_k"] == plugin_ops.MAX_TOP_K for n in nodes)
    model = onnx.load(str(tmp_path / "p" / "decoder.onnx"))
    evaluator = ReferenceEvaluator(model, new_ops=[_custom_op(op) for op in plugin_ops.OP_TYPES])
    ids = np.array([[5, 17, 200, 3, 99]], np.int64)
    feeds = {"input_ids": ids, "past_lengths": np.array([0]), "seq_lens": np.array([5])}
    feeds.update({i.name: np.zeros((1, 2, 5, 16), np.float32) for i in model.graph.input if i.name.startswith("past_key")})
    logits = evaluator.run(["logits"], feeds)[0]
    want = ReferenceRunner(ckpt).prefill(ids).logits
    assert np.abs(logits - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    json.loads((tmp_path / "p" / "manifest.json").read_text())  # written completely
