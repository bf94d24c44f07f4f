"""`adafuse-export validate CKPT OUT.native --runtime cpp` on the GPU: the native backend's prefill and decode
logits, KV cache and routes against the PyTorch reference, float32 and bfloat16 (validate's measured bound),
every example kind; a native artifact of another checkpoint is refused.

Needs the runtime built for this GPU: runtime/tools/build_on_gpu.sh, then ADAFUSE_RUNTIME_LIB=<its output>.
"""
from __future__ import annotations

import json
import os
from typing import cast

import pytest

from adafuse_export.examples import KINDS

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    from adafuse_export.examples import make_example

    assert os.environ.get("ADAFUSE_RUNTIME_LIB"), "set ADAFUSE_RUNTIME_LIB to the runtime built by runtime/tools/build_on_gpu.sh"
    root = tmp_path_factory.mktemp("validate-native")
    return {kind: make_example(root / kind, kind).path for kind in KINDS}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_validate_native_artifact_passes(cli, examples, tmp_path, kind, dtype):
    art = tmp_path / f"{kind}.native"
    conv = cli("convert", examples[kind], art, "--backend", "native", "--dtype", dtype, "--max-batch", "1",
               "--max-seq", "32")
    assert conv.code == 0, conv.err
    res = cli("validate", examples[kind], art, "--runtime", "cpp", "--json", "--prompt-ids", "3,1,4,1,5,9",
              "--prompt-ids", "2,7")
    assert res.code == 0, res.out[-3000:] + res.err
    report = json.loads(res.out)
    assert report["passed"] and report["runner"] == "cpp-runtime" and "native backend" in report["runner_description"]
    names = {o["name"] for o in report["outputs"]}
    assert "logits" in names and "present.0.key" in names
    if cast(dict, KINDS[kind])["routing"] == "pregate":
        ids = next(o for o in report["outputs"] if o["name"] == "expert_ids")
        assert ids["mismatched"] == 0 and ids["elements"] > 0  # exact
    assert report["greedy_agreement"]["fraction"] == 1.0 or dtype == "bfloat16"


def test_validate_native_artifact_of_another_checkpoint_is_refused(cli, examples, tmp_path):
    art = tmp_path / "mola.native"
    assert cli("convert", examples["mola"], art, "--backend", "native", "--max-batch", "1", "--max-seq", "32").code == 0
    res = cli("validate", examples["pregate"], art, "--runtime", "cpp")
    assert res.code == 2
    assert "model does not match checkpoint" in res.err and res.err.count("\n") == 1, res.err


# pregate: the stages stacked, no static LoRA; lora: static LoRAs merged into the stored FP8 matrices (the twin drops
# their sites)
@pytest.mark.parametrize("kind", ["pregate", "lora"])
def test_validate_fp8_artifact_against_its_twin_and_reports_the_quantization(cli, examples, tmp_path, kind):
    """`convert --weights fp8`, then validate: the runtime within the measured bfloat16 bound of the FP8 twin; the
    quantization's effect in the report is the one computed on the CPU by the reference alone."""
    from adafuse_export.converters import load_checkpoint
    from adafuse_export.validate import quantization_effect

    art = tmp_path / f"{kind}.native"
    conv = cli("convert", examples[kind], art, "--backend", "native", "--dtype", "bfloat16", "--weights", "fp8",
               "--max-batch", "1", "--max-seq", "32")
    assert conv.code == 0, conv.err
    prompts = [[3, 1, 4, 1, 5, 9], [2, 7]]
    res = cli("validate", examples[kind], art, "--runtime", "cpp", "--json", "--steps", "4", "--min-greedy-agreement",
              "0", *(a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))))
    assert res.code == 0, res.out[-3000:] + res.err
    report = json.loads(res.out)
    assert report["passed"] and "FP8 twin" in report["reference"]
    q = report["quantization"]
    assert q["passed"] and q["min_greedy_agreement"] == 0
    expected = quantization_effect(load_checkpoint(examples[kind]), art, prompts, 4)
    assert {k: q[k] for k in expected} == expected


def test_validate_fp8_artifact_with_strategy_switch(cli, examples, tmp_path):
    """`convert --weights fp8` then `validate --strategy switch`: each decode token's experts merged into bfloat16
    copies of the FP8 weights (W8 * scale + the deltas, rounded once), within the measured bfloat16 bound of the FP8
    twin, expert ids exact."""
    art = tmp_path / "pregate.native"
    conv = cli("convert", examples["pregate"], art, "--backend", "native", "--dtype", "bfloat16", "--weights", "fp8",
               "--max-batch", "1", "--max-seq", "32")
    assert conv.code == 0, conv.err
    res = cli("validate", examples["pregate"], art, "--runtime", "cpp", "--strategy", "switch", "--json", "--steps", "6",
              "--prompt-ids", "3,1,4,1,5,9", "--prompt-ids", "2,7")
    assert res.code == 0, res.out[-3000:] + res.err
    report = json.loads(res.out)
    assert report["passed"] and "FP8 twin" in report["reference"]
    assert "native backend, switch" in report["runner_description"]
    ids = next(o for o in report["outputs"] if o["name"] == "expert_ids")
    assert ids["mismatched"] == 0 and ids["elements"] > 0
