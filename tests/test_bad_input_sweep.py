"""Every command against a table of broken inputs: non-zero exit, one line naming the input,
no traceback, nothing written."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from adafuse_export.checkpoint import ADAPTER_CONFIG, ADAPTERS


def _header_file(path: Path, header_text: bytes, data: bytes = b"", length: int | None = None):
    path.write_bytes(struct.pack("<Q", len(header_text) if length is None else length) + header_text + data)


def truncated_header(ckpt: Path):
    raw = (ckpt / ADAPTERS).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    (ckpt / ADAPTERS).write_bytes(raw[: 8 + n // 2])
    return ADAPTERS, "header length"


def header_longer_than_file(ckpt: Path):
    _header_file(ckpt / ADAPTERS, b'{"a": 1}', length=10_000)
    return ADAPTERS, "header length field exceeds the 8 bytes"


def duplicate_names(ckpt: Path):
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    _header_file(ckpt / ADAPTERS, f'{{"pregate.weight": {entry}, "pregate.weight": {entry}}}'.encode(), b"\0" * 4)
    return ADAPTERS, "duplicate tensor name 'pregate.weight'"


def unsupported_dtype(ckpt: Path):
    _header_file(ckpt / ADAPTERS, b'{"pregate.weight": {"dtype": "Q4_K", "shape": [1], "data_offsets": [0, 1]}}', b"\0")
    return ADAPTERS, "dtype 'Q4_K' is not supported"


def fp8_base_weight(ckpt: Path):
    import torch

    t = load_file(ckpt / "model.safetensors")
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.float8_e4m3fn)
    save_file(t, ckpt / "model.safetensors")
    return "model.safetensors", "'model.norm.weight' has dtype F8_E4M3, expected one of F32, F16, BF16"


def non_contiguous_shards(ckpt: Path):
    t = load_file(ckpt / "model.safetensors")
    names = sorted(t)
    half = len(names) // 2
    save_file({n: t[n] for n in names[:half]}, ckpt / "model-00001-of-00003.safetensors")
    save_file({n: t[n] for n in names[half:]}, ckpt / "model-00003-of-00003.safetensors")
    weight_map = {n: ("model-00001-of-00003.safetensors" if i < half else "model-00003-of-00003.safetensors")
                  for i, n in enumerate(names)}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (ckpt / "model.safetensors").unlink()
    return "model.safetensors.index.json", "shard index is not contiguous"


def adapter_config_edit(key, value, fragment):
    def make(ckpt: Path):
        cfg = json.loads((ckpt / ADAPTER_CONFIG).read_text())
        cfg[key] = value
        (ckpt / ADAPTER_CONFIG).write_text(json.dumps(cfg))
        return ADAPTER_CONFIG, fragment
    make.__name__ = f"{key}_{value}"
    return make


def non_utf8_config(ckpt: Path):
    (ckpt / "config.json").write_bytes(b'{"model_type": "ll\xffama"}')
    return "config.json", "not valid UTF-8"


def wrong_json_types(ckpt: Path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = [2]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return "config.json", "key 'num_hidden_layers' must be int, found list"


def json_not_object(ckpt: Path):
    (ckpt / ADAPTER_CONFIG).write_text("[1, 2]")
    return ADAPTER_CONFIG, "expected a JSON object, found list"


def symlink_loop(ckpt: Path):
    (ckpt / "config.json").unlink()
    os.symlink("config.json", ckpt / "config.json")
    return "config.json", "broken or looping symbolic link"


def directory_for_file(ckpt: Path):
    (ckpt / ADAPTERS).unlink()
    (ckpt / ADAPTERS).mkdir()
    return ADAPTERS, "expected a safetensors file, found a directory"


BROKEN = [
    truncated_header, header_longer_than_file, duplicate_names, unsupported_dtype, fp8_base_weight,
    non_contiguous_shards,
    adapter_config_edit("num_experts", 0, "num_experts must be positive, found 0"),
    adapter_config_edit("r", 0, "r must be positive, found 0"),
    adapter_config_edit("top_k", -1, "top_k must be positive, found -1"),
    adapter_config_edit("routing", 3, "key 'routing' must be str, found int"),
    non_utf8_config, wrong_json_types, json_not_object, symlink_loop, directory_for_file,
]

# Each command reading a checkpoint, with an output it would write (which must not appear).
COMMANDS = {
    "inspect": lambda ckpt, out: ["inspect", ckpt],
    "run": lambda ckpt, out: ["run", ckpt, "--prompt-ids", "1,2", "--save-logits", out / "logits.safetensors"],
    "convert": lambda ckpt, out: ["convert", ckpt, out / "model.engine", "--max-seq", "16"],
    "export-onnx": lambda ckpt, out: ["export-onnx", ckpt, out / "onnx"],
    "validate": lambda ckpt, out: ["validate", ckpt, out / "missing.onnx"],
    "export-routes": lambda ckpt, out: ["export-routes", ckpt, out / "routes.safetensors"],
}


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_size if p.is_file() else None)
            for p in sorted(path.rglob("*")) if not p.is_symlink()}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("breaker", BROKEN, ids=lambda f: f.__name__)
def test_broken_checkpoint(cli, example_dirs, tmp_path, command, breaker):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(example_dirs["pregate"], ckpt)
    culprit, fragment = breaker(ckpt)
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(tmp_path)
    r = cli(*COMMANDS[command](ckpt, out))
    assert r.code != 0
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert culprit in lines[0] and fragment in lines[0], lines[0]
    assert "Traceback" not in r.err
    assert snapshot(tmp_path) == before  # nothing written, nothing left behind


def test_convert_output_in_missing_directory(cli, example_dirs, tmp_path):
    r = cli("convert", example_dirs["pregate"], tmp_path / "no" / "such" / "m.engine")
    assert r.code == 2 and "output directory" in r.err and "does not exist" in r.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target,fragment", [
    ("missing/logits.safetensors", "output directory"),
    ("/proc/adafuse-test.safetensors", "cannot write in /proc"),
])
def test_unwritable_output(cli, example_dirs, tmp_path, target, fragment):
    dest = target if target.startswith("/") else str(tmp_path / target)
    r = cli("run", example_dirs["pregate"], "--prompt-ids", "1", "--save-logits", dest)
    assert r.code == 2 and fragment in r.err and dest in r.err
    assert not (tmp_path / "missing").exists()


def test_make_example_into_a_file_path(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    r = cli("make-example", tmp_path / "file" / "ex")
    assert r.code == 2 and str(tmp_path / "file") in r.err


def test_no_traceback_from_the_console_script(example_dirs, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(example_dirs["pregate"], ckpt)
    duplicate_names(ckpt)
    r = subprocess.run([sys.executable, "-m", "adafuse_export", "inspect", str(ckpt)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
