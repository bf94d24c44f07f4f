"""The one GPU decode path on the CPU: `run --device cuda` and `validate ... --runtime cpp` of a native artifact
reach the C++ runtime's native backend through the C API (cpp_runtime.Engine) and, with no GPU here, end in one
line each; their own refusals; the temporary artifact of `run --device cuda` is removed whatever happens.
What runs on a GPU: tests/gpu/test_native_backend.py, tests/gpu/test_gpu_run_cli.py, tests/gpu/test_native_validate.py."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import pytest
import torch

from adafuse_export import native_artifact as native
from adafuse_export.converters import load_checkpoint
from adafuse_export.errors import AdafuseError
from adafuse_export.reference import ReferenceModel
from adafuse_export.runners import cpp_runtime
from test_runtime import monkeypatch_session, runtime_build, runtime_lib  # noqa: F401  (session fixtures)

PROMPT = ["--prompt-ids", "3,1,4", "--max-new-tokens", "4"]


@pytest.fixture(scope="session")
def runtime_library(request) -> str:
    """The runtime library the environment names (a build of this tree), else the one built for the tests."""
    return os.environ.get("ADAFUSE_RUNTIME_LIB") or request.getfixturevalue("runtime_lib")


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch) -> Path:
    """TMPDIR of this test: what `run --device cuda` leaves behind is seen there."""
    import tempfile

    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    return tmp


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and text.startswith("error: "), text
    assert "Traceback" not in text
    return text[len("error: "):].strip()


def test_run_cuda_without_a_runtime_library_says_how_to_get_one(cli, example_dirs, tmpdir_env, monkeypatch):
    monkeypatch.setenv("ADAFUSE_RUNTIME_LIB", str(tmpdir_env.parent / "missing" / "libadafuse_runtime.so"))
    res = cli("run", example_dirs["pregate"], *PROMPT, "--device", "cuda")
    assert res.code == 2
    message = one_line(res.err)
    assert "cannot load the C++ runtime" in message and "runtime/tools/build_on_gpu.sh" in message
    assert "ADAFUSE_RUNTIME_LIB" in message
    assert list(tmpdir_env.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("kind", ["pregate", "mola", "lora"])
def test_run_cuda_without_a_gpu_is_one_line_and_leaves_no_artifact(cli, example_dirs, tmpdir_env, runtime_library,
                                                                   monkeypatch, kind):
    monkeypatch.setenv("ADAFUSE_RUNTIME_LIB", runtime_library)
    res = cli("run", example_dirs[kind], *PROMPT, "--device", "cuda", "--strategy", "fused")
    assert res.code == 2
    message = one_line(res.err)
    # the artifact was written and checked in full by the runtime, which stopped at the device
    assert message.startswith("--device cuda: CUDA device 0 (running ") and "needs an NVIDIA GPU" in message, message
    assert f"{native.SUFFIX} needs" in message
    assert list(tmpdir_env.iterdir()) == []  # the temporary artifact is gone


def test_run_cuda_auto_on_a_pregate_checkpoint_also_cleans_up(cli, example_dirs, tmpdir_env, runtime_library, monkeypatch):
    monkeypatch.setenv("ADAFUSE_RUNTIME_LIB", runtime_library)
    res = cli("run", example_dirs["pregate"], *PROMPT, "--device", "cuda", "--no-adapters")
    assert res.code == 2 and "needs an NVIDIA GPU" in one_line(res.err)
    assert list(tmpdir_env.iterdir()) == []


def test_run_cuda_with_a_cuda_torch_that_sees_no_gpu(cli, example_dirs, tmpdir_env, runtime_library, monkeypatch):
    """A CUDA build of torch that sees no device says so before the artifact is written."""
    monkeypatch.setenv("ADAFUSE_RUNTIME_LIB", runtime_library)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = cli("run", example_dirs["pregate"], *PROMPT, "--device", "cuda")
    assert res.code == 2
    assert one_line(res.err) == "--device cuda: no CUDA GPU is visible (PyTorch sees none; CUDA_VISIBLE_DEVICES?)"
    assert list(tmpdir_env.iterdir()) == []


@pytest.mark.parametrize("kind,args,expected", [
    ("pregate", ["--strategy", "unmerged"], "--strategy unmerged: --device cuda runs the native backend, which applies "
                                            "the adapters fused (fused) or merged into the weights (switch); use fused, "
                                            "switch or auto"),
    ("mola", ["--strategy", "switch"], "--strategy switch merges a pre-gate's experts into the weights: {path} has "
                                       "routing 'layerwise' (use --strategy fused)"),
    ("pregate", ["--strategy", "switch", "--no-adapters"], "--strategy switch merges a pre-gate's experts into the "
                                                           "weights: --no-adapters leaves no adapter to merge (use "
                                                           "--strategy fused)"),
])
def test_run_cuda_refuses_strategies_the_native_backend_cannot_run(cli, example_dirs, tmpdir_env, kind, args, expected):
    res = cli("run", example_dirs[kind], *PROMPT, "--device", "cuda", *args)
    assert res.code == 2
    assert one_line(res.err) == expected.format(path=example_dirs[kind])
    assert list(tmpdir_env.iterdir()) == []


def test_run_weights_fp8_is_for_the_native_backend(cli, example_dirs, tmpdir_env):
    """--weights fp8 writes the temporary native artifact with FP8 weights: refused in one line on the CPU path, and
    with a float32 --dtype (FP8 weights run with 16-bit activations) before anything is written."""
    res = cli("run", example_dirs["pregate"], *PROMPT, "--weights", "fp8")
    assert res.code == 2
    assert one_line(res.err) == ("--weights fp8: applies to --device cuda (the native artifact it writes); the CPU "
                                 "reference runs the checkpoint's weights")
    res = cli("run", example_dirs["pregate"], *PROMPT, "--device", "cuda", "--weights", "fp8", "--strategy", "switch")
    assert res.code == 2
    assert one_line(res.err) == ("--weights fp8 keeps the activations in --dtype, which must then be float16 or "
                                 "bfloat16 (the kernels run FP8 weights with 16-bit activations), got --dtype float32")
    assert list(tmpdir_env.iterdir()) == []


def test_no_adapters_artifact_is_the_base_model(example_dirs, tmp_path):
    """--no-adapters writes the base alone: no adapter file, routing 'none', and its reference equals the
    reference run with adapters off (what `run --no-adapters` computes on the CPU)."""
    ckpt = load_checkpoint(example_dirs["pregate"])
    base = ckpt.base_only()
    art = tmp_path / "base.native"
    art.mkdir()
    manifest = native.write_artifact(base, art, "float32", max_batch=1, max_seq=16)
    assert manifest["routing"]["kind"] == "none" and manifest["routing"]["routes_file"] is None
    assert sorted(manifest["files"]) == [native.WEIGHTS]
    assert all(st["adapter"] is None for layer in manifest["layers"] for st in layer["stages"])
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    want = ReferenceModel(ckpt, dtype=torch.float32, adapters=False).forward(prompt).logits
    got = ReferenceModel(base, dtype=torch.float32).forward(prompt).logits
    assert torch.equal(got, want)
    with_adapters = ReferenceModel(ckpt, dtype=torch.float32).forward(prompt).logits
    assert not torch.equal(with_adapters, want)  # the example's adapters do change the logits


def test_open_native_refuses_an_unknown_strategy_before_loading_anything(tmp_path):
    with pytest.raises(AdafuseError, match=r"^strategy 'unmerged' is not one of the native backend's \(fused, switch\)$"):
        cpp_runtime.open_native(tmp_path / "none.native", "unmerged", library=str(tmp_path / "no-such-lib.so"))


def test_runner_of_a_native_artifact_reaches_the_device(example_dirs, tmp_path, runtime_library):
    """CppRuntimeRunner (validate --runtime cpp) opens a native artifact through the native backend: here the runtime
    checks it in full and stops at the device."""
    art = tmp_path / "a.native"
    art.mkdir()
    native.write_artifact(load_checkpoint(example_dirs["pregate"]), art, "float32", max_batch=2, max_seq=32)
    assert cpp_runtime.is_native_artifact(art) and not cpp_runtime.is_native_artifact(tmp_path)
    with pytest.raises(AdafuseError, match=rf"^CUDA device 0 \(running {art} needs an NVIDIA GPU\): "):
        cpp_runtime.CppRuntimeRunner(art, library=runtime_library)
    with pytest.raises(AdafuseError, match="strategy 'switch' merges one sequence's experts into the weights"):
        cpp_runtime.CppRuntimeRunner(art, library=runtime_library, strategy="switch")  # max_batch 2


def test_native_manifest_metadata_is_what_validate_compares(example_dirs, tmp_path):
    """The artifact's routing contract, as validate.check_compatible reads it, agrees with its checkpoint; another
    checkpoint's structure is named."""
    from adafuse_export.runners.base import ModelInfo
    from adafuse_export.validate import check_compatible

    for kind in ("pregate", "mola", "mixlora", "pregate-ffn"):
        ckpt = load_checkpoint(example_dirs[kind])
        art = tmp_path / f"{kind}.native"
        art.mkdir()
        manifest = native.write_artifact(ckpt, art, "bfloat16", max_batch=1, max_seq=16)
        m = ckpt.model
        info = ModelInfo(model=art, num_layers=m.num_layers, vocab_size=m.vocab_size, kv_heads=m.num_kv_heads,
                         head_dim=m.head_dim, needs_routes=manifest["routing"]["routes_file"] is not None,
                         dtype="bfloat16", meta=cpp_runtime.native_meta(manifest), description="-")
        assert check_compatible(ckpt, info) == [], kind
        assert cpp_runtime.native_top_k(manifest) == (ckpt.adapter.top_k if ckpt.adapter.routing == "pregate" else 0)
    with pytest.raises(AdafuseError, match="routing is pregate in the model, layerwise in the checkpoint"):
        check_compatible(load_checkpoint(example_dirs["mola"]), ModelInfo(
            model=tmp_path / "pregate.native", num_layers=m.num_layers, vocab_size=m.vocab_size, kv_heads=m.num_kv_heads,
            head_dim=m.head_dim, needs_routes=False, dtype="bfloat16",
            meta=cpp_runtime.native_meta(cpp_runtime.native_manifest(tmp_path / "pregate.native")), description="-"))


