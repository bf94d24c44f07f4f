"""`convert` at real model sizes, tested on tiny models: layer-by-layer validation, leftovers of a
killed run, resources checked up front, bfloat16 messages, progress lines, --max-seq bounds."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from adafuse_export import resources, staging
from adafuse_export.converters import load_checkpoint
from adafuse_export.examples import KINDS
from adafuse_export.onnx.export import export_onnx
from adafuse_export.progress import Progress
from adafuse_export.reference import ReferenceModel
from adafuse_export.validate import validate

pytest.importorskip("onnxruntime")


# ---- layerwise validation ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_layerwise_validation_agrees_with_full(example_dirs, tmp_path, kind):
    ckpt = load_checkpoint(example_dirs[kind])
    export_onnx(ckpt, tmp_path / "onnx", "portable", "float16")
    full = validate(ckpt, tmp_path / "onnx" / "decoder.onnx", steps=3, mode="full")
    layer = validate(ckpt, tmp_path / "onnx" / "decoder.onnx", steps=3, mode="layerwise")
    assert full["passed"] and layer["passed"]
    assert layer["method"]["mode"] == "layerwise" and "one layer" in layer["method"]["description"]
    assert "streamed layer by layer" in layer["reference"]
    assert [o["name"] for o in full["outputs"]] == [o["name"] for o in layer["outputs"]]
    for f, w in zip(full["outputs"], layer["outputs"]):
        assert (f["atol"], f["rtol"], f["passed"], f["elements"]) == (w["atol"], w["rtol"], w["passed"], w["elements"])
        assert abs(f["max_abs_diff"] - w["max_abs_diff"]) <= f["atol"], f["name"]
    assert full["greedy_agreement"] == layer["greedy_agreement"]


def test_streaming_reference_holds_one_layer(example_dirs):
    ckpt = load_checkpoint(example_dirs["mixlora"])
    held = ReferenceModel(ckpt)
    streamed = ReferenceModel(ckpt, stream=True)
    layers_seen = []
    get = streamed.w.load

    def spy(src, name):
        layers_seen.append(name)
        return get(src, name)

    streamed.w.load = spy
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    a, b = held(ids), streamed(ids)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(held(ids[:, :1], a.cache).logits, streamed(ids[:, :1], b.cache).logits)
    # each forward pass reads every layer's weights once, in order, and keeps only the last layer's
    layer_order = [int(n.split(".")[2]) for n in layers_seen]
    assert layer_order == sorted(layer_order[: len(layer_order) // 2]) * 2
    assert {n.split(".")[2] for n in streamed.w.current} == {str(ckpt.model.num_layers - 1)}
    assert not any(n.startswith("model.layers.") for n in streamed.w.resident)


def test_convert_prints_the_validation_summary(cli, example_dirs, tmp_path):
    r = cli("convert", example_dirs["pregate"], tmp_path / "m.engine", "--max-seq", "32", "--validate", "full")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("[3/4"))
    j = next(i for i, line in enumerate(lines) if line.startswith("[4/4"))
    block = "\n".join(lines[i:j])
    assert "PASSED (full validation" in block and "logits: max abs diff" in block and "tolerance atol 2e-02" in block
    assert "greedy agreement 5/5" in block and "routing agreement 24/24 expert ids" in block
    assert "prompt 0 prefill compared (1/5, " in block and "prompt 0 decode 4 compared (5/5, " in block


# ---- leftovers of a killed run -----------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_run_are_removed(cli, example_dirs, tmp_path):
    engine = tmp_path / "k.engine"
    cmd = [sys.executable, "-m", "adafuse_export", "convert", str(example_dirs["pregate"]), str(engine), "--max-seq", "32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    line = ""
    deadline = time.time() + 120
    while time.time() < deadline and "[2/4" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "[2/4" in line
    proc.send_signal(signal.SIGKILL)  # as the OOM killer would: no handler runs
    proc.wait()
    left = list(tmp_path.glob(".k.engine.*.tmp"))
    assert len(left) == 1 and (left[0] / staging.MARKER).is_file()
    # a live run's staging (this process), another host's and an unmarked directory stay
    live = staging.make_staging(engine)
    other = tmp_path / ".k.engine.otherhost.tmp"
    other.mkdir()
    (other / staging.MARKER).write_text(json.dumps({"host": socket.gethostname() + "-x", "pid": _dead_pid(),
                                                    "start_time": None, "output": "k.engine"}))
    unmarked = tmp_path / ".k.engine.unmarked.tmp"
    unmarked.mkdir()
    r = cli("convert", example_dirs["pregate"], engine, "--max-seq", "32")
    assert r.code == 0, r.err
    assert f"removed {left[0]}: staging left by an earlier run on k.engine that was killed" in r.out
    assert not left[0].exists() and live.is_dir() and other.is_dir() and unmarked.is_dir()
    assert f"left {unmarked} alone" in r.out and f"left {other} alone" in r.out


def test_reused_pid_counts_as_gone(tmp_path):
    engine = tmp_path / "r.engine"
    d = staging.make_staging(engine)
    marker = json.loads((d / staging.MARKER).read_text())
    assert marker["pid"] == os.getpid() and marker["output"] == "r.engine"
    assert staging.stale_stagings(engine) == ([], [])  # this process is alive: neither stale nor foreign
    marker["start_time"] = "1"  # same pid, another process start: the owner is gone
    (d / staging.MARKER).write_text(json.dumps(marker))
    assert staging.stale_stagings(engine) == ([d], [])


# ---- resources -----------------------------------------------------------------------------------------
def _with_memory(monkeypatch, free: int):
    monkeypatch.setattr(resources, "memory_available", lambda: (free, "test limit"))


def test_memory_refusal_names_the_option_that_fits(cli, example_dirs, tmp_path, monkeypatch):
    # weights only, so the tiny model's stages differ (and a build that holds one copy of them, which fits)
    for fixed in ("RUNTIME_OVERHEAD", "BUILD_FIXED_BYTES", "BUILD_BYTES_PER_LAYER"):
        monkeypatch.setattr(resources, fixed, 0)
    for factor in ("BUILD_BYTES_PER_LAYER_WEIGHT_BYTE", "BUILD_BYTES_PER_OUTSIDE_WEIGHT_BYTE"):
        monkeypatch.setattr(resources, factor, 1.0)
    ckpt = load_checkpoint(example_dirs["pregate"])
    needs = {n.stage: n for n in resources.estimate(ckpt, "float32", "full", None, build=True)}
    layer = {n.stage: n for n in resources.estimate(ckpt, "float32", "layerwise", None, build=True)}
    assert layer["validate"].memory < needs["validate"].memory
    # room for a layerwise validation and the build, not for a full validation
    room = max(layer["validate"].memory, needs["build"].memory, needs["export"].memory) + 1
    assert needs["validate"].memory > room
    _with_memory(monkeypatch, room)
    r = cli("convert", example_dirs["pregate"], tmp_path / "m.engine", "--dtype", "float32", "--validate", "full")
    assert r.code == 2 and "stage 'validate' needs about" in r.err and "--validate layerwise would need about" in r.err
    assert list(tmp_path.iterdir()) == []


def test_memory_refusal_before_anything_is_written(cli, example_dirs, tmp_path, monkeypatch):
    _with_memory(monkeypatch, 100 * 2**20)
    r = cli("convert", example_dirs["pregate"], tmp_path / "m.engine")
    assert r.code == 2 and "stage 'export' needs about 0.6 GiB of memory" in r.err
    assert "0.1 GiB is available (test limit)" in r.err
    assert list(tmp_path.iterdir()) == []


def test_build_that_does_not_fit_keeps_the_validated_onnx(cli, example_dirs, tmp_path, monkeypatch):
    pytest.importorskip("tensorrt_rtx")
    ckpt = load_checkpoint(example_dirs["pregate"])
    needs = {n.stage: n for n in resources.estimate(ckpt, "float16", "layerwise", None, build=True)}
    monkeypatch.setattr(resources, "BUILD_FIXED_BYTES", 1 << 50)  # a builder that needs far more
    _with_memory(monkeypatch, needs["validate"].memory + 2**20)
    r = cli("convert", example_dirs["pregate"], tmp_path / "m.engine", "--max-seq", "32")
    assert r.code == 2, r.out
    assert "the engine build will not fit here" in r.out and "PASSED" in r.out and "[4/4" not in r.out
    assert "the engine was not built: stage 'build' needs about" in r.err
    assert "the validated ONNX export is in" in r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_disk_refusal(cli, example_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "disk_free", lambda path: 1000)
    r = cli("convert", example_dirs["pregate"], tmp_path / "m.engine")
    assert r.code == 2 and "of free disk for its outputs and temporaries, found 0.0 GiB free" in r.err
    assert list(tmp_path.iterdir()) == []


def test_sizes_from_headers(example_dirs):
    ckpt = load_checkpoint(example_dirs["pregate"])
    tensors = [(n, ckpt.base.get(n)) for n in ckpt.base.names()] + [(n, ckpt.adapters.get(n)) for n in ckpt.adapters.names()]
    s = resources.Sizes.of(ckpt)
    assert s.elements == sum(t.numel() for _, t in tensors)
    assert s.largest_tensor == max(t.numel() for _, t in tensors)
    layer0 = sum(t.numel() for n, t in tensors if n.startswith(("model.layers.0.", "layers.0.")))
    layer1 = sum(t.numel() for n, t in tensors if n.startswith(("model.layers.1.", "layers.1.")))
    assert s.largest_layer == max(layer0, layer1)
    assert s.outside_layers == s.elements - layer0 - layer1


def test_cgroup_v1_limit_is_read(tmp_path, monkeypatch):
    root = tmp_path / "sys"
    group = root / "memory" / "job"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(str(8 * 2**30))
    (group / "memory.stat").write_text("cache 999999999\ntotal_rss 1073741824\n")
    cgroup_file = tmp_path / "cgroup"
    cgroup_file.write_text("4:memory:/job\n0::/\n")
    real_path = resources.Path

    def fake_path(p="", *rest):
        p = str(p)
        if p == "/proc/self/cgroup":
            return cgroup_file
        if p.startswith("/sys/fs/cgroup"):
            return real_path(str(root) + p[len("/sys/fs/cgroup"):], *rest)
        return real_path(p, *rest)

    monkeypatch.setattr(resources, "Path", fake_path)
    room, where = resources._cgroup_room()
    assert room == 7 * 2**30 and "limit 8.0 GiB, 1.0 GiB in use" in where


# ---- bfloat16, --max-seq, progress ------------------------------------------------------------------
def test_bfloat16_validates_the_float32_twin(cli, example_dirs, tmp_path, monkeypatch):
    from adafuse_export import convert as convert_module

    monkeypatch.setattr(convert_module, "onnxruntime_runs_bfloat16", lambda: False)
    r = cli("convert", example_dirs["pregate"], tmp_path / "b.engine", "--dtype", "bfloat16", "--max-seq", "32")
    assert r.code == 0, r.err
    assert "this ONNX Runtime has no bfloat16 CPU kernels: stage 3 validates the float32 graph" in r.out
    assert "bfloat16 itself is validated only on a GPU" in r.out and "--validate off skips this" in r.out
    assert "float32 twin of the bfloat16 graph" in r.out and "PASSED" in r.out
    assert json.loads((tmp_path / "b.onnx" / "manifest.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.engine", "b.json", "b.onnx"]


def test_onnxruntime_bfloat16_probe_matches_a_real_session(example_dirs, tmp_path):
    """The probe's answer agrees with loading an actual bfloat16 export."""
    import onnxruntime as ort

    from adafuse_export.convert import onnxruntime_runs_bfloat16

    export_onnx(load_checkpoint(example_dirs["lora"]), tmp_path / "o", "portable", "bfloat16")
    try:
        ort.InferenceSession(str(tmp_path / "o" / "decoder.onnx"), providers=["CPUExecutionProvider"])
        loads = True
    except Exception:
        loads = False
    assert onnxruntime_runs_bfloat16() == loads


