"""`convert`: checkpoint -> ONNX -> TensorRT-RTX engine (built on the CPU) + manifest, atomically."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from adafuse_export.errors import AdafuseError
from adafuse_export.trt import backends
from adafuse_export.trt.manifest import verify_engine

trt_rtx = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is installed by .ci/run; its builder runs on the CPU")


@pytest.mark.parametrize("kind", ["pregate", "pregate-ffn", "mola", "loramoe", "mixlora", "lora"])
def test_convert_every_example(cli, example_dirs, tmp_path, kind):
    engine = tmp_path / "out.engine"
    r = cli("convert", example_dirs[kind], engine, "--dtype", "float32", "--max-batch", "2", "--max-seq", "64")
    assert r.code == 0, r.err
    assert "[4/4" in r.out and "wrote" in r.out
    manifest = verify_engine(engine)
    assert manifest["engine"]["backend"] == "tensorrt-rtx" and manifest["engine"]["flavour"] == "portable"
    onnx_manifest = json.loads((tmp_path / "out.onnx" / "manifest.json").read_text())
    names = [i["name"] for i in manifest["tensors"]["inputs"]]
    assert names == [i["name"] for i in onnx_manifest["graphs"]["decoder"]["inputs"]]
    assert [p["name"] for p in manifest["profiles"]] == ["prefill", "decode"]
    decode = manifest["profiles"][1]["shapes"]
    assert decode["input_ids"] == [[1, 1], [2, 1], [2, 1]]
    assert decode["past_key_values.0.key"][2][2] == 64  # the whole cache (max_seq), bound by the runtime
    assert manifest["routing"]["kind"] == ("none" if kind == "lora" else "pregate" if "pregate" in kind else "layerwise")
    if kind == "pregate":
        assert manifest["routing"]["routes_file"] == "out.onnx/routes.safetensors"
    assert set(manifest["files"]) >= {"out.onnx/decoder.onnx", "out.onnx/manifest.json"}
    # the engine deserializes only on a GPU; the manifest is all a service needs to drive it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.engine", "out.json", "out.onnx"]


def test_refuses_to_overwrite_then_force(cli, example_dirs, tmp_path):
    engine = tmp_path / "m.engine"
    assert cli("convert", example_dirs["lora"], engine, "--max-seq", "32").code == 0
    first = engine.read_bytes()
    r = cli("convert", example_dirs["pregate"], engine, "--max-seq", "32")
    assert r.code == 2 and "already exists" in r.err and "--force" in r.err
    assert engine.read_bytes() == first
    assert cli("convert", example_dirs["pregate"], engine, "--max-seq", "32", "--force").code == 0
    assert verify_engine(engine)["routing"]["kind"] == "pregate"


def test_tampered_engine_and_plugin_version_are_refused(cli, example_dirs, tmp_path):
    engine = tmp_path / "t.engine"
    assert cli("convert", example_dirs["lora"], engine, "--max-seq", "32").code == 0
    data = bytearray(engine.read_bytes())
    data[1000] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(AdafuseError, match="SHA-256 .* does not match the manifest"):
        verify_engine(engine)
    r = cli("validate", example_dirs["lora"], engine)
    assert r.code != 0 and "SHA-256" in r.err
    data[1000] ^= 0xFF
    engine.write_bytes(bytes(data))
    import torch

    if not torch.cuda.is_available():  # the intact engine gets as far as the runtime
        r = cli("validate", example_dirs["lora"], engine)
        assert r.code == 2 and "running a TensorRT engine needs an NVIDIA GPU, and none is visible here" in r.err
    manifest = json.loads(engine.with_suffix(".json").read_text())
    manifest["plugin"] = {"name": "AdafuseLoraLinear", "version": "99"}
    engine.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.raises(AdafuseError, match="needs plugin AdafuseLoraLinear version '99'"):
        verify_engine(engine)


def test_without_tensorrt_leaves_validated_onnx(cli, example_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "_try_import", lambda name: None)
    engine = tmp_path / "x.engine"
    r = cli("convert", example_dirs["pregate"], engine)
    assert r.code == 2
    assert "no TensorRT installed, so no engine was built; the validated ONNX export is in" in r.err
    assert "tensorrt-rtx" in r.err
    assert not engine.exists() and (tmp_path / "x.onnx" / "decoder.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]


def test_bad_output_name_and_backend(cli, example_dirs, tmp_path, monkeypatch):
    r = cli("convert", example_dirs["pregate"], tmp_path / "out.trt")
    assert r.code == 2 and "must end in .engine" in r.err
    monkeypatch.setattr(backends, "_try_import", lambda name: None)
    r = cli("convert", example_dirs["pregate"], tmp_path / "o.engine", "--backend", "tensorrt")
    assert r.code == 2 and "no TensorRT found for --backend tensorrt" in r.err
    assert list(tmp_path.iterdir()) == []


def test_sigint_mid_conversion_keeps_previous_outputs(example_dirs, tmp_path):
    engine = tmp_path / "s.engine"
    cmd = [sys.executable, "-m", "adafuse_export", "convert", str(example_dirs["pregate"]), str(engine), "--max-seq", "32"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    # A suite started in the background by a non-interactive shell (`.ci/run ... &`) inherits SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler: give the child the default disposition, as a
    # user's terminal does.
    proc = subprocess.Popen(cmd + ["--force"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # interrupt once the engine build has started (stage 4 prints first)
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "[4/4" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "[4/4" in line, "conversion ended before the engine build started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted" in err, (proc.returncode, err[-500:])
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.engine", "s.json", "s.onnx"]  # no temporaries
    verify_engine(engine)


TIED = {"llama": {}, "qwen2": {}, "qwen3": {"head_dim": 24},
        "gemma2": {"head_dim": 24, "sliding_window": 4, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 1.5},
        "gemma3_text": {"head_dim": 24, "num_hidden_layers": 3, "sliding_window": 4,
                        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                        "rope_scaling": {"rope_type": "linear", "factor": 8.0}}}


@pytest.mark.parametrize("family", list(TIED))
def test_tied_heads_convert_with_defaults_and_validate_both_ways(tmp_path, cli, family):
    """Every family that ships tied embeddings (Gemma 2/3, small Qwen2/3, Llama 3.2) converts with the default
    settings (layerwise validation), and its export validates against the full reference too. The layerwise
    run cuts the graph into per-layer subgraphs: a tied head reads the embeddings, not lm_head.weight."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is installed by the README's test command")
    from adafuse_export.examples import make_example

    ckpt = make_example(tmp_path / "ckpt", "pregate", family=family, seed=4, config=TIED[family], tied=True)
    assert ckpt.model.tie_word_embeddings and "lm_head.weight" not in ckpt.base
    r = cli("convert", tmp_path / "ckpt", tmp_path / "m.engine")
    assert r.code == 0 and "PASSED (layerwise validation" in r.out, r.out + r.err
    r = cli("validate", tmp_path / "ckpt", tmp_path / "m.onnx", "--reference", "full")
    assert r.code == 0 and "PASSED" in r.out, r.out + r.err


