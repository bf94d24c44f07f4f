"""export-onnx / validate through the CLI, and bad input: one-line errors, exit codes, no partial output."""
from __future__ import annotations

import json

import pytest

from adafuse_export.examples import make_example


def one_line_error(r, code=2):
    assert r.code == code, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    return lines[0]


@pytest.fixture(scope="module")
def exported(example_dirs, tmp_path_factory):
    """CLI exports: pregate and mola (portable), pregate (plugin)."""
    from adafuse_export.cli import main

    root = tmp_path_factory.mktemp("cli-onnx")
    out = {}
    for kind, flavour in (("pregate", "portable"), ("mola", "portable"), ("pregate", "plugin")):
        out[kind, flavour] = root / f"{kind}-{flavour}"
        assert main(["export-onnx", str(example_dirs[kind]), str(out[kind, flavour]), "--flavour", flavour]) == 0
    return out


def test_export_and_validate_table(cli, example_dirs, tmp_path):
    r = cli("export-onnx", example_dirs["pregate-ffn"], tmp_path / "o")
    assert r.code == 0, r.err
    assert "decoder " in r.out and "pregate " not in r.out  # pre-gate computed inside the decoder
    r = cli("validate", example_dirs["pregate-ffn"], tmp_path / "o" / "decoder.onnx", "--steps", "16", "--prompt-ids", "1,2,3")
    assert r.code == 0, r.out + r.err
    assert "greedy agreement: 17/17 (100.0%)" in r.out and r.out.strip().endswith("PASSED")
    for name in ("logits", "present.1.value", "expert_ids", "gates"):
        assert any(line.startswith(name) and line.endswith("PASS") for line in r.out.splitlines()), name


def test_validate_json_and_failure_exit_1(cli, example_dirs, exported):
    r = cli("validate", example_dirs["mola"], exported["mola", "portable"], "--json", "--steps", "2",
            "--prompt-ids", "5,6", "--prompt-ids", "9")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["passed"] and report["prompts"] == [[5, 6], [9]] and report["greedy_agreement"]["total"] == 6
    assert {o["name"] for o in report["outputs"]} == {"logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"}
    r = cli("validate", example_dirs["mola"], exported["mola", "portable"], "--atol", "0", "--rtol", "0", "--steps", "1")
    assert r.code == 1 and "FAIL" in r.out and r.out.strip().endswith("FAILED"), (r.code, r.out)


def test_overwrite_needs_force(cli, example_dirs, exported):
    out = exported["mola", "portable"]
    before = sorted(p.name for p in out.iterdir())
    line = one_line_error(cli("export-onnx", example_dirs["mola"], out))
    assert line == f"error: {out}: directory is not empty; pass --force to overwrite"
    assert sorted(p.name for p in out.iterdir()) == before


def test_strategy_is_the_native_backends(cli, example_dirs, exported, tmp_path):
    """--strategy chooses the native backend's strategy: an ONNX export or an engine has none to choose."""
    line = one_line_error(cli("validate", example_dirs["pregate"], exported["pregate", "plugin"], "--strategy", "switch"))
    assert line == (f"error: --strategy switch: chooses the native backend's strategy; {exported['pregate', 'plugin']} is "
                    "not a native artifact (an engine's strategy is fixed when it is built: convert --strategy)")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0")
    line = one_line_error(cli("validate", example_dirs["pregate"], engine, "--runtime", "cpp", "--strategy", "switch"))
    assert line.startswith("error: --strategy switch: chooses the native backend's strategy; ")


def test_model_from_another_checkpoint(cli, example_dirs, exported):
    line = one_line_error(cli("validate", example_dirs["mola"], exported["pregate", "portable"]))
    assert "model does not match checkpoint" in line and "'expert_ids'/'gates' decoder inputs is present in the model" in line
    line = one_line_error(cli("validate", example_dirs["loramoe"], exported["mola", "portable"]))
    assert "router_kind is topk in the model, dense in the checkpoint" in line