def test_validation_failure_names_the_output_and_the_way_out(cli, example_dirs, tmp_path, monkeypatch):
    from adafuse_export import convert as convert_module

    if convert_module.onnxruntime_runs_bfloat16():
        pytest.skip("this ONNX Runtime runs bfloat16 graphs: loading one does not fail")
    monkeypatch.setattr(convert_module, "onnxruntime_runs_bfloat16", lambda: True)  # validate the bf16 graph itself
    r = cli("convert", example_dirs["pregate"], tmp_path / "b.engine", "--dtype", "bfloat16", "--max-seq", "32")
    assert r.code == 2
    assert str(tmp_path / "b.onnx" / "decoder.onnx") in r.err and ".tmp" not in r.err
    assert "nothing was written" in r.err and "--validate off builds without this check" in r.err
    assert list(tmp_path.iterdir()) == []


def test_max_seq_beyond_the_model_is_refused(cli, example_dirs, tmp_path):
    limit = json.loads((example_dirs["lora"] / "config.json").read_text())["max_position_embeddings"]
    r = cli("convert", example_dirs["lora"], tmp_path / "m.engine", "--max-seq", str(limit + 1))
    assert r.code == 2
    assert f"--max-seq {limit + 1}: " in r.err and f"max_position_embeddings {limit}" in r.err
    assert f"pass --max-seq {limit} or less" in r.err
    assert list(tmp_path.iterdir()) == []


