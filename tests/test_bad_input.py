"""Broken checkpoints: each gets one line naming the file/tensor, expected vs found, exit 2."""
from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from adafuse_export.checkpoint import ADAPTER_CONFIG, ADAPTERS


def rewrite_adapters(path, change):
    tensors = load_file(path / ADAPTERS)
    change(tensors)
    save_file(tensors, path / ADAPTERS)


def rewrite_config(path, change, name=ADAPTER_CONFIG):
    cfg = json.loads((path / name).read_text())
    change(cfg)
    (path / name).write_text(json.dumps(cfg))


def expect_error(cli, path, *fragments, command="inspect"):
    r = cli(command, path, *(["--prompt-ids", "1"] if command == "run" else []))
    assert r.code == 2, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    for f in fragments:
        assert f in lines[0], lines[0]
    assert r.out == ""
    return lines[0]


def test_missing_directory(cli, tmp_path):
    expect_error(cli, tmp_path / "absent", f"{tmp_path / 'absent'}: checkpoint directory not found")


def test_checkpoint_is_a_file(cli, tmp_path):
    (tmp_path / "f").write_text("x")
    expect_error(cli, tmp_path / "f", "expected a checkpoint directory, found a file")


def test_missing_adapter_file(cli, example_copy):
    p = example_copy()
    (p / ADAPTERS).unlink()
    expect_error(cli, p, f"{p / ADAPTERS}: file not found")


def test_missing_base_config(cli, example_copy):
    p = example_copy()
    (p / "config.json").unlink()
    expect_error(cli, p, f"{p / 'config.json'}: file not found")


def test_truncated_safetensors(cli, example_copy):
    p = example_copy()
    data = (p / ADAPTERS).read_bytes()
    (p / ADAPTERS).write_bytes(data[: len(data) - 100])
    expect_error(cli, p, str(p / ADAPTERS), "lie outside", "truncated")


def test_tiny_safetensors(cli, example_copy):
    p = example_copy()
    (p / ADAPTERS).write_bytes(b"\x01\x02")
    expect_error(cli, p, "truncated safetensors file: 2 bytes, expected at least 8")


def test_corrupt_safetensors_header(cli, example_copy):
    p = example_copy()
    junk = b"{not json!"
    (p / ADAPTERS).write_bytes(struct.pack("<Q", len(junk)) + junk)
    expect_error(cli, p, str(p / ADAPTERS), "corrupt safetensors header")


def test_missing_tensor(cli, example_copy):
    p = example_copy()
    rewrite_adapters(p, lambda t: t.pop("layers.1.k_proj.lora_B"))
    expect_error(cli, p, "missing tensor 'layers.1.k_proj.lora_B'", "expected shape [4, 32, 8]")


def test_wrong_shape(cli, example_copy):
    p = example_copy()
    rewrite_adapters(p, lambda t: t.update({"layers.0.q_proj.lora_A": torch.randn(3, 8, 64)}))
    expect_error(cli, p, "tensor 'layers.0.q_proj.lora_A' has shape [3, 8, 64], expected [4, 8, 64]")


def test_wrong_dtype(cli, example_copy):
    p = example_copy()
    rewrite_adapters(p, lambda t: t.update({"pregate.weight": torch.ones(4, 64, dtype=torch.int32)}))
    expect_error(cli, p, "tensor 'pregate.weight' has dtype I32, expected one of F32, F16, BF16")


def test_inconsistent_expert_ranks(cli, example_copy):
    p = example_copy()
    rewrite_adapters(p, lambda t: t.update({"layers.0.v_proj.lora_B": torch.randn(4, 32, 4)}))
    expect_error(cli, p, "'layers.0.v_proj.lora_B' has rank 4 but 'layers.0.v_proj.lora_A' has rank 8")


def test_adapter_dims_do_not_match_base(cli, example_copy):
    p = example_copy()
    rewrite_adapters(p, lambda t: t.update({"layers.1.down_proj.lora_A": torch.randn(4, 8, 64)}))
    expect_error(cli, p, "'layers.1.down_proj.lora_A' has shape [4, 8, 64], expected [4, 8, 96]", "in_features of down_proj")


def test_top_k_larger_than_experts(cli, example_copy):
    p = example_copy()
    rewrite_config(p, lambda c: c.update(top_k=5))
    expect_error(cli, p, str(p / ADAPTER_CONFIG), "top_k 5 is larger than num_experts 4")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_router(cli, example_copy, value):
    p = example_copy("mola")
    def poison(t):
        t["layers.1.v_proj.router.weight"][2, 3] = value
    rewrite_adapters(p, poison)
    expect_error(cli, p, "tensor 'layers.1.v_proj.router.weight' has 1 NaN/Inf values")


def test_unknown_format(cli, tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    msg = expect_error(cli, tmp_path, "unknown checkpoint layout", "registered formats: adafuse, peft-lora, moe-peft")
    assert "--format" in msg


def test_unknown_format_option(cli, example_dirs):
    r = cli("inspect", example_dirs["pregate"], "--format", "gguf")
    assert r.code == 2 and "--format 'gguf' is unknown" in r.err


def test_wrong_config_types(cli, example_copy):
    p = example_copy()
    rewrite_config(p, lambda c: c.update(hidden_size="64"), name="config.json")
    expect_error(cli, p, "config.json: key 'hidden_size' must be int, found str '64'")


def test_prompt_out_of_vocabulary(cli, example_dirs):
    r = cli("run", example_dirs["pregate"], "--prompt-ids", "1,999")
    assert r.code == 2 and "token id 999 is out of the vocabulary [0, 256)" in r.err


def test_bad_prompt_syntax(cli, example_dirs):
    r = cli("run", example_dirs["pregate"], "--prompt-ids", "1,x")
    assert r.code == 2 and "--prompt-ids: expected comma-separated integers" in r.err
