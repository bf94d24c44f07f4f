"""Issue 24's classes 3-8 of hostile or careless input (the Python side), cases generated at test time.

Each class has one mechanism in the package; the tests here drive it through the commands it reaches:
3. validate never passes a wrong model (validate._Stat: bounds only from finite measured references;
   the model's dtype from its own tensors), 4. sizes taken from a file are checked against what the files
hold before anything proportional to them is allocated, 5. scales that overflow the compute dtype, exact
name matching, refusing what is not implemented, 6. no tracebacks, 7. outputs never hurt, 8. every string
from a file or an argument is printed escaped.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from adafuse_export.validate import _Stat

REPO = Path(__file__).resolve().parent.parent


def one_line(r, *fragments) -> str:
    assert r.code == 2, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])
    return lines[0]


def edited(src: Path, dst: Path, edit, file: str = "model.safetensors") -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / file)
    edit(tensors)
    save_file(tensors, dst / file)
    return dst


# --- 3. validate never passes a wrong model ------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 5)), bad=st.sampled_from([np.inf, -np.inf, np.nan]),
       where=st.sampled_from(["half", "reference"]), data=st.data())
def test_non_finite_reference_never_passes(shape, bad, where, data):
    """A non-finite reference (or half reference) fails the output with its reason, whatever the runner gives."""
    want = np.asarray(data.draw(st.lists(st.floats(-10, 10), min_size=shape[0] * shape[1],
                                         max_size=shape[0] * shape[1])), np.float32).reshape(shape)
    got = want.copy()  # even a runner identical to the float32 reference
    half = want.copy()
    target = half if where == "half" else want
    target.flat[data.draw(st.integers(0, target.size - 1))] = bad
    s = _Stat("logits", 2e-2, 2e-2)
    s.add(got, want, "prompt 0 prefill", half)
    r = s.report()
    assert not r["passed"] and r["error"] and "not finite at prompt 0 prefill" in r["error"], r
    assert np.isfinite(r["atol_applied"])


def overflow_example(ckpt: Path, tmp: Path, value: float, dtype: str) -> tuple[Path, Path]:
    bad = edited(ckpt, tmp / f"lm-{value:g}", lambda t: t["lm_head.weight"].__setitem__(5, np.float32(value)))
    from adafuse_export.converters import load_checkpoint
    from adafuse_export.onnx.export import export_onnx

    export_onnx(load_checkpoint(bad), tmp / f"onnx-{value:g}", dtype=dtype)
    return bad, tmp / f"onnx-{value:g}"


@pytest.mark.parametrize("value", [3e4, -6e4, 1e6])
def test_half_reference_overflow_is_a_failure(cli, example_dirs, tmp_path, value):
    """lm_head rows finite in float32 and overflowing the float16 reference: the measured bound was inf (PASSED)."""
    ckpt, model = overflow_example(example_dirs["pregate"], tmp_path, value, "float16")
    r = cli("validate", ckpt, model, "--steps", "1", "--half-tolerance", "measured")
    assert r.code == 1 and "FAILED" in r.out and "PASSED" not in r.out, r.out
    assert "reference's 'logits' is not finite at prompt 0 prefill" in r.out
    assert "atol inf" not in r.out


@pytest.mark.parametrize("claimed", ["bfloat16", "float16"])
def test_dtype_metadata_claim_is_not_believed(cli, example_dirs, tmp_path, claimed):
    """A float32 graph claiming a half dtype was judged with that dtype's wide tolerance and passed a changed lm_head."""
    import onnx

    from adafuse_export.converters import load_checkpoint
    from adafuse_export.onnx.export import export_onnx

    export_onnx(load_checkpoint(example_dirs["pregate"]), tmp_path / "onnx")
    m = onnx.load(str(tmp_path / "onnx" / "decoder.onnx"), load_external_data=False)
    for p in m.metadata_props:
        if p.key == "adafuse.dtype":
            p.value = claimed
    onnx.save(m, str(tmp_path / "onnx" / "decoder.onnx"))
    ckpt = edited(example_dirs["pregate"], tmp_path / "ckpt",
                  lambda t: t["lm_head.weight"].__setitem__(5, t["lm_head.weight"][5] + np.float32(0.05)))
    r = cli("validate", ckpt, tmp_path / "onnx", "--steps", "1")
    assert r.code == 1 and "FAILED" in r.out, r.out
    assert f"metadata says adafuse.dtype={claimed}, its tensors are float32: judged as float32" in r.out
    assert "atol 1e-04" in r.out