def test_progress_plain_lines_off_a_tty():
    clock = iter([0.0, 1.0, 6.0, 7.0, 12.0]).__next__
    out = io.StringIO()
    p = Progress("writing w.data", 4, 4 * 2**20, stream=out, every=5.0, clock=clock)
    for _ in range(4):
        p.update(2**20)
    p.done()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\033" not in out.getvalue()
    assert lines == ["         writing w.data: 2/4 tensors, 2.0 MiB of 4.0 MiB, 6 s, ETA 6 s",
                     "         writing w.data: 4/4 tensors, 4.0 MiB of 4.0 MiB, 12 s, ETA 0 s"]


def test_progress_rewrites_one_line_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    clock = iter([0.0, 1.0, 2.0]).__next__
    p = Progress("writing", 2, 2, stream=out, clock=clock)
    p.update(1)
    p.update(1)
    p.done()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1


def test_export_onnx_reports_progress_when_weights_go_external(cli, example_dirs, tmp_path):
    r = cli("export-onnx", example_dirs["pregate"], tmp_path / "o", "--external-data-threshold", "0")
    assert r.code == 0, r.err
    lines = [line for line in r.out.splitlines() if "writing decoder.onnx.data: " in line]
    done, total = lines[-1].split(": ")[1].split(" ")[0].split("/")  # the last line reports every tensor written
    assert done == total and int(total) > 0


