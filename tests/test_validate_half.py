"""validate's half-precision bound: a float16/bfloat16 model judged against the float32 reference, each
output's atol max(fixed atol, 2 x the same-dtype reference's own distance from float32), routing exact
against the same-dtype reference. The bound is recomputed here from separately run references.

ONNX Runtime here has no bfloat16 CPU kernels (convert validates a bfloat16 export through its float32
twin), so the bfloat16 "graph" is a stand-in computed like ONNX Runtime computes a float16 graph: the
checkpoint's weights rounded to bfloat16, the arithmetic in float32.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adafuse_export.converters import load_checkpoint
from adafuse_export.onnx.export import export_onnx
from adafuse_export.runners.reference import ReferenceRunner
from adafuse_export.validate import TOLERANCES, format_report, summary, validate

STEPS = 2
PERTURBED = "model.layers.0.mlp.down_proj.weight"  # acts on layer 1's keys/values and the logits, not layer 0's
SCALE = 64.0  # final norm scaled up: logits large enough that a half reference's rounding exceeds the fixed atol


def edited(src: Path, dst: Path, edit, file: str = "model.safetensors") -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / file)
    edit(tensors)
    save_file(tensors, dst / file)
    return dst


def perturb(factor):
    def edit(t):
        t[PERTURBED] = t[PERTURBED] * np.float32(factor)
    return edit


def scale_up(t):
    t["model.norm.weight"] = t["model.norm.weight"] * np.float32(SCALE)


def half_distance(ckpt_dir: Path, dtype: str) -> dict[str, float]:
    """Per output, the max abs distance of the `dtype` reference from the float32 one over the prefill and
    STEPS decode steps, both fed the float32 reference's greedy tokens (as validate feeds the model)."""
    ckpt = load_checkpoint(ckpt_dir)
    f32, half = ReferenceRunner(ckpt, "float32"), ReferenceRunner(ckpt, dtype)
    ids = np.asarray([[1, 2, 3, 4, 5, 6, 7, 8]], np.int64)
    a, b = f32.prefill(ids), half.prefill(ids)
    dist: dict[str, float] = {}
    for step in range(STEPS + 1):
        for name, x, y in [("logits", a.logits, b.logits), *((n, a.present[n], b.present[n]) for n in a.present)]:
            dist[name] = max(dist.get(name, 0.0), float(np.abs(x.astype(np.float64) - y).max()))
        if step < STEPS:
            tok = a.logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            a, b = f32.decode(tok), half.decode(tok)
    return dist


def bfloat16_standin(ckpt_dir: Path, tmp: Path) -> ReferenceRunner:
    """A bfloat16 'graph': weights rounded to bfloat16, arithmetic in float32."""
    def rounded(t):
        for k, v in t.items():
            if v.dtype == np.float32:
                t[k] = v.astype(ml_dtypes.bfloat16).astype(np.float32)

    edited(ckpt_dir, tmp, rounded)
    t = load_file(tmp / "adafuse_adapters.safetensors")
    rounded(t)
    save_file(t, tmp / "adafuse_adapters.safetensors")
    runner = ReferenceRunner(load_checkpoint(tmp), "float32")
    runner.info = dataclasses.replace(runner.info, dtype="bfloat16", description="bfloat16 stand-in")
    return runner


@pytest.fixture(scope="module")
def cases(example_dirs, tmp_path_factory):
    """Checkpoints (pregate example; perturbed; scaled up; experts permuted) and their float16 graphs."""
    root = tmp_path_factory.mktemp("half")
    src = example_dirs["pregate"]
    dirs = {"ok": src, "perturbed": edited(src, root / "perturbed", perturb(1.05)),
            # bfloat16's fixed atol (0.15) already admits the 5% change on this model (0.045 in the logits)
            "perturbed-more": edited(src, root / "perturbed-more", perturb(1.3)), "big": edited(src, root / "big", scale_up),
            "rerouted": edited(src, root / "rerouted", lambda t: t.update({"pregate.weight": np.roll(t["pregate.weight"], 1, 0)}),
                               "adafuse_adapters.safetensors")}
    graphs = {}
    for name, d in dirs.items():
        if name == "perturbed-more":
            continue  # used by the bfloat16 stand-in only
        export_onnx(load_checkpoint(d), root / f"onnx-{name}", "portable", "float16")
        graphs[name] = root / f"onnx-{name}" / "decoder.onnx"
    return dirs, graphs


def by_name(report):
    return {o["name"]: o for o in report["outputs"]}


def check_bound(report, dist, atol):
    """Every float output's bound is max(atol, 2 x the independently measured distance)."""
    for name, d in dist.items():
        o = by_name(report)[name]
        assert o["half_reference_max_abs"] == pytest.approx(d, rel=1e-6, abs=1e-9), name
        assert o["atol_applied"] == pytest.approx(max(atol, 2 * d), rel=1e-6), name
        assert o["bound"] == ("measured" if 2 * d > atol else "fixed"), name


@pytest.mark.parametrize("mode", ["full", "layerwise"])
def test_float16_graph_passes_against_float32(cases, mode):
    dirs, graphs = cases
    report = validate(load_checkpoint(dirs["ok"]), graphs["ok"], steps=STEPS, mode=mode)
    assert report["passed"], format_report(report)
    assert "float32" in report["reference"] and "float16" in report["routing_reference"]
    assert report["tolerance"]["half"] == "measured" and report["method"]["mode"] == mode
    check_bound(report, half_distance(dirs["ok"], "float16"), TOLERANCES["float16"][0])
    ids = by_name(report)["expert_ids"]
    assert ids["bound"] == "exact" and ids["mismatched"] == 0 and ids["elements"] > 0
    assert report["greedy_agreement"]["matched"] == STEPS + 1
    text = format_report(report)
    assert "half ref" in text and "judged against the float32 reference" in text