def test_make_example_tied_flag(cli, tmp_path):
    r = cli("make-example", tmp_path / "t", "--family", "gemma2", "--tied")
    assert r.code == 0 and "tied head" in r.out
    assert json.loads((tmp_path / "t" / "config.json").read_text())["tie_word_embeddings"] is True
    assert cli("make-example", tmp_path / "u", "--family", "gemma2").code == 0
    assert json.loads((tmp_path / "u" / "config.json").read_text())["tie_word_embeddings"] is False


def test_missing_manifest_names_what_and_who(cli, example_dirs, tmp_path):
    """`validate CKPT x.engine` without x.json: the message names the manifest and the command that writes it."""
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"not really an engine")
    r = cli("validate", example_dirs["lora"], engine)
    assert r.code == 2 and r.err.strip() == (f"error: {engine}: its manifest {tmp_path / 'x.json'} is missing "
                                             "(adafuse-export convert writes it beside the engine; the engine cannot "
                                             "be checked or run without it: convert again)"), r.err


def test_tensorrt_messages_go_to_the_builder_log(example_dirs, tmp_path):
    """TensorRT's parser warnings (nothing a user can act on) are kept in ENGINE.onnx/tensorrt_build.log,
    which the output names, and are not printed."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is installed by the README's test command")
    import subprocess
    import sys

    # a child process: TensorRT's own logger would print from C++, past any in-process capture
    r = subprocess.run([sys.executable, "-m", "adafuse_export", "convert", str(example_dirs["lora"]),
                        str(tmp_path / "m.engine"), "--validate", "off", "--max-seq", "32"], capture_output=True, text=True)
    log = tmp_path / "m.onnx" / "tensorrt_build.log"
    assert r.returncode == 0 and "builder log: " in r.stdout and str(log) in r.stdout, r.stdout + r.stderr
    assert "Int64 binding" not in r.stdout + r.stderr and "Int64 binding" in log.read_text()


def test_inspect_describes_every_artefact(cli, example_dirs, tmp_path):
    """inspect reads what convert and export-onnx write: the engine (checked against its manifest), the ONNX
    directory and its decoder file; a plain LoRA says it has no experts and which base it read."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is installed by the README's test command")
    engine = tmp_path / "m.engine"
    assert cli("convert", example_dirs["pregate"], engine, "--max-seq", "32", "--validate", "off").code == 0
    r = cli("inspect", engine)
    assert r.code == 0 and "(hashes verified)" in r.out and "tensorrt-rtx" in r.out and "pregate, 4 experts top-2" in r.out
    info = json.loads(cli("inspect", engine, "--json").out)
    assert info["kind"] == "engine" and info["engine"]["max_seq"] == 32
    for path in (tmp_path / "m.onnx", tmp_path / "m.onnx" / "decoder.onnx"):
        r = cli("inspect", path)
        assert r.code == 0 and "float16, portable flavour, opset 17" in r.out and "decoder graph" in r.out, r.out + r.err
    assert json.loads(cli("inspect", tmp_path / "m.onnx", "--json").out)["kind"] == "onnx-export"
    r = cli("inspect", example_dirs["lora"])
    assert "experts         none: one LoRA applied to every token (no router)" in r.out
    manifest = tmp_path / "m.onnx" / "manifest.json"
    broken = json.loads(manifest.read_text())
    del broken["graphs"]
    manifest.write_text(json.dumps(broken))
    r = cli("inspect", tmp_path / "m.onnx")
    assert r.code == 2 and r.err.strip() == (f"error: {tmp_path / 'm.onnx'}: its manifest lacks or mistypes 'graphs' "
                                             "(not written by this adafuse-export?)"), r.err