def test_validate_of_a_native_artifact(cli, example_dirs, tmp_path, runtime_library, monkeypatch):
    art = tmp_path / "a.native"
    art.mkdir()
    native.write_artifact(load_checkpoint(example_dirs["pregate"]), art, "float32", max_batch=1, max_seq=32)
    res = cli("validate", example_dirs["pregate"], art)
    assert res.code == 2
    assert one_line(res.err) == f"{art} is a native artifact: the C++ runtime's native backend runs it (add --runtime cpp)"
    empty = tmp_path / "empty.native"
    empty.mkdir()
    res = cli("validate", example_dirs["pregate"], empty, "--runtime", "cpp")
    assert res.code == 2
    assert one_line(res.err) == (f"{empty}: not a native artifact (no manifest.json of format adafuse-native in it; "
                                 "`convert --backend native` writes one)")
    monkeypatch.setenv("ADAFUSE_RUNTIME_LIB", runtime_library)
    res = cli("validate", example_dirs["pregate"], art, "--runtime", "cpp")
    assert res.code == 2
    assert one_line(res.err).startswith(f"CUDA device 0 (running {art} needs an NVIDIA GPU): ")


def test_benchmark_writes_a_fused_and_a_switch_artifact_the_runtime_accepts(tmp_path, runtime_library, monkeypatch):
    """benchmarks/h200_decode.py's 7B-shape artifacts (here of a narrow width, weights drawn on the CPU): the switch
    artifact shares the fused one's files under a manifest of one slot, and the runtime's full check accepts both."""
    import json
    import subprocess

    from benchmark_scripts import load

    bench = load("h200_decode")  # puts benchmarks/ on sys.path
    import synthetic_checkpoint
    monkeypatch.setattr(bench, "WEIGHTS_DEVICE", "cpu")
    narrow = dict(synthetic_checkpoint.SHAPES["llama2-7b"], vocab_size=512, hidden_size=128, intermediate_size=256,
                  num_attention_heads=4, num_key_value_heads=4)
    monkeypatch.setitem(synthetic_checkpoint.SHAPES, "llama2-7b", narrow)
    ckpt = bench.synthetic_checkpoint(2)
    fused, switch = bench.write_artifacts(ckpt, tmp_path, 8, 64)
    for art, slots in ((fused, 8), (switch, 1)):
        assert json.loads((art / native.MANIFEST).read_text())["runtime"] == {"max_batch": slots, "max_seq": 64}
        check = subprocess.run([str(Path(runtime_library).parent / "adafuse-native-check"), str(art)],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
    assert (fused / native.WEIGHTS).stat().st_ino == (switch / native.WEIGHTS).stat().st_ino
    feed = bench.routed_tokens(fused, 30, 512)
    from safetensors.numpy import load_file

    ids = load_file(str(fused / native.ROUTES))["expert_ids"]
    assert all(not np.array_equal(ids[a], ids[b]) for a, b in zip(feed, feed[1:]))
