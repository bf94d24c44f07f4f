"""summary.adapter_summary: every output describes the adapter the way the checkpoint's own
adafuse_config.json (read here as plain JSON) says, with the same keys the readers expect."""
from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest

from adafuse_export.converters import load_checkpoint
from adafuse_export.onnx.export import export_onnx
from adafuse_export.trt.backends import Backend
from adafuse_export.trt.manifest import make_manifest, manifest_meta
from adafuse_export.validate import check_compatible

ROOT = Path(__file__).resolve().parents[1]
ENGINE_ROUTING_KEYS = ["kind", "router_kind", "expert_kind", "num_experts", "top_k", "normalize_topk", "pregate_input",
                       "routes_file", "pregate_graph"]


def expected_routing(config: dict) -> dict:
    """The routing contract from adafuse_config.json (docs/checkpoint-format.md): router_kind applies to
    layerwise routing only, pregate_input to pre-gated routing only."""
    return {"routing": config["routing"], "router_kind": config["router_kind"] if config["routing"] == "layerwise" else None,
            "expert_kind": config["expert_kind"], "num_experts": config["num_experts"], "top_k": config["top_k"],
            "pregate_input": config["pregate_input"] if config["routing"] == "pregate" else None}


@pytest.mark.parametrize("kind", ["pregate", "mola", "mixlora"])
def test_every_output_carries_the_checkpoints_routing(kind, example_dirs, tmp_path, cli):
    config = json.loads((example_dirs[kind] / "adafuse_config.json").read_text())
    want = expected_routing(config)
    as_meta = {f"adafuse.{k}": "-" if v is None else str(v) for k, v in want.items()}

    info = json.loads(cli("inspect", example_dirs[kind], "--json").out)["adapter"]
    assert {k: info[k] for k in want} == want
    assert info["normalize_topk"] == config["normalize_topk"] and info["r"] == config["r"]
    assert info["target_modules"] == config["target_modules"] and info["static_modules"] == config["static_modules"]

    ckpt = load_checkpoint(example_dirs[kind])
    onnx_dir = tmp_path / "x.onnx"
    manifest = export_onnx(ckpt, onnx_dir, "plugin", "float32")
    assert json.loads((onnx_dir / "manifest.json").read_text())["adapter"] == {
        **want, "pregate_location": manifest["adapter"]["pregate_location"],
        "static_modules_merged": config["static_modules"], "routed_modules": config["target_modules"]}
    meta = {p.key: p.value for p in onnx.load(str(onnx_dir / "decoder.onnx"), load_external_data=False).metadata_props}
    assert {k: meta[k] for k in as_meta} == as_meta

    engine = tmp_path / "engine"
    engine.write_bytes(b"stand-in")
    em = make_manifest(engine_file=engine, engine_name="x.engine", onnx_dir=onnx_dir, onnx_dir_name="x.onnx",
                       onnx_manifest=manifest, backend=Backend("tensorrt", None, "stand-in"),
                       io={"inputs": [], "outputs": [], "profiles": []}, dtype="float32", max_batch=1, max_seq=8,
                       checkpoint=ckpt)
    assert list(em["routing"]) == ENGINE_ROUTING_KEYS
    assert {"routing" if k == "kind" else k: v for k, v in em["routing"].items() if k in ENGINE_ROUTING_KEYS[:7]} == {
        **want, "normalize_topk": config["normalize_topk"]}
    engine_meta = manifest_meta(em)
    assert {k: engine_meta[k] for k in as_meta} == as_meta


def test_engine_manifest_has_every_routing_key_the_cpp_runtime_reads():
    source = (ROOT / "runtime" / "src" / "manifest.cpp").read_text()
    read = set(re.findall(r'\{"routing", "(\w+)"\}', source))
    assert read and read <= set(ENGINE_ROUTING_KEYS)


def test_validate_refuses_a_graph_recording_another_routing(example_dirs, exported_meta_runner):
    ckpt, info = exported_meta_runner
    assert check_compatible(ckpt, info) == []
    info.meta["adafuse.top_k"] = "3"
    with pytest.raises(Exception, match="top_k is 3 in the model, 2 in the checkpoint"):
        check_compatible(ckpt, info)


@pytest.fixture
def exported_meta_runner(example_dirs, tmp_path):
    from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner

    ckpt = load_checkpoint(example_dirs["mola"])
    export_onnx(ckpt, tmp_path / "m.onnx", "portable", "float32")
    return ckpt, OnnxRuntimeRunner(tmp_path / "m.onnx").info


def test_relative_error_ignores_near_zero_references_and_top1_counts_positions():
    """A reference of 1e-7 missed by 1e-3 is no relative error of 10^4 (the reports showed 1.9e+03 beside
    PASSED); positions count toward top-1 agreement when the runner's largest logit is the reference's."""
    import numpy as np

    from adafuse_export.validate import _Stat

    want = np.array([[[1e-7, 2.0, -3.0, 0.5], [4.0, 1e-7, 0.0, -1.0]]], np.float32)  # [B, S, vocab]
    got = want + np.array([[[1e-3, 2e-3, 0.0, 0.0], [-2e-3, 1e-3, 1e-3, 0.0]]], np.float32)
    got[0, 1, 2] = 5.0  # the second position's top-1 now differs (and is far out of tolerance)
    stat = _Stat("logits", 1e-2, 0.0)
    stat.add(got, want, "prefill")
    r = stat.report()
    assert r["top1"] == {"matched": 1, "total": 2}
    # |reference| >= 1% of 4.0: the worst is 2.0 off by 2e-3; the 5.0 written over a reference of 0.0 and the
    # 1e-7 references are counted out of tolerance or ignored, not divided by
    assert r["max_rel_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert r["mismatched"] == 1 and r["elements"] == 8
    small = _Stat("logits", 1e-2, 0.0)
    small.add(want + 1e-3, want, "prefill")
    assert small.report()["max_rel_diff"] == pytest.approx(1e-3 / 0.5, rel=1e-3)  # not 1e-3 / 1e-7
