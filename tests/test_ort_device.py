"""validate --device: ONNX Runtime's provider choice (CUDA with TF32 off, or a clear refusal)."""
from __future__ import annotations

import types

import pytest

from adafuse_export.errors import AdafuseError
from adafuse_export.runners.onnxruntime import providers_for


def fake_ort(*providers: str):
    """Only what providers_for reads from the onnxruntime module: its version and provider list."""
    return types.SimpleNamespace(__version__="1.31.1", get_available_providers=lambda: list(providers))


def test_cuda_provider_runs_without_tf32():
    ort = fake_ort("CUDAExecutionProvider", "CPUExecutionProvider")
    for device in ("auto", "cuda"):
        first, rest = providers_for(ort, device)[0], providers_for(ort, device)[1:]
        assert first == ("CUDAExecutionProvider", {"use_tf32": "0"}) and rest == ["CPUExecutionProvider"]
    assert providers_for(ort, "cpu") == ["CPUExecutionProvider"]


def test_cpu_only_onnxruntime():
    ort = fake_ort("CPUExecutionProvider")
    assert providers_for(ort, "auto") == ["CPUExecutionProvider"]
    with pytest.raises(AdafuseError, match=r"--device cuda: ONNX Runtime 1.31.1 here has no CUDAExecutionProvider"):
        providers_for(ort, "cuda")
    with pytest.raises(AdafuseError, match="--device 'gpu' is unknown"):
        providers_for(ort, "gpu")


def test_validate_device_cuda_without_the_provider_is_one_line(tmp_path, cli, example_dirs):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine's onnxruntime has the CUDA provider")
    ckpt = example_dirs["pregate"]
    out = tmp_path / "onnx"
    assert cli("export-onnx", ckpt, out).code == 0
    r = cli("validate", ckpt, out, "--device", "cuda")
    assert r.code == 2, r.out + r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "CUDAExecutionProvider" in lines[0], r.err