def test_model_with_other_vocab_and_layers(cli, exported, tmp_path):
    small = tmp_path / "small"
    make_example(small, "pregate", config={"vocab_size": 128})
    line = one_line_error(cli("validate", small, exported["pregate", "portable"]))
    assert "the vocabulary size (logits) is 256 in the model, 128 in the checkpoint" in line
    deep = tmp_path / "deep"
    make_example(deep, "pregate", config={"num_hidden_layers": 3})
    line = one_line_error(cli("validate", deep, exported["pregate", "portable"]))
    assert "the number of layers (past_key_values inputs) is 2 in the model, 3 in the checkpoint" in line


def test_not_onnx(cli, example_dirs, tmp_path):
    for content in (b"hello, I am not a model\n", b"\x00\xff" * 50, b""):
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(content)
        line = one_line_error(cli("validate", example_dirs["pregate"], bad))
        assert line.startswith(f"error: {bad}: not an ONNX model"), line


def test_missing_model_and_empty_dir(cli, example_dirs, tmp_path):
    line = one_line_error(cli("validate", example_dirs["pregate"], tmp_path / "absent"))
    assert line == f"error: {tmp_path / 'absent'}: model file or directory not found"
    (tmp_path / "empty").mkdir()
    line = one_line_error(cli("validate", example_dirs["pregate"], tmp_path / "empty"))
    assert "no decoder.onnx in this directory" in line


def test_prompt_out_of_vocabulary(cli, example_dirs, exported):
    line = one_line_error(cli("validate", example_dirs["pregate"], exported["pregate", "portable"], "--prompt-ids", "1,256"))
    assert "--prompt-ids: token id 256 is out of the vocabulary [0, 256)" in line
    line = one_line_error(cli("validate", example_dirs["pregate"], exported["pregate", "portable"], "--prompt-ids", "1,x"))
    assert "--prompt-ids: expected comma-separated integers" in line


def test_missing_external_data(cli, example_dirs, tmp_path):
    out = tmp_path / "ext"
    r = cli("export-onnx", example_dirs["pregate"], out, "--external-data-threshold", "1000")
    assert r.code == 0 and "+ decoder.onnx.data" in r.out, r.err
    (out / "decoder.onnx.data").unlink()
    line = one_line_error(cli("validate", example_dirs["pregate"], out))
    assert line.startswith(f"error: {out / 'decoder.onnx'}: external data file 'decoder.onnx.data'") and "is missing" in line
    (out / "decoder.onnx.data").write_bytes(b"\0" * 10)
    line = one_line_error(cli("validate", example_dirs["pregate"], out))
    assert "is truncated" in line


def test_plugin_flavour_runs_in_onnxruntime(cli, example_dirs, exported):
    # its adafuse nodes run as ONNX Runtime custom ops (tests/test_plugin_graph.py tests them in depth)
    r = cli("validate", example_dirs["pregate"], exported["pregate", "plugin"], "--steps", "2")
    assert r.code == 0 and r.out.strip().endswith("PASSED"), r.out + r.err
    assert "plugin flavour; plugin ops: 14 adafuse nodes (AdafuseLoraLinear)" in r.out


def test_engine_is_not_an_onnx_model(cli, example_dirs, tmp_path):
    # a bare .engine (no manifest, no TensorRT here) gets a one-line error, never an ONNX parse attempt
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0")
    line = one_line_error(cli("validate", example_dirs["pregate"], engine))
    assert "not an ONNX model" not in line


def test_broken_checkpoint_leaves_no_output(cli, example_copy, tmp_path):
    src = example_copy("pregate")
    (src / "adafuse_adapters.safetensors").write_bytes(b"\x10\x00")
    out = tmp_path / "never"
    one_line_error(cli("export-onnx", src, out))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [src.name]


def test_export_parent_missing(cli, example_dirs, tmp_path):
    line = one_line_error(cli("export-onnx", example_dirs["pregate"], tmp_path / "no" / "out"))
    assert "parent directory" in line and "does not exist" in line


def test_help_lists_commands(cli):
    r = cli("--help")
    assert r.code == 0 and "export-onnx" in r.out and "validate" in r.out
    r = cli("validate", "--help")
    assert r.code == 0 and "--atol" in r.out and "--json" in r.out


def test_missing_onnxruntime_hint(cli, example_dirs, exported, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    line = one_line_error(cli("validate", example_dirs["pregate"], exported["pregate", "portable"]))
    assert "needs the Python package 'onnxruntime'" in line and "pip install 'adafuse-export[onnx]'" in line