def test_summary_stays_short_when_many_outputs_fail(example_dirs, tmp_path):
    from adafuse_export.validate import failed_outputs, summary

    ckpt = load_checkpoint(example_dirs["pregate"])
    export_onnx(ckpt, tmp_path / "onnx", "portable", "float16")
    # float16 is never exact against the float16 reference (the measured bound would widen atol 0)
    report = validate(ckpt, tmp_path / "onnx" / "decoder.onnx", steps=1, atol=0.0, rtol=0.0, half_tolerance="fixed")
    failing = [o["name"] for o in report["outputs"] if not o["passed"]]
    assert not report["passed"] and len(failing) > 3
    lines = summary(report)
    assert lines[0].startswith("FAILED (full validation") and len(lines) <= 7
    kv_failing = [n for n in failing if n.startswith("present.")]
    kv = next(line for line in lines if line.startswith("KV cache: "))
    assert f"failing: {', '.join(kv_failing[:3])}" in kv and (len(kv_failing) <= 3 or f"and {len(kv_failing) - 3} more" in kv)
    assert failed_outputs(report) == ", ".join(failing[:3]) + f" and {len(failing) - 3} more"


def test_validate_command_reference_layerwise(cli, example_dirs, tmp_path):
    export_onnx(load_checkpoint(example_dirs["mola"]), tmp_path / "o", "portable", "float32")
    full = cli("validate", example_dirs["mola"], tmp_path / "o", "--steps", "2", "--json")
    layer = cli("validate", example_dirs["mola"], tmp_path / "o", "--steps", "2", "--json", "--reference", "layerwise")
    assert full.code == 0 and layer.code == 0, layer.err
    f, w = json.loads(full.out), json.loads(layer.out)
    assert (f["method"]["mode"], w["method"]["mode"]) == ("full", "layerwise")
    assert "weights memory-mapped" in w["runner_description"] and "weights memory-mapped" not in f["runner_description"]
    for a, b in zip(f["outputs"], w["outputs"]):
        assert a["name"] == b["name"] and a["passed"] == b["passed"] and abs(a["max_abs_diff"] - b["max_abs_diff"]) <= a["atol"]
