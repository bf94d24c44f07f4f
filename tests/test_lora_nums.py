"""HydraLoRA and LoRAMoE checkpoints in their authors' fork layouts: detected, converted, run by the reference and
compared with a float64 forward written from the forks' equations (tests/fixtures_forks.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from adafuse_export.converters import detect_format, load_checkpoint
from adafuse_export.reference import ReferenceModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_forks as ff  # noqa: E402
import fixtures_real as fr  # noqa: E402

IDS = torch.as_tensor(fr.SAMPLE_IDS)
FORMATS = {"hydralora": "hydralora", "loramoe": "loramoe-original"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return fr.write_hf_base(tmp_path_factory.mktemp("base") / "llama")


@pytest.mark.parametrize("layout,kwargs", [
    ("hydralora", {}),
    ("hydralora", {"target_modules": ff.ATTN_ORDER + ff.MLP_ORDER, "lora_nums": 4, "r": 8, "lora_alpha": 16, "blc": False}),
    ("loramoe", {}),
    ("loramoe", {"target_modules": ("q_proj", "v_proj", "down_proj"), "lora_nums": 2}),
], ids=["hydra-ffn", "hydra-all", "loramoe-ffn", "loramoe-qv-down"])
def test_reference_matches_float64_fork_forward(tmp_path, base, layout, kwargs):
    d = ff.write_fork_adapter(tmp_path / layout, base, layout, **kwargs)
    assert detect_format(d) == FORMATS[layout]
    ckpt = load_checkpoint(d)
    a = ckpt.adapter
    assert (a.routing, a.router_kind, a.num_experts, a.top_k) == ("layerwise", "dense", kwargs.get("lora_nums", 3),
                                                                  kwargs.get("lora_nums", 3))
    expected = ff.fork_forward_logits_f64(d, base, IDS)
    got = ReferenceModel(ckpt)(IDS).logits.double()
    assert (got - expected).abs().max().item() < 1e-4
    # the experts matter: the base alone is far from it
    assert (ReferenceModel(ckpt, adapters=False)(IDS).logits.double() - expected).abs().max().item() > 1e-2


def test_hydralora_shared_a_is_every_experts_a(tmp_path, base):
    d = ff.write_fork_adapter(tmp_path / "h", base, "hydralora")
    shared = torch.load(d / "adapter_model.bin", weights_only=True)["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"]
    A = load_checkpoint(d).adapters.get("layers.1.up_proj.lora_A")
    assert A.shape == (3,) + shared.shape and all(torch.equal(A[e], shared) for e in range(3))


def test_bfloat16_fork_checkpoint(tmp_path, base):
    d = ff.write_fork_adapter(tmp_path / "bf", base, "loramoe", dtype="bfloat16")
    got = ReferenceModel(load_checkpoint(d))(IDS).logits.double()
    assert (got - ff.fork_forward_logits_f64(d, base, IDS)).abs().max().item() < 1e-4


def _edit_bin(d: Path, edit) -> None:
    state = torch.load(d / "adapter_model.bin", weights_only=True)
    edit(state)
    torch.save(state, d / "adapter_model.bin")


def test_bad_fork_checkpoints(tmp_path, base, cli):
    prefix = "base_model.model.model.layers.0.mlp.gate_proj"
    d = ff.write_fork_adapter(tmp_path / "mixed", base, "hydralora")
    _edit_bin(d, lambda s: s.__setitem__(f"{prefix}.lora_A0.weight", s[f"{prefix}.lora_A.weight"]))
    r = cli("inspect", d)
    assert r.code == 2 and "both a shared 'lora_A' (HydraLoRA) and per-expert 'lora_A{i}' (LoRAMoE)" in r.err

    d = ff.write_fork_adapter(tmp_path / "missing", base, "loramoe")
    _edit_bin(d, lambda s: s.pop(f"{prefix}.lora_B2.weight"))
    r = cli("inspect", d)
    assert r.code == 2 and f"missing tensor '{prefix}.lora_B2.weight' (lora_nums is 3" in r.err

    d = ff.write_fork_adapter(tmp_path / "rank", base, "hydralora", r=4)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    r = cli("inspect", d)
    assert r.code == 2 and "expected rank 8 (r in adapter_config.json)" in r.err

    d = ff.write_fork_adapter(tmp_path / "fan", base, "loramoe")
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": True}))
    r = cli("inspect", d)
    assert r.code == 2 and "'fan_in_fan_out: true' is not supported (expected false)" in r.err

    r = cli("inspect", ff.write_fork_adapter(tmp_path / "force", base, "loramoe"), "--format", "hydralora")
    assert r.code == 2 and "a hydralora adapter needs one shared lora_A per linear, found the LoRAMoE layout" in r.err


def test_hydralora_convert_and_validate(tmp_path, base, cli):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is installed by .ci/run; its builder runs on the CPU")
    d = ff.write_fork_adapter(tmp_path / "h", base, "hydralora", target_modules=("q_proj", "v_proj", "down_proj"))
    engine = tmp_path / "h.engine"
    r = cli("convert", d, engine, "--dtype", "float32", "--max-batch", "1", "--max-seq", "32")
    assert r.code == 0, r.err
    r = cli("validate", d, tmp_path / "h.onnx")
    assert r.code == 0 and "PASS" in r.out, r.out + r.err
