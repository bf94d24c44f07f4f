"""Large-checkpoint behaviour on small data: lazy reads, sharded streaming writes, routing-table export."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from adafuse_export import tensors
from adafuse_export.converters import load_checkpoint
from adafuse_export.reference import ReferenceModel
from adafuse_export.tensors import SafetensorsSource, write_safetensors_streaming

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synthetic_checkpoint import write_synthetic  # noqa: E402


def test_streaming_writer_roundtrip(tmp_path):
    ts = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7, dtype=torch.int32), "c": torch.randn(0, 2)}
    entries = [(n, tensors.dtype_code(t.dtype), tuple(t.shape), (lambda t=t: t)) for n, t in ts.items()]
    write_safetensors_streaming(tmp_path / "x.safetensors", entries, {"k": "v"})
    src = SafetensorsSource([tmp_path / "x.safetensors"])
    assert all(torch.equal(src.get(n), t) for n, t in ts.items())
    assert all(torch.equal(load_file(tmp_path / "x.safetensors")[n], t) for n, t in ts.items())


def test_sharded_synthetic_checkpoint_inspects_without_reading_base_tensors(tmp_path, cli, monkeypatch):
    write_synthetic(tmp_path / "syn", "tiny", experts=4, rank=4, shard_bytes=20_000, log=lambda *_: None)
    assert len(list((tmp_path / "syn").glob("model-*-of-*.safetensors"))) > 2
    reads = []
    real_get = SafetensorsSource.get
    monkeypatch.setattr(SafetensorsSource, "get", lambda self, name: reads.append(name) or real_get(self, name))
    r = cli("inspect", tmp_path / "syn", "--json")
    assert r.code == 0, r.err
    assert reads == ["pregate.weight"]  # the router is checked for NaN/Inf; nothing else is read


def test_export_routes_is_the_reference_table(tmp_path, cli, example_dirs):
    out = tmp_path / "routes.safetensors"
    r = cli("export-routes", example_dirs["pregate"], out)
    assert r.code == 0, r.err
    t = load_file(out)
    ids, gates = ReferenceModel(load_checkpoint(example_dirs["pregate"])).routing_table()
    assert torch.equal(t["expert_ids"], ids) and torch.allclose(t["gates"], gates)
    r = cli("export-routes", example_dirs["pregate"], out)
    assert r.code == 2 and "already exists" in r.err
    r = cli("export-routes", example_dirs["mixlora"], tmp_path / "x.safetensors")
    assert r.code == 2 and "routing table needs a pre-gate" in r.err and not (tmp_path / "x.safetensors").exists()