def test_float16_perturbed_weight_fails_where_it_acts(cases):
    dirs, graphs = cases
    report = validate(load_checkpoint(dirs["ok"]), graphs["perturbed"], steps=STEPS)
    failed = {o["name"] for o in report["outputs"] if not o["passed"]}
    assert failed == {"logits", "present.1.key", "present.1.value"}, format_report(report)
    dist = half_distance(dirs["ok"], "float16")
    for name in failed:  # the measured bound stays far below the error it must catch
        o = by_name(report)[name]
        assert 2 * dist[name] < o["max_abs_diff"] / 4, (name, dist[name], o["max_abs_diff"])
    assert not report["passed"] and "FAIL" in "\n".join(summary(report))


@pytest.mark.parametrize("mode", ["full", "layerwise"])
def test_float16_bound_measured_passes_what_fixed_fails(cases, mode):
    dirs, graphs = cases
    ckpt, atol = load_checkpoint(dirs["big"]), TOLERANCES["float16"][0]
    dist = half_distance(dirs["big"], "float16")
    assert 2 * dist["logits"] > 4 * atol  # the half reference's own error is well past the fixed atol
    measured = validate(ckpt, graphs["big"], steps=STEPS, mode=mode)
    assert measured["passed"], format_report(measured)
    check_bound(measured, dist, atol)
    assert by_name(measured)["logits"]["bound"] == "measured"
    lines = summary(measured)
    assert "float16 judged against float32" in lines[0] and "measured atol" in "\n".join(lines)
    fixed = validate(ckpt, graphs["big"], steps=STEPS, mode=mode, half_tolerance="fixed")
    assert not fixed["passed"] and not by_name(fixed)["logits"]["passed"]
    assert "float16" in fixed["reference"] and by_name(fixed)["logits"]["half_reference_max_abs"] is None


def test_float16_routing_stays_exact(cases):
    dirs, graphs = cases
    report = validate(load_checkpoint(dirs["ok"]), graphs["rerouted"], steps=STEPS)
    ids = by_name(report)["expert_ids"]
    assert ids["bound"] == "exact" and ids["atol_applied"] == 0 and ids["mismatched"] > 0 and not ids["passed"]


def test_bfloat16(cases, tmp_path):
    dirs, _ = cases
    atol = TOLERANCES["bfloat16"][0]
    ok = validate(load_checkpoint(dirs["ok"]), dirs["ok"], steps=STEPS, runner=bfloat16_standin(dirs["ok"], tmp_path / "a"))
    assert ok["passed"], format_report(ok)
    check_bound(ok, half_distance(dirs["ok"], "bfloat16"), atol)
    ids = by_name(ok)["expert_ids"]
    assert ids["bound"] == "exact" and ids["mismatched"] == 0 and ids["elements"] > 0

    dist = half_distance(dirs["ok"], "bfloat16")
    small = validate(load_checkpoint(dirs["ok"]), dirs["ok"], steps=STEPS,
                     runner=bfloat16_standin(dirs["perturbed"], tmp_path / "b"))
    # a 5% change stays inside bfloat16's fixed atol here; the measured bound is below that atol: nothing widened
    assert all(o["bound"] in ("fixed", "exact") for o in small["outputs"]) and 2 * dist["logits"] < atol / 2
    bad = validate(load_checkpoint(dirs["ok"]), dirs["ok"], steps=STEPS,
                   runner=bfloat16_standin(dirs["perturbed-more"], tmp_path / "b2"))
    failed = {o["name"] for o in bad["outputs"] if not o["passed"]}
    assert "logits" in failed and failed <= {"logits", "present.1.key", "present.1.value"}, format_report(bad)

    rerouted = validate(load_checkpoint(dirs["ok"]), dirs["ok"], steps=STEPS,
                        runner=bfloat16_standin(dirs["rerouted"], tmp_path / "c"))
    assert by_name(rerouted)["expert_ids"]["mismatched"] > 0

    big = load_checkpoint(dirs["big"])
    dist = half_distance(dirs["big"], "bfloat16")
    assert 2 * dist["logits"] > 2 * atol
    measured = validate(big, dirs["big"], steps=STEPS, runner=bfloat16_standin(dirs["big"], tmp_path / "d"))
    assert measured["passed"] and by_name(measured)["logits"]["bound"] == "measured", format_report(measured)
    check_bound(measured, dist, atol)
    fixed = validate(big, dirs["big"], steps=STEPS, runner=bfloat16_standin(dirs["big"], tmp_path / "e"),
                     half_tolerance="fixed")
    assert not by_name(fixed)["logits"]["passed"], format_report(fixed)


def test_cli_half_tolerance(cli, cases):
    dirs, graphs = cases
    r = cli("validate", dirs["big"], graphs["big"], "--steps", str(STEPS), "--json")
    assert r.code == 0, r.out + r.err
    assert json.loads(r.out)["tolerance"]["half"] == "measured"
    r = cli("validate", dirs["big"], graphs["big"], "--steps", str(STEPS), "--half-tolerance", "fixed")
    assert r.code == 1 and "logits" in r.err, r.out + r.err
    assert "--half-tolerance" in cli("validate", "--help").out
