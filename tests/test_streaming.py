"""Large-checkpoint behaviour on small data: lazy reads, sharded streaming writes, routing-table export."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from adafuse_export import tensors
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


def pregate_table_float64(ckpt_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-gate of docs/checkpoint-format.md for every token id, in float64 from the raw files:
    softmax(W_g RMSNorm_0(embed(token)) + b), top-k, renormalised when normalize_topk."""
    config = json.loads((ckpt_dir / "config.json").read_text())
    adapter = json.loads((ckpt_dir / "adafuse_config.json").read_text())
    base = load_file(ckpt_dir / "model.safetensors")
    gate = load_file(ckpt_dir / "adafuse_adapters.safetensors")
    h = base["model.embed_tokens.weight"].double()
    x = h / torch.sqrt((h * h).mean(-1, keepdim=True) + config["rms_norm_eps"]) * base["model.layers.0.input_layernorm.weight"].double()
    scores = x @ gate["pregate.weight"].double().T + (gate["pregate.bias"].double() if "pregate.bias" in gate else 0)
    probs = torch.softmax(scores, -1)
    gates, ids = probs.topk(adapter["top_k"], -1)
    if adapter["normalize_topk"]:
        gates = gates / gates.sum(-1, keepdim=True)
    return ids, gates


def test_export_routes_is_the_pregate_formula(tmp_path, cli, example_dirs):
    out = tmp_path / "routes.safetensors"
    r = cli("export-routes", example_dirs["pregate"], out)
    assert r.code == 0, r.err
    t = load_file(out)
    ids, gates = pregate_table_float64(example_dirs["pregate"])
    assert t["expert_ids"].dtype == torch.int32 and t["gates"].dtype == torch.float32
    assert torch.equal(t["expert_ids"].long(), ids) and (t["gates"].double() - gates).abs().max().item() < 1e-6
    r = cli("export-routes", example_dirs["pregate"], out)
    assert r.code == 2 and "already exists" in r.err
    r = cli("export-routes", example_dirs["mixlora"], tmp_path / "x.safetensors")
    assert r.code == 2 and "no routing table: it has no pre-gate" in r.err and not (tmp_path / "x.safetensors").exists()
